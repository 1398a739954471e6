"""Step cost of diffusers' schedulers against their fused versions (``bk.diffusers.fuse``).

For each scheduler, configured as SD 1.5 / SDXL / SD3 / Flux / Wan / LCM ship it, times
``latents = scheduler.step(model_output, t, latents).prev_sample`` over whole runs with a fixed
model output per step (only ``step`` timed: ``set_timesteps`` and the ``scale_model_input``
call a pipeline makes before each step are not), the original and its fused version
interleaved, and reports the median time per step, the speedup, and the top-level torch ops of a
step (torch profiler events without a parent: the ops called from Python, allocations included,
as the issue counted them; the maximum over the steps after the first, which also allocates the
fused scheduler's history). Shapes 1x4x64x64 and 8x4x128x128, float32, one thread on CPU.

On a GPU the runs are bracketed by ``torch.cuda.synchronize()`` and the fused run is also
captured whole in one CUDA graph and replayed (``graph us/step``); the originals cannot be
captured (they read timesteps and sigmas back to the host). The stochastic schedulers draw from a
generator on the tensors' device (graph capture: the default generator).

Targets (issue 17): every fused step at least 3x cheaper than the original on CPU at 1x4x64x64 --
or, where the original costs under 3x one bare op call (``bare op``: ``torch.add(x, y, alpha=a)``
on the same tensors), no slower than the original -- and at most 3 top-level ops per step.

The fused op runs on the compiled kernel of the device (``belm::lincomb_ext``, called by the
step directly: see ``FusedSchedulerMixin._direct_kernel``). A stochastic step draws its noise
exactly as the original does (same generator, shape, dtype and order, so seeded runs match); on
CPU at 8x4x128x128 that draw (``torch.randn``) is most of either step, so the speedup is what is
left around it.

    python bench/bench_fused.py                       # CPU (or the GPU if there is one)
    python bench/bench_fused.py --device cpu --repeats 7
    python bench/bench_fused.py --device cuda --out-dir OUT

Writes ``fused_<device-slug>.csv`` and ``.md`` (stamped: device, versions, date, load, backend).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines, off

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scheduler import _MALLOC_ENV, keep_malloc_pages

if __name__ == "__main__":
    keep_malloc_pages()

import argparse
import csv
import inspect
import logging
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from stamp import device_slug, stamp

import belm_kernels as bk
from belm_kernels.diffusers import fuse
from belm_kernels.ops import _resolve

RESULTS = ROOT / "bench" / "results"
SHAPES = [(1, 4, 64, 64), (8, 4, 128, 128)]

# The configs the models ship (as in tests/test_fused_schedulers.py).
SD15 = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
            num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
SDXL = dict(SD15, timestep_spacing="leading", interpolation_type="linear")
SD3 = dict(num_train_timesteps=1000, shift=3.0)
FLUX = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
WAN = dict(beta_end=0.02, beta_schedule="linear", beta_start=0.0001, flow_shift=3.0,
           prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
           solver_type="bh2")
LCM = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
           original_inference_steps=50, set_alpha_to_one=True, steps_offset=1,
           timestep_scaling=10.0, timestep_spacing="leading")

# name -> (class, config, steps, set_timesteps kwargs, step kwargs)
CASES = {
    "DDIM (SD 1.5)": (DDIMScheduler, SD15, 50, {}, {}),
    "DDIM eta=1 (SD 1.5)": (DDIMScheduler, SD15, 50, {}, {"eta": 1.0}),
    "DPM++ 2M (SD 1.5)": (DPMSolverMultistepScheduler, SD15, 50, {}, {}),
    "DPM++ 2M Karras (SDXL)": (DPMSolverMultistepScheduler, dict(SDXL, use_karras_sigmas=True),
                               30, {}, {}),
    "DPM++ 3M (SD 1.5)": (DPMSolverMultistepScheduler, dict(SD15, solver_order=3), 50, {}, {}),
    "DPM++ 2M SDE Karras (SD 1.5)": (
        DPMSolverMultistepScheduler,
        dict(SD15, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 30, {}, {}),
    "UniPC bh2 (SD 1.5)": (UniPCMultistepScheduler, SD15, 50, {}, {}),
    "UniPC flow (Wan 2.1)": (UniPCMultistepScheduler, WAN, 50, {}, {}),
    "Euler (SDXL)": (EulerDiscreteScheduler, SDXL, 50, {}, {}),
    "Euler a (SD 1.5)": (EulerAncestralDiscreteScheduler, SD15, 50, {}, {}),
    "LCM (LCM-Dreamshaper)": (LCMScheduler, LCM, 8, {}, {}),
    "FlowMatch Euler (SD3)": (FlowMatchEulerDiscreteScheduler, SD3, 28, {}, {}),
    "FlowMatch Euler (Flux dev)": (FlowMatchEulerDiscreteScheduler, FLUX, 28,
                                   dict(sigmas=np.linspace(1.0, 1 / 28, 28),
                                        mu=bk.calculate_shift(4096)), {}),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One scheduler (original or fused) stepping through whole runs on fixed inputs."""

    def __init__(self, scheduler, steps, ts_kwargs, step_kwargs, shape, device):
        self.scheduler = scheduler
        self.steps, self.ts_kwargs, self.step_kwargs = steps, ts_kwargs, step_kwargs
        self.device = device
        g = torch.Generator().manual_seed(0)
        self.x_T = torch.randn(shape, generator=g).to(device)
        self.outputs = [(0.5 * torch.randn(shape, generator=g)).to(device) for _ in range(steps)]
        self.scheduler.set_timesteps(steps, device=device, **ts_kwargs)
        self.takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters

    def start(self, graph: bool = False):
        """set_timesteps (not timed) and the step arguments of a run."""
        self.scheduler.set_timesteps(self.steps, device=self.device, **self.ts_kwargs)
        kwargs = dict(self.step_kwargs)
        if self.takes_generator and not graph:
            kwargs["generator"] = torch.Generator(self.device).manual_seed(1)
        return kwargs

    def loop(self, x, kwargs, on_step=None):
        s = self.scheduler
        for i, t in enumerate(s.timesteps):
            if hasattr(s, "scale_model_input"):
                s.scale_model_input(x, t)
            if on_step is None:
                x = s.step(self.outputs[i], t, x, **kwargs).prev_sample
            else:
                x = on_step(i, lambda x=x, i=i, t=t: s.step(self.outputs[i], t, x,
                                                            **kwargs).prev_sample)
        return x

    def time_run(self) -> float:
        """Seconds per ``step`` call over a run (``scale_model_input``, which a pipeline calls
        before each step and which sets the flag ``step`` checks, is called but not timed)."""
        kwargs = self.start()
        spent = 0.0

        def timed(i, step):
            nonlocal spent
            sync(self.device)
            t0 = time.perf_counter()
            x = step()
            sync(self.device)
            spent += time.perf_counter() - t0
            return x

        self.loop(self.x_T, kwargs, timed)
        return spent / self.steps

    def op_count(self) -> int:
        """Top-level torch ops of a step: the most over the steps after the first."""
        counts = []

        def profiled(i, step):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                x = step()
            if i:
                counts.append(sum(1 for e in prof.events() if e.cpu_parent is None))
            return x

        self.loop(self.x_T, self.start(), profiled)
        return max(counts)

    def graph(self):
        """The whole fused run captured in one CUDA graph; returns a replay timer."""
        x = self.x_T.clone()
        kwargs = self.start(graph=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: builds every table outside the capture
            self.loop(x, kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        kwargs = self.start(graph=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loop(x, kwargs)

        def replay() -> float:
            sync(self.device)
            t0 = time.perf_counter()
            graph.replay()
            sync(self.device)
            return (time.perf_counter() - t0) / self.steps

        return replay


def bare_op(shape, device, repeats: int) -> float:
    """Seconds of one bare op call on the same tensors: torch.add(x, y, alpha=a)."""
    x, y = torch.randn(shape, device=device), torch.randn(shape, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(50):
            torch.add(x, y, alpha=0.5)
        sync(device)
        times.append((time.perf_counter() - t0) / 50)
    return statistics.median(times)


def bench(device: torch.device, repeats: int, names: list[str]) -> list[dict]:
    rows = []
    for shape in SHAPES:
        bare = bare_op(shape, device, repeats)
        for name in names:
            cls, config, steps, ts_kwargs, step_kwargs = CASES[name]
            runners = {
                "original": Runner(cls.from_config(config), steps, ts_kwargs, step_kwargs,
                                   shape, device),
                "fused": Runner(fuse(cls.from_config(config)), steps, ts_kwargs, step_kwargs,
                                shape, device),
            }
            for r in runners.values():  # warm-up
                r.time_run()
            times = {k: [] for k in runners}
            for _ in range(repeats):
                for k, r in runners.items():
                    times[k].append(r.time_run())
            orig, fused = (statistics.median(times[k]) for k in ("original", "fused"))
            row = {
                "shape": "x".join(map(str, shape)), "scheduler": name, "steps": steps,
                "original_us": round(orig * 1e6, 1), "fused_us": round(fused * 1e6, 1),
                "speedup": round(orig / fused, 2),
                "original_ops": runners["original"].op_count(),
                "fused_ops": runners["fused"].op_count(),
                "bare_op_us": round(bare * 1e6, 1),
            }
            if device.type == "cuda":
                replay = runners["fused"].graph()
                replay()
                row["fused_graph_us"] = round(statistics.median(
                    replay() for _ in range(repeats)) * 1e6, 2)
            target = fused <= orig / 3 or (orig < 3 * bare and fused <= orig)
            row["target_met"] = "yes" if target and row["fused_ops"] <= 3 else "no"
            rows.append(row)
            print(f"{row['shape']:>12} {name:30s} original {row['original_us']:9.1f} us "
                  f"({row['original_ops']:3d} ops)  fused {row['fused_us']:9.1f} us "
                  f"({row['fused_ops']} ops)  x{row['speedup']:5.2f}"
                  + (f"  graph {row['fused_graph_us']} us" if "fused_graph_us" in row else ""),
                  flush=True)
    return rows


def write(rows, info, slug, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"fused_{slug}.csv"
    with open(csv_path, "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    graph = "fused_graph_us" in rows[0]
    lines = [
        f"# Fused schedulers against diffusers' on {info['device']}",
        "",
        "Time per `scheduler.step` (median over whole runs, fixed model outputs; set_timesteps "
        "and scale_model_input not timed), original and `belm_kernels.diffusers.fuse`d, and "
        "top-level torch ops per step (torch profiler; allocations and the noise draw "
        "included). `bare op`: one "
        "`torch.add(x, y, alpha=a)` on the same tensors. Target: fused <= original / 3, or no "
        "slower than the original where it costs under 3 bare ops; at most 3 ops per step."
        + (" `graph`: the whole fused run replayed from one CUDA graph, per step." if graph
           else ""),
        "",
        "  ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        "| shape | scheduler | steps | original us/step | fused us/step | speedup | original "
        "ops | fused ops |" + (" fused graph us/step |" if graph else "") + " bare op us | "
        "target met |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if graph else "") + "---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['scheduler']} | {r['steps']} | {r['original_us']} | "
            f"{r['fused_us']} | {r['speedup']} | {r['original_ops']} | {r['fused_ops']} |"
            + (f" {r['fused_graph_us']} |" if graph else "")
            + f" {r['bare_op_us']} | {r['target_met']} |")
    lines += ["", "Reproduce: `python bench/bench_fused.py`", ""]
    md_path = out_dir / f"fused_{slug}.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per scheduler and shape (default: 7 CPU, 20 GPU)")
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES),
                        help="schedulers to time (default: all)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--malloc", choices=["kept", "default"], default="kept",
                        help="CPU: keep freed memory in the process (default) or not")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 7)
    if device.type == "cpu":
        torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    malloc = "kept" if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()) else "default"
    backend = _resolve("auto", device, torch.float32).name
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    info = stamp(device, diffusers=diffusers.__version__, malloc=malloc if device.type == "cpu"
                 else "n/a", fused_op_backend=f"auto={backend}", commit=commit)
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    with torch.no_grad():
        rows = bench(device, repeats, args.only)
    slug = device_slug(device, info) + args.tag
    for path in write(rows, info, slug, args.out_dir):
        print("wrote", path)


if __name__ == "__main__":
    main()
