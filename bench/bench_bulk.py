"""Items per second of the bulk commands with 1 and 2 processes (torchrun), CPU by default.

On a synthetic dataset, with the tiny offline pipeline (32x32 images, 10 steps, guidance 3):

1. ``generate-dataset`` writes N images from N prompts (they become the dataset),
2. ``invert-dataset`` inverts those images into latent pairs,
3. ``regenerate-dataset`` regenerates the latents (and images) from the pairs,

each as one process (``--threads 1`` and ``--threads 2``) and as 2 ranks under
``torchrun --standalone --nproc-per-node 2`` (``--threads 1`` each), every run into a fresh
folder. Reported per run: items/s over the processing phase (from the job's own summary: items
done / the slowest rank's time from its first item to its last shard), and the wall time of the
whole command (interpreter start, imports, model load included). The 2-rank outputs are compared
byte for byte with the 1-process ``--threads 1`` outputs (they must be equal).

Verification (every stored tensor, file and item record checked against its SHA-256, wherever a
stored item is trusted): the runs above include it where they trust stored data (regenerate
verifies each pair before using it) and the digests they compute for what they write. Its cost
is measured on each finished 1-process folder: the same command run again (everything verified
and skipped: its check phase and wall time), and in this process the time to read every shard
against the time to verify what it stores.

On a GPU machine ``--nproc`` sets the ranks (one GPU each). Writes
bench/results/bulk_<device-slug>.csv and .md, stamped (bench/stamp.py).

    python bench/bench_bulk.py                   # 32 items, 10 steps
    python bench/bench_bulk.py --items 64 --steps 20
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
from stamp import device_slug, stamp  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def run(nproc: int, threads: int, command: str, out: Path, *args) -> dict:
    """Run one bulk command; its summary plus the wall time of the whole command."""
    cli = ["-m", "belm_kernels.cli", command, "--out", str(out), "--threads", str(threads),
           "--no-progress", *map(str, args)]
    launcher = ([sys.executable] if nproc == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={nproc}"])
    t0 = time.perf_counter()
    res = subprocess.run(launcher + cli, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{command} with {nproc} process(es) failed:\n{res.stdout}\n{res.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "wall_seconds": wall}


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.json", "summary.json")}


def verification_cost(folder: Path) -> dict:
    """Read every shard of a finished folder, then verify every stored item (``record_problem``:
    its record, tensors and files against their SHA-256); the seconds of each and the bytes."""
    from belm_kernels import bulk

    paths = sorted(folder.glob("shard-*.safetensors"))
    t0 = time.perf_counter()
    shards = [bulk.read_shard(path) for path in paths]
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems = [bulk.record_problem(folder, rec, tensors)
                for tensors, meta in shards for rec in meta["items"]]
    verify = time.perf_counter() - t0
    if any(problems):
        raise SystemExit(f"{folder}: stored items fail verification: {problems}")
    nbytes = sum(t.numel() * t.element_size() for tensors, _ in shards for t in tensors.values())
    nbytes += sum((folder / rel).stat().st_size for _, meta in shards for rec in meta["items"]
                  for rel in rec["files"])
    return {"items": len(problems), "stored_mb": nbytes / 2**20, "read_seconds": read,
            "verify_seconds": verify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = stamp(device, diffusers=diffusers.__version__)
    # (processes, threads per process): the process counts compared, and one process using
    # both cores through intra-op threads
    configs = [(1, 1), (args.nproc, 1), (1, 2)]
    common = ["--steps", args.steps, "--guidance", 3.0, "--shards", 2 * args.nproc * 2]
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("".join(f"a photo of thing number {i}\n" for i in range(args.items)))
        folders: dict[tuple[str, int, int], Path] = {}
        jobs = [("generate-dataset", lambda c: ["--prompts", prompts, *common]),
                ("invert-dataset", lambda c: ["--data", folders["generate-dataset", 1, 1] /
                                              "images", *common]),
                ("regenerate-dataset", lambda c: ["--pairs", folders["invert-dataset", 1, 1],
                                                  "--save", "images,latents"])]
        for command, make_args in jobs:
            for nproc, threads in configs:
                out = tmp / f"{command}-{nproc}x{threads}"
                folders[command, nproc, threads] = out
                s = run(nproc, threads, command, out, *make_args((nproc, threads)))
                equal = ("reference" if (nproc, threads) == (1, 1) else
                         outputs(out) == outputs(folders[command, 1, 1]))
                rows.append({"command": command, "processes": nproc,
                             "threads_per_process": threads, "items": s["done"],
                             "steps": args.steps, "items_per_second": s["items_per_second"],
                             "processing_seconds": s["seconds"],
                             "wall_seconds": round(s["wall_seconds"], 2),
                             "bytes_equal_to_1x1": equal, "device": s["device"]})
                print(f"{command:20s} {nproc} proc x {threads} thr: "
                      f"{s['items_per_second']:.2f} items/s ({s['seconds']:.1f} s processing, "
                      f"{s['wall_seconds']:.1f} s wall), outputs equal to 1x1: {equal}",
                      flush=True)
            out = folders[command, 1, 1]
            again = run(1, 1, command, out, *make_args((1, 1)))  # resume: all verified, skipped
            if (again["done"], again["skipped"], again["untrusted"]) != (0, args.items, []):
                raise SystemExit(f"{command}: the rerun redid work: {again}")
            cost = verification_cost(out)
            checks.append({"command": command, "items": cost["items"],
                           "stored_mb": round(cost["stored_mb"], 3),
                           "read_seconds": round(cost["read_seconds"], 4),
                           "verify_seconds": round(cost["verify_seconds"], 4),
                           "verify_ms_per_item": round(1e3 * cost["verify_seconds"]
                                                       / cost["items"], 3),
                           "processing_seconds_1x1": next(
                               r["processing_seconds"] for r in rows if r["command"] == command
                               and (r["processes"], r["threads_per_process"]) == (1, 1)),
                           "rerun_check_seconds": again["check_seconds"],
                           "rerun_wall_seconds": round(again["wall_seconds"], 2)})
            print(f"{command:20s} verification: {cost['stored_mb']:.2f} MB of {cost['items']} "
                  f"items in {cost['verify_seconds']:.3f} s (reading the shards "
                  f"{cost['read_seconds']:.3f} s); rerun: check {again['check_seconds']} s, "
                  f"wall {again['wall_seconds']:.1f} s", flush=True)
    write(rows, checks, info, device_slug(device, info), args)


def write(rows, checks, info, slug, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"bulk_{slug}.csv", "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(args.out / f"bulk_verify_{slug}.csv", "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(checks[0]))
        writer.writeheader()
        writer.writerows(checks)
    base = {r["command"]: r["items_per_second"] for r in rows
            if (r["processes"], r["threads_per_process"]) == (1, 1)}
    lines = [
        f"# Bulk commands on {info['device']}: items per second, 1 and {args.nproc} processes",
        "",
        f"Tiny offline pipeline (random weights, 32x32 images, 16x16 latents), {args.items} "
        "items, "
        f"{args.steps} steps, guidance 3, {2 * args.nproc * 2} shards; every run into a fresh "
        "folder. items/s = items / processing time (first item to last shard, slowest rank); "
        "wall = the whole command, interpreter start, imports and model load included. "
        "`equal` = the outputs are byte for byte those of 1 process x 1 thread.",
        "",
        "  ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        "| command | processes x threads | items/s | speed-up vs 1x1 | processing s | wall s "
        "| equal |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = r["items_per_second"] / base[r["command"]]
        lines.append(f"| {r['command']} | {r['processes']} x {r['threads_per_process']} | "
                     f"{r['items_per_second']:.2f} | {speedup:.2f} | {r['processing_seconds']} | "
                     f"{r['wall_seconds']} | {r['bytes_equal_to_1x1']} |")
    lines += [
        "",
        "Verification (folder format 3: SHA-256 of every stored tensor, file and item record), "
        "on each finished 1 x 1 folder: `verify` = checking every stored item in one process "
        "(the shards already read; `read` = reading them), and the same command run again into "
        "the folder, which verifies every item and skips it all (`rerun check` = its check "
        "phase, `rerun wall` = the whole command).",
        "",
        "| command | items | stored MB | read s | verify s | verify ms/item | processing s (1x1) "
        "| rerun check s | rerun wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in checks:
        lines.append(f"| {c['command']} | {c['items']} | {c['stored_mb']} | {c['read_seconds']} "
                     f"| {c['verify_seconds']} | {c['verify_ms_per_item']} | "
                     f"{c['processing_seconds_1x1']} | {c['rerun_check_seconds']} | "
                     f"{c['rerun_wall_seconds']} |")
    lines += ["", f"Reproduce: `python bench/bench_bulk.py --items {args.items} --steps "
                  f"{args.steps}`", ""]
    (args.out / f"bulk_{slug}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / f'bulk_{slug}.md'}")


if __name__ == "__main__":
    main()
