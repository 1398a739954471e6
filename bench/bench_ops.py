"""Benchmark of the fused update ``lincomb3_`` / ``lincomb3_inverse_`` per backend.

For every backend in ``belm_kernels.available_backends(device)`` x dtype x size, times the public
op (forward and inverse) against

* eager:   the eager chain ``x.mul_(a).add_(y, alpha=b).add_(z, alpha=c)`` (three passes),
* compile: ``torch.compile`` of that same chain,
* copy:    ``dst.copy_(src)`` moving the same number of bytes (read + write), the practical
           bandwidth ceiling of the device,

and, for the compiled backends, the raw op ``torch.ops.belm.lincomb_ext([x], None, [y, z], coef,
False)`` without the Python argument checks ("<backend>:op"). On a GPU, small sizes are also
timed as a replay of a captured CUDA graph ("<impl>@graph"), where launch overhead disappears.

Bandwidth counts 3 reads + 1 write of the op (x, y, z read, x written, each at its element size)
for every implementation, so GB/s compares useful traffic; "% copy" divides by the copy's GB/s
at the same byte count. GPU times: ``triton.testing.do_bench`` (median). CPU times:
interleaved blocks of ~10 ms per implementation (median per-call time over the blocks, after a
warm-up call; see CpuTimer), with torch's thread count.

Writes bench/results/ops_<device-slug>.csv, .png and .md, each stamped with the device, the core
count or GPU and driver, torch/triton/python versions and the date.

    python bench/bench_ops.py                       # CPU unless a GPU is present
    python bench/bench_ops.py --device cpu --quick  # a short run
    python bench/bench_ops.py --dtypes float32 --sizes 1M,16M
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from stamp import device_slug, stamp

import belm_kernels as bk

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CPU_SIZES = [2 ** k for k in range(14, 27, 2)]  # 16K .. 64M
GPU_SIZES = [2 ** k for k in range(14, 29, 2)]  # 16K .. 256M
GRAPH_MAX = 2 ** 22  # CUDA-graph timings up to 4M elements
FORWARD = (0.5, 0.25, 0.25)  # repeated application stays bounded (no overflow, no subnormals)
INVERSE = (2.0, 0.25, 0.25)


# --------------------------------------------------------------------------------------------
# Environment stamp.


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 16K, 4M, 1048576)")
    scale = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def fmt_size(n: int) -> str:
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------
# Timers (seconds per call).


class CpuTimer:
    """Interleaved blocks: every implementation of one (dtype, size) cell is timed in turn, round
    after round, so a noisy neighbour on a shared machine slows them all alike. Each block runs
    enough calls for ~10 ms; the result is the median per-call time over all blocks, after a
    warm-up call, once every implementation has min_run_time of blocks (and >= 7 blocks)."""

    def __init__(self, min_run_time: float, clock=time.perf_counter):
        self.min_run_time = min_run_time
        # time.thread_time (CPU time of this thread) suits one-thread runs on a busy machine:
        # time spent descheduled by other jobs is not counted, memory stalls are.
        self.clock = clock

    def measure_all(self, fns: dict) -> dict:
        numbers = {}
        clock = self.clock
        for key, fn in fns.items():
            fn()  # warm-up: first-call costs (compilation, page faults)
            t0 = clock()
            fn()
            numbers[key] = max(1, int(0.01 / max(clock() - t0, 1e-7)))
        samples = {key: [] for key in fns}
        spent = {key: 0.0 for key in fns}
        while any(spent[k] < self.min_run_time or len(samples[k]) < 7 for k in fns):
            for key, fn in fns.items():
                t0 = clock()
                for _ in range(numbers[key]):
                    fn()
                dt = clock() - t0
                spent[key] += dt
                samples[key].append(dt / numbers[key])
        return {key: statistics.median(v) for key, v in samples.items()}


class GpuTimer:
    def __init__(self, rep_ms: int):
        self.rep_ms = rep_ms

    def __call__(self, fn) -> float:
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(5, self.rep_ms // 4), rep=self.rep_ms,
                        return_mode="median") * 1e-3

    def measure_all(self, fns: dict) -> dict:
        return {key: self(fn) for key, fn in fns.items()}


def graph_of(fn):
    """A CUDA graph of one call of fn (captured after a warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# --------------------------------------------------------------------------------------------
# The benchmark.


def eager_chain(x, y, z, a: float, b: float, c: float):
    return x.mul_(a).add_(y, alpha=b).add_(z, alpha=c)


def make_compiled():
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(eager_chain)


def time_cell(device, dtype, n, backends, compiled, timer):
    """Seconds per call of every implementation at one (dtype, size), and of the copy."""
    gpu = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, dtype=dtype, generator=gen)
    y = torch.randn(n, device=device, dtype=dtype, generator=gen)
    z = torch.randn(n, device=device, dtype=dtype, generator=gen)
    coef = {"forward": torch.tensor(FORWARD, device=device),
            "inverse": torch.tensor(INVERSE, device=device)}
    impls = {}
    for backend in backends:
        impls[(backend, "forward")] = \
            lambda b=backend: bk.lincomb3_(x, y, z, coef["forward"], backend=b)
        impls[(backend, "inverse")] = \
            lambda b=backend: bk.lincomb3_inverse_(x, y, z, coef["inverse"], backend=b)
        if backend in ("cpu", "cuda"):
            impls[(f"{backend}:op", "forward")] = lambda: torch.ops.belm.lincomb_ext(
                [x], None, [y, z], coef["forward"], False)
    impls[("eager", "forward")] = lambda: eager_chain(x, y, z, *FORWARD)
    if compiled is not None:
        impls[("compile", "forward")] = lambda: compiled(x, y, z, *FORWARD)
    # The copy moves the op's byte count: 2n elements read, 2n written.
    src = torch.randn(2 * n, device=device, dtype=dtype, generator=gen)
    dst = torch.empty_like(src)
    times = timer.measure_all({**impls, ("copy", "copy"): lambda: dst.copy_(src)})
    copy_time = times.pop(("copy", "copy"))
    if gpu and n <= GRAPH_MAX:
        for (impl, direction), fn in impls.items():
            try:
                graph = graph_of(fn)
            except Exception as exc:  # e.g. an implementation that cannot be captured
                print(f"  no CUDA graph for {impl}: {type(exc).__name__}: {exc}")
                continue
            times[(f"{impl}@graph", direction)] = timer(graph.replay)
    return times, copy_time


