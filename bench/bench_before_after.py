"""``lincomb3_`` before and after the K-term kernels, on the CPU backend: the public op and the
raw extension op, timed in alternating processes of two checkouts.

    git worktree add --detach /tmp/belm-before 7ceaf88    # main's parent: the three-term kernels
    python bench/bench_before_after.py --before /tmp/belm-before

"before" is the checkout given (its ``belm::lincomb3_ext`` kernel and its Python layer), "after"
this one (``belm::lincomb_ext`` with K = 2 terms, and the K-term Python layer). The two kernels
cannot live in one process (both register ops in the ``belm`` namespace), so every round runs one
process per checkout, in ABBA order (before, after, after, before, ...) so that a drifting
machine load hits both alike; each process times every cell (dtype x size x implementation) with
interleaved blocks of about 10 ms and reports per-cell medians, and the result per cell is the
median over the rounds, with the spread (lowest and highest round) next to it. On a shared
machine (other jobs running: see the load averages in the stamp) single rounds vary by tens of
percent; compare the medians, and the ratio's spread.

Writes bench/results/ops_before_after_<device-slug>.md and .csv, stamped with the device,
versions, both commits, the load and the date.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from stamp import device_slug, stamp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZES = [2 ** 14, 2 ** 18, 2 ** 20, 2 ** 22, 2 ** 24]
DTYPES = ("float32", "float16", "bfloat16")

# Runs in each checkout (PYTHONPATH = that checkout): prints {cell: seconds per call}.
TIMER = """
import json, statistics, sys, time, torch
import belm_kernels as bk
from belm_kernels import extension
assert extension.get_backend("cpu").unavailable_reason(torch.device("cpu")) is None
ops = torch.ops.belm
old = hasattr(ops, "lincomb3_ext")
sizes, dtypes, block_s, blocks, threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
# One thread: its CPU time, which time spent descheduled by other jobs does not inflate.
clock = time.thread_time if threads == 1 else time.perf_counter
forward = torch.tensor([0.5, 0.25, 0.25])  # repeated application stays bounded
inverse = torch.tensor([2.0, 0.25, 0.25])
result = {}
for dname in dtypes:
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        x, y, z = (torch.randn(n, generator=g).to(getattr(torch, dname)) for _ in range(3))
        if old:
            raw = lambda: ops.lincomb3_ext(x, y, z, forward, False)
        else:
            raw = lambda: ops.lincomb_ext([x], None, [y, z], forward, False)
        fns = {"lincomb3_": lambda: bk.lincomb3_(x, y, z, forward, backend="cpu"),
               "lincomb3_inverse_": lambda: bk.lincomb3_inverse_(x, y, z, inverse, backend="cpu"),
               "raw op": raw}
        reps = {}
        for key, fn in fns.items():
            fn()
            t0 = clock()
            fn()
            reps[key] = max(1, int(block_s / max(clock() - t0, 1e-7)))
        samples = {key: [] for key in fns}
        for _ in range(blocks):  # interleaved blocks
            for key, fn in fns.items():
                t0 = clock()
                for _ in range(reps[key]):
                    fn()
                samples[key].append((clock() - t0) / reps[key])
        for key, values in samples.items():
            result[f"{dname}|{n}|{key}"] = statistics.median(values)
