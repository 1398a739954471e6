"""The K-term op against the eager torch chain and torch.compile, for K = 1..6 terms and M = 1..3
outputs, on the compiled backends of the device.

    python bench/bench_lincomb.py                          # CPU: float32, 1M and 16M elements
    python bench/bench_lincomb.py --sizes 4M --dtypes bfloat16 --no-compile
    python bench/bench_lincomb.py --device cuda            # on a GPU: the cuda and triton backends

Per (dtype, size, K, M), every operand of one dtype, the outputs preallocated and x and the terms
only read:

* ``<backend>``:    ``bk.lincomb(x, terms, coef, out=outs, backend=...)``, one pass over memory
                    (K+1 tensors read, M written), with every Python check;
* ``<backend>:op``: the raw ``torch.ops.belm.lincomb_ext(outs, x, terms, coef, False)``;
* ``eager``:        per output ``torch.mul(x, c0, out=o)`` then ``o.add_(t_j, alpha=c_j)`` per
                    term: K+1 passes per output;
* ``compile``:      ``torch.compile`` of that chain (inductor fuses it);

and for M = 1 the in-place update too (``bk.lincomb_`` against ``x.mul_(c0).add_(t1,
alpha=c1)...`` and its compiled form). Bandwidth counts (K+1) reads and M writes per element for
every implementation (useful traffic, not what the chain really moves). CPU times: interleaved
blocks of ~10 ms per implementation of a cell, median per-call time (bench_ops.CpuTimer), with
torch's thread count (wall time) or, with ``--threads 1``, the timing thread's CPU time, which
time spent descheduled by other jobs does not inflate; on a shared machine (see the load
averages in the stamp) compare ratios within a cell. GPU times: ``triton.testing.do_bench``
(median).

Writes bench/results/lincomb_<device-slug>.md and .csv, stamped with the device, versions, load
and date.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_ops import CpuTimer, GpuTimer, fmt_size, parse_size, write_csv
from stamp import device_slug, stamp

import belm_kernels as bk
from belm_kernels import ops

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def coefficients(k: int, m: int) -> list[list[float]]:
    """M rows of K+1 coefficients summing to 1 (repeated application stays bounded)."""
    rows = []
    for i in range(m):
        raw = [1.0 + 0.5 * ((i + j) % 3) for j in range(k + 1)]
        rows.append([v / sum(raw) for v in raw])
    return rows


def make_chains(rows: list[list[float]]):
    """(out of place, in place) eager chains with the coefficients as constants."""

    def out_of_place(outs, x, terms):
        for o, c in zip(outs, rows, strict=True):
            torch.mul(x, c[0], out=o)
            for cj, t in zip(c[1:], terms, strict=True):
                o.add_(t, alpha=cj)

    def in_place(x, terms):
        c = rows[0]
        x.mul_(c[0])
        for cj, t in zip(c[1:], terms, strict=True):
            x.add_(t, alpha=cj)

    return out_of_place, in_place


def time_cell(device, dtype, n, k, m, backends, compile_, timer) -> dict:
    gen = torch.Generator(device=device).manual_seed(k * 10 + m)
    x = torch.randn(n, device=device, dtype=dtype, generator=gen)
    terms = [torch.randn(n, device=device, dtype=dtype, generator=gen) for _ in range(k)]
    outs = [torch.empty_like(x) for _ in range(m)]
    rows = coefficients(k, m)
    coef = torch.tensor(rows, dtype=ops.compute_dtype(dtype), device=device)
    chain, chain_ = make_chains(rows)
    impls = {}
    for b in backends:
        impls[(b, "out")] = lambda b=b: bk.lincomb(x, terms, coef, out=outs, backend=b)
        if b in ("cpu", "cuda"):  # the extension's op
            impls[(f"{b}:op", "out")] = lambda: torch.ops.belm.lincomb_ext(outs, x, terms,
                                                                           coef, False)
        if m == 1:
            impls[(b, "in_place")] = lambda b=b: bk.lincomb_(x, terms, coef[0], backend=b)
    impls[("eager", "out")] = lambda: chain(outs, x, terms)
    if m == 1:
        impls[("eager", "in_place")] = lambda: chain_(x, terms)
    if compile_:
        compiled, compiled_ = (torch.compile(f, dynamic=False) for f in (chain, chain_))
        impls[("compile", "out")] = lambda: compiled(outs, x, terms)
        if m == 1:
            impls[("compile", "in_place")] = lambda: compiled_(x, terms)
    return timer.measure_all(impls)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    # One thread: its CPU time (time.thread_time), robust to other jobs on a shared machine.
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    timer = GpuTimer(100) if gpu else CpuTimer(args.min_time, clock)
    backends = [b for b in bk.available_backends(device) if b in ("cpu", "cuda", "triton")]
    if not gpu:
        backends = [b for b in backends if b != "triton"]  # the interpreter: a test path
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    rows = []
    started = time.perf_counter()
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for n in args.sizes:
            for k in range(1, ops.MAX_TERMS + 1):
                for m in range(1, ops.MAX_OUTPUTS + 1):
                    times = time_cell(device, dtype, n, k, m, backends, not args.no_compile,
                                      timer)
                    nbytes = (k + 1 + m) * n * dtype.itemsize
                    for (impl, mode), t in times.items():
                        eager = times.get(("eager", mode))
                        comp = times.get(("compile", mode))
                        rows.append({"dtype": dname, "numel": n, "size": fmt_size(n), "k": k,
                                     "m": m, "impl": impl, "mode": mode, "time_us": t * 1e6,
                                     "gbps": nbytes / t / 1e9,
                                     "speedup_vs_eager": eager / t if eager else float("nan"),
                                     "speedup_vs_compile": comp / t if comp else float("nan")})
                    best = {mode: min((t, impl) for (impl, md), t in times.items() if md == mode)
                            for mode in {md for _, md in times}}
                    print(f"{dname:>9} {fmt_size(n):>4} K={k} M={m}: "
                          + " | ".join(f"{impl}{'' if mode == 'out' else ' (in place)'} "
                                       f"{t * 1e6:.0f} us" for (impl, mode), t in times.items())
                          + f"  best {', '.join(f'{md}: {v[1]}' for md, v in best.items())} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
            if not args.no_compile:
                torch._dynamo.reset()
    return rows


def write_markdown(path: Path, rows: list[dict], info: dict[str, str], args, csv_name: str,
                   elapsed: float) -> None:
    lines = [f"# K-term op benchmark: {info['device']}", "",
             *(f"- **{k}**: {v}" for k, v in info.items()),
             f"- **command**: `python bench/bench_lincomb.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- **run time**: {elapsed:.0f} s", "",
             "Out of place: `bk.lincomb(x, terms, coef, out=outs, backend=...)` (one pass: K+1 "
             "tensors read, M written), the raw `torch.ops.belm.lincomb_ext` (`:op`), the eager "
             "chain (`torch.mul(x, c0, out=o)` then `o.add_(t_j, alpha=c_j)`: K+1 passes per "
             "output) and `torch.compile` of it. In place (M = 1): `bk.lincomb_` against "
             "`x.mul_(c0).add_(t1, alpha=c1)...` and its compiled form. Every operand of one "
             "dtype. Times are medians of interleaved blocks; speedups are time(eager or "
             "compile) / time(impl) in the same cell and mode. GB/s counts (K+1) reads and M "
             "writes per element.", "", f"Raw numbers: [{csv_name}]({csv_name})", ""]
    backends = sorted({r["impl"] for r in rows} - {"eager", "compile"}, key=len)
    main = [b for b in backends if ":" not in b]
    for dname in args.dtypes:
        for n in args.sizes:
            cell = [r for r in rows if r["dtype"] == dname and r["numel"] == n]
            if not cell:
                continue
            lines += [f"## {dname}, {fmt_size(n)} elements", "",
                      "µs per call (GB/s); speedup of the first backend vs eager / vs compile:",
                      ""]
            impls = main + [b for b in backends if ":" in b] + ["eager", "compile"]
            impls = [i for i in impls if any(r["impl"] == i for r in cell)]
            header = ["K", "M", "mode", *impls, "vs eager", "vs compile"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for k in range(1, ops.MAX_TERMS + 1):
                for m in range(1, ops.MAX_OUTPUTS + 1):
                    for mode in ("out", "in_place"):
                        hits = {r["impl"]: r for r in cell
                                if r["k"] == k and r["m"] == m and r["mode"] == mode}
                        if not hits:
                            continue
                        vals = [f"{hits[i]['time_us']:.0f} ({hits[i]['gbps']:.0f})" if i in hits
                                else "" for i in impls]
                        first = hits.get(main[0]) if main else None
                        ratios = [f"{first[key]:.2f}x" if first else ""
                                  for key in ("speedup_vs_eager", "speedup_vs_compile")]
                        lines.append("| " + " | ".join([str(k), str(m), mode.replace("_", " "),
                                                        *vals, *ratios]) + " |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated subset of float16,bfloat16,float32")
    parser.add_argument("--sizes", default="1M,16M", help="comma-separated element counts")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="CPU: seconds of timed blocks per implementation and cell")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU: torch threads (default: torch's choice); 1 times the thread's "
                             "CPU time instead of wall time")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)  # before the stamp, which reports it
    info = stamp(device)
    if args.threads == 1 and device.type == "cpu":
        info["clock"] = "time.thread_time (CPU time of the one timing thread)"
    print(f"device: {info['device']}; backends: {bk.available_backends(device)}", flush=True)
    started = time.perf_counter()
    rows = run(args)
    elapsed = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device, info) + args.tag
    csv_path = args.out_dir / f"lincomb_{slug}.csv"
    md_path = args.out_dir / f"lincomb_{slug}.md"
    write_csv(csv_path, rows, info)
    write_markdown(md_path, rows, info, args, csv_path.name, elapsed)
    print(f"wrote {csv_path}, {md_path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