def run(args) -> list[dict]:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    timer = GpuTimer(25 if args.quick else 100) if gpu else CpuTimer(0.1 if args.quick else 0.4)
    backends = bk.available_backends(device)
    skipped = {}
    if not gpu and "triton" in backends:
        backends.remove("triton")
        skipped["triton"] = ("runs through the Triton interpreter on CPU "
                             "(a test path, not a fast one)")
    compiled = None if args.no_compile else make_compiled()
    rows = []
    started = time.perf_counter()
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        if compiled is not None:
            torch._dynamo.reset()
            compiled = make_compiled()
        for n in args.sizes:
            nbytes = 4 * n * torch.empty((), dtype=dtype).element_size()  # x, y, z in; x out
            times, copy_time = time_cell(device, dtype, n, backends, compiled, timer)
            copy_gbs = nbytes / copy_time / 1e9
            for (impl, direction), t in times.items():
                base = impl.split("@")[0].split(":")[0]
                graph = impl.endswith("@graph")
                eager = times.get(("eager@graph" if graph else "eager", "forward"))
                comp = times.get(("compile@graph" if graph else "compile", "forward"))
                rows.append({
                    "device": device.type, "dtype": dname, "numel": n, "size": fmt_size(n),
                    "impl": impl, "backend": base, "direction": direction,
                    "time_us": t * 1e6, "gbps": nbytes / t / 1e9,
                    "pct_copy": 100 * nbytes / t / 1e9 / copy_gbs,
                    "speedup_vs_eager": (eager / t) if eager else float("nan"),
                    "speedup_vs_compile": (comp / t) if comp else float("nan"),
                    "copy_gbps": copy_gbs,
                })
            best = max((r for r in rows if r["numel"] == n and r["dtype"] == dname),
                       key=lambda r: r["gbps"])
            print(f"{dname:>9} {fmt_size(n):>5}: copy {copy_gbs:7.1f} GB/s | "
                  + " | ".join(f"{impl}{'' if d == 'forward' else '-inv'} {nbytes / t / 1e9:6.1f}"
                               for (impl, d), t in times.items())
                  + f"  (best {best['impl']}; {time.perf_counter() - started:.0f} s)", flush=True)
            if gpu:
                torch.cuda.empty_cache()
    args.skipped = skipped
    return rows