print(json.dumps(result))
"""


def git_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True)
    return out.stdout.strip()[:100] if out.returncode == 0 else "unknown"


def time_tree(tree: Path, args) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BELM_KERNELS_")}
    env["PYTHONPATH"] = str(tree)
    config = json.dumps([args.sizes, args.dtypes, args.block, args.blocks, args.threads])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TIMER), config], cwd=str(tree),
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"timing in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True,
                        help="a checkout with the three-term kernels (e.g. commit 7ceaf88)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per checkout")
    parser.add_argument("--block", type=float, default=0.01, help="seconds per timed block")
    parser.add_argument("--blocks", type=int, default=15, help="blocks per cell and process")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the timed processes (default: torch's choice); "
                             "1 times the thread's CPU time instead of wall time")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    trees = {"before": args.before.resolve(), "after": ROOT}
    if args.threads:
        torch.set_num_threads(args.threads)  # the stamp reports the timed processes' threads
    info = stamp(torch.device("cpu"), before=git_commit(trees["before"]),
                 after=git_commit(trees["after"]))
    info["clock"] = ("time.thread_time (CPU time of the one timing thread)" if args.threads == 1
                     else "time.perf_counter (wall time)")
    print(f"before: {info['before']}\nafter:  {info['after']}", flush=True)
    for tree in trees.values():  # build (or load) both extensions before timing anything
        time_tree(tree, argparse.Namespace(sizes=[16], dtypes=["float32"], block=0.001,
                                           blocks=1, threads=args.threads))
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    started = time.perf_counter()
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            rounds[name].append(time_tree(trees[name], args))
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)",
              flush=True)
    elapsed = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())

    rows = []
    for cell in rounds["after"][0]:
        dname, n, impl = cell.split("|")
        per = {name: [rnd[cell] for rnd in rounds[name]] for name in rounds}
        before, after = (statistics.median(per[k]) for k in ("before", "after"))
        ratios = [a / b for a, b in zip(per["after"], per["before"], strict=True)]
        rows.append({"dtype": dname, "numel": int(n), "impl": impl,
                     "before_us": before * 1e6, "after_us": after * 1e6,
                     "after_over_before": after / before,
                     "ratio_low": min(ratios), "ratio_high": max(ratios),
                     "before_spread_us": f"{min(per['before']) * 1e6:.1f}-"
                                         f"{max(per['before']) * 1e6:.1f}",
                     "after_spread_us": f"{min(per['after']) * 1e6:.1f}-"
                                        f"{max(per['after']) * 1e6:.1f}",
                     "after_gbps": 4 * int(n) * torch.empty((), dtype=getattr(torch, dname))
                     .element_size() / after / 1e9})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(torch.device("cpu"), info) + args.tag
    csv_path = args.out_dir / f"ops_before_after_{slug}.csv"
    with open(csv_path, "w", newline="") as f:
        for k, v in info.items():
            f.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
    lines = ["# lincomb3_ before / after the K-term kernels (CPU backend)", "",
             *(f"- **{k}**: {v}" for k, v in info.items()),
             f"- **command**: `python bench/bench_before_after.py {' '.join(sys.argv[1:])}`",
             f"- **rounds**: {args.rounds} processes per checkout, ABBA order; per process "
             f"{args.blocks} interleaved blocks of ~{args.block * 1e3:.0f} ms per cell",
             f"- **run time**: {elapsed:.0f} s", "",
             "Times are medians over the rounds of each process's median (µs per call, "
             f"{info['torch_threads']} threads); `spread` is the lowest and highest round. "
             "`after / before` below 1 is faster; its range is over the rounds (each round's "
             "after over the same round's before). `raw op` is `torch.ops.belm.lincomb3_ext(x, "
             "y, z, coef, False)` before and `torch.ops.belm.lincomb_ext([x], None, [y, z], "
             "coef, False)` after (the kernel and its C++ checks); `lincomb3_` and "
             "`lincomb3_inverse_` are the public functions with every check (their Python layer "
             "changed between the two commits too). GB/s counts 3 reads + 1 write.", "",
             "| dtype | elements | impl | before µs (spread) | after µs (spread) | after / "
             "before (range) | after GB/s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['dtype']} | {row['numel']} | {row['impl']} | "
                     f"{row['before_us']:.1f} ({row['before_spread_us']}) | "
                     f"{row['after_us']:.1f} ({row['after_spread_us']}) | "
                     f"**{row['after_over_before']:.2f}** ({row['ratio_low']:.2f}-"
                     f"{row['ratio_high']:.2f}) | {row['after_gbps']:.1f} |")
    md_path = args.out_dir / f"ops_before_after_{slug}.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {csv_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
