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
    rows = []
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
    write(rows, info, device_slug(device, info), args)


def write(rows, info, slug, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"bulk_{slug}.csv", "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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
    lines += ["", f"Reproduce: `python bench/bench_bulk.py --items {args.items} --steps "
                  f"{args.steps}`", ""]
    (args.out / f"bulk_{slug}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / f'bulk_{slug}.md'}")


if __name__ == "__main__":
    main()