# --------------------------------------------------------------------------------------------
# Output.


def write_csv(path: Path, rows: list[dict], info: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        for k, v in info.items():
            f.write(f"# {k}: {v}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_plot(path: Path, rows: list[dict], info: dict[str, str], dtypes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.2 * len(dtypes), 4.4), squeeze=False,
                             sharey=True)
    for ax, dname in zip(axes[0], dtypes, strict=True):
        sub = [r for r in rows if r["dtype"] == dname]
        impls = sorted({(r["impl"], r["direction"]) for r in sub},
                       key=lambda k: (k[0].endswith("@graph"), k[1], k[0]))
        for impl, direction in impls:
            pts = sorted((r["numel"], r["gbps"]) for r in sub
                         if r["impl"] == impl and r["direction"] == direction)
            style = "--" if direction == "inverse" else (":" if impl.endswith("@graph") else "-")
            label = impl + (" (inverse)" if direction == "inverse" else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                    label=label)
        copy = sorted({(r["numel"], r["copy_gbps"]) for r in sub})
        ax.plot([p[0] for p in copy], [p[1] for p in copy], color="black", lw=2.5, alpha=0.35,
                label="copy (same bytes)")
        ax.set_xscale("log", base=2)
        ax.set_title(dname)
        ax.set_xlabel("elements")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (3 reads + 1 write)")
    axes[0][-1].legend(fontsize=7, loc="best")
    extra = f"{info['driver']}" if "driver" in info else f"{info['torch_threads']} threads"
    fig.suptitle(f"lincomb3_ on {info['device']} ({extra}); torch {info['torch']}, "
                 f"triton {info['triton']}, python {info['python']}, {info['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_markdown(path: Path, rows: list[dict], info: dict[str, str], args, csv_name: str,
                   png_name: str, elapsed: float) -> None:
    lines = [f"# lincomb3_ benchmark: {info['device']}", ""]
    for k, v in info.items():
        lines.append(f"- **{k}**: {v}")
    lines += [f"- **command**: `python bench/bench_ops.py {' '.join(sys.argv[1:])}`".rstrip(),
              f"- **run time**: {elapsed:.0f} s", ""]
    lines += ["Bandwidth counts 3 reads + 1 write per element for every implementation; "
              "`% copy` is relative to `dst.copy_(src)` moving the same bytes on this device. "
              "`eager` is `x.mul_(a).add_(y, alpha=b).add_(z, alpha=c)`, `compile` is "
              "torch.compile of it; `<backend>:op` is the raw torch.ops call without the Python "
              "checks. Speedups are time(eager or compile forward) / time(impl).", ""]
    if info.get("gpu") is None:
        lines += ["On a CPU, `copy_` writes lines it never read, so the cache first fetches each "
                  "destination line (write-allocate): its true traffic is 3 transfers per 2 "
                  "counted, while the in-place op's is exactly the 4 counted. That is why an "
                  "in-place kernel can exceed 100% of copy here.", ""]
    for name, why in getattr(args, "skipped", {}).items():
        lines.append(f"Not timed: `{name}` ({why}).")
    lines += [f"![GB/s vs size]({png_name})", "", f"Raw numbers: [{csv_name}]({csv_name})", ""]

    target = {impl: [r for r in rows if r["impl"] == impl and r["direction"] == "forward"
                     and r["dtype"] == "float32" and r["numel"] == 2 ** 24]
              for impl in ("cpu", "cpu:op")}
    if target["cpu"]:
        lines += ["## CPU target: >= 1.8x the eager chain at 16M float32 elements", ""]
        for impl, what in (("cpu", "public `lincomb3_(..., backend='cpu')`"),
                           ("cpu:op", "raw op `torch.ops.belm.lincomb_ext`")):
            if target[impl]:
                t = target[impl][0]
                verdict = "meets" if t["speedup_vs_eager"] >= 1.8 else "MISSES"
                lines.append(f"- {what} on {info['torch_threads']} threads: "
                             f"**{t['speedup_vs_eager']:.2f}x** the eager chain "
                             f"({t['gbps']:.1f} GB/s, {t['pct_copy']:.0f}% of copy): {verdict} "
                             "the target.")
        lines.append("")

    for dname in args.dtypes:
        sub = [r for r in rows if r["dtype"] == dname]
        if not sub:
            continue
        impls = []
        for r in sub:
            key = (r["impl"], r["direction"])
            if key not in impls:
                impls.append(key)
        lines += [f"## {dname}", "", "GB/s (and % of copy):", ""]
        header = ["size", "copy"] + [i + ("-inv" if d == "inverse" else "") for i, d in impls]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for n in args.sizes:
            cells = [r for r in sub if r["numel"] == n]
            if not cells:
                continue
            row = [fmt_size(n), f"{cells[0]['copy_gbps']:.1f}"]
            for impl, d in impls:
                hit = [r for r in cells if r["impl"] == impl and r["direction"] == d]
                row.append(f"{hit[0]['gbps']:.1f} ({hit[0]['pct_copy']:.0f}%)" if hit else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        shown = [b for b in ("cpu", "cpu:op", "cuda", "cuda:op", "triton", "torch")
                 if any(r["impl"] == b for r in sub)]
        shown += [f"{b}@graph" for b in shown if any(r["impl"] == f"{b}@graph" for r in sub)]
        if shown:
            lines += ["Forward time in µs, speedup vs eager / vs compile:", ""]
            header = ["size"] + shown
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for n in args.sizes:
                row = [fmt_size(n)]
                for impl in shown:
                    hit = [r for r in sub if r["numel"] == n and r["impl"] == impl
                           and r["direction"] == "forward"]
                    if hit:
                        h = hit[0]
                        row.append(f"{h['time_us']:.1f} µs, {h['speedup_vs_eager']:.2f}x / "
                                   f"{h['speedup_vs_compile']:.2f}x")
                    else:
                        row.append("")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32",
                        help="comma-separated subset of float16,bfloat16,float32")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated element counts, e.g. 16K,1M,16M (default: 16K..64M "
                             "in powers of 4 on CPU, 16K..256M on GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and shorter timings (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
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
    if args.sizes:
        args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    else:
        sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
        args.sizes = sizes[::2] if args.quick else sizes

    info = stamp(device)
    print(f"device: {info['device']}; backends: {bk.available_backends(device)}; "
          f"torch {info['torch']}, triton {info['triton']}, python {info['python']}", flush=True)
    started = time.perf_counter()
    rows = run(args)
    elapsed = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device, info) + args.tag
    csv_path = args.out_dir / f"ops_{slug}.csv"
    png_path = args.out_dir / f"ops_{slug}.png"
    md_path = args.out_dir / f"ops_{slug}.md"
    write_csv(csv_path, rows, info)
    write_plot(png_path, rows, info, args.dtypes)
    write_markdown(md_path, rows, info, args, csv_path.name, png_path.name, elapsed)
    print(f"wrote {csv_path}, {png_path}, {md_path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
