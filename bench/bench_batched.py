"""Throughput of the batched stepper against a per-request loop; per-step overhead, eager vs graph.

1. Throughput (any device). A stream of requests -- O-BELM / BDIA / DDIM, 10 to 30 steps, half
   sampling from noise and half inverting clean latents exactly -- served
   * "per-request loop": one request after the other with the plain sampler (a model call per
     step at batch 1, the way a sampler runs a single request), and
   * "batched, capacity C": a BatchedStepper with C slots, each request joining as soon as a slot
     frees up (continuous batching: one model call per tick on up to C stacked requests),
   for two small models: an MLP noise predictor on 4x16x16 latents, and the tiny random Stable
   Diffusion UNet with classifier-free guidance (4x8x8 latents, 77-token prompts; needs
   diffusers). Reported: wall time for the whole stream, requests/s, request-steps/s, model
   calls, and the speed-up over the per-request loop (median of --repeats interleaved runs). On
   a GPU the batched stepper also runs with ``graph=True`` (timed on a second pass over the same
   stream, when every layout's graph is already captured).
   The same for a *mixed* stream of the samplers people run (needs diffusers): DPM++ 2M Karras at
   20 steps, UniPC at 8, Euler ancestral (each with its own seeded generator), LCM at 4, Euler,
   DDIM with eta, next to O-BELM inversions and samplings. The per-request loop runs each one
   alone as a pipeline does (its fused scheduler: ``scale_model_input``, the model, ``step``;
   or the plain BELM sampler); the stepper runs them with its groups merged (the default
   ``merge_bytes``) and with one group per layout (``merge_bytes=0``).
2. Per-step overhead (the MLP). B requests on a 1000-step O-BELM grid (all sampling, or half
   sampling and half inverting: two op launches per tick); a tick's time minus the time of the
   bare model call on tensors of the same shapes is the stepper's overhead per step (gathering
   this tick's rows and timesteps, the fused update(s), the step-index increment, the host
   bookkeeping); medians of interleaved samples.
   Eager on any device; on a GPU also under CUDA-graph replay (the tick replayed, against the
   model alone replayed), with the target of at most 3 us of overhead per step.
3. Group merging (needs diffusers). A stepper's own cost per tick (its model returns a precomputed
   prediction) for 16 requests of five layouts (O-BELM, DPM++ 2M, UniPC, Euler a, Euler: five
   ops per tick) against the same requests in one merged, zero-padded group (one op, more
   memory traffic), at several latent sizes; the extra traffic is what ``merge_bytes`` weighs
   against an op launch. Eager; on a GPU also graph-replayed.

Writes bench/results/batched_<device-slug>.csv and .md, stamped (bench/stamp.py).

    python bench/bench_batched.py                       # CPU unless a GPU is present
    python bench/bench_batched.py --device cuda         # adds the graph columns
    python bench/bench_batched.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stamp import device_slug, stamp  # noqa: E402

import belm_kernels as bk  # noqa: E402
from belm_kernels.batched import BatchedStepper  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCHED = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ models


class TimeMLP(torch.nn.Module):
    """eps(x, t): sinusoidal timestep features + a 2-layer MLP over the flattened latents."""

    def __init__(self, shape, hidden=512):
        super().__init__()
        dim = math.prod(shape)
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(16) / 16))
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 32, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        angles = t[:, None].to(x.dtype) * self.freqs.to(x.dtype)
        h = torch.cat([x.flatten(1), angles.sin(), angles.cos()], dim=1)
        return self.net(h).view_as(x)


def mlp_case(device):
    shape = (4, 16, 16)
    torch.manual_seed(0)
    return "MLP 4x16x16", TimeMLP(shape).to(device), shape, None


def unet_case(device, guidance=3.0):
    from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(device=device)
    unet = pipe.unet
    text, negative = pipe.encode_prompt("a red fox", device, 1, True, negative_prompt="")
    cond = torch.stack([negative[0], text[0]])

    def model(x, t, cond):
        out = unet(torch.cat([x, x]), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([cond[:, 0], cond[:, 1]])).sample
        uncond, txt = out.chunk(2)
        return uncond + guidance * (txt - uncond)

    return "tiny SD UNet + CFG 4x8x8", model, (4, 8, 8), cond


# ------------------------------------------------------------------------------ 1. throughput

# An SD 1.5-style scheduler config with the model's betas and integer ("leading") timesteps.
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                 set_alpha_to_one=False, clip_sample=False)


class Job:
    """One request of a stream: a BELM sampler, or a diffusers scheduler with its options."""

    def __init__(self, sampler, direction, x, options=None, seed=None):
        self.sampler, self.direction, self.x = sampler, direction, x
        self.options, self.seed = options or {}, seed

    @property
    def steps(self) -> int:
        return self.options.get("num_inference_steps") or self.sampler.num_steps

    def generator(self):
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def make_stream(n, shape, device, seed=0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    jobs = []
    for k in range(n):
        method = rng.choice(["obelm", "bdia", "ddim"])
        sampler = bk.get_sampler(method, SCHED, rng.randint(10, 30))
        jobs.append(Job(sampler, "sample" if k % 2 == 0 else "invert",
                        torch.randn(shape, generator=gen).to(device)))
    return jobs


def make_mixed_stream(n, shape, device, seed=0):
    """The samplers people run, next to O-BELM inversions and samplings."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        UniPCMultistepScheduler,
    )

    from belm_kernels.diffusers import fuse

    kinds = [
        lambda r: (DPMSolverMultistepScheduler.from_config(SD_CONFIG, use_karras_sigmas=True),
                   {"num_inference_steps": 20}),
        lambda r: (UniPCMultistepScheduler.from_config(SD_CONFIG), {"num_inference_steps": 8}),
        lambda r: (EulerAncestralDiscreteScheduler.from_config(SD_CONFIG),
                   {"num_inference_steps": r.randint(10, 30)}),
        lambda r: (LCMScheduler.from_config(SD_CONFIG), {"num_inference_steps": 4}),
        lambda r: (EulerDiscreteScheduler.from_config(SD_CONFIG),
                   {"num_inference_steps": r.randint(10, 30)}),
        lambda r: (DDIMScheduler.from_config(SD_CONFIG),
                   {"num_inference_steps": r.randint(10, 30), "eta": 0.5}),
        lambda r: (bk.get_sampler("obelm", SCHED, r.randint(10, 20)), "invert"),
        lambda r: (bk.get_sampler(r.choice(["obelm", "bdia"]), SCHED, r.randint(10, 30)),
                   "sample"),
    ]
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    jobs = []
    for k in range(n):
        sampler, how = kinds[k % len(kinds)](rng)
        x = torch.randn(shape, generator=gen).to(device)
        if isinstance(how, str):
            jobs.append(Job(sampler, how, x))
        else:
            jobs.append(Job(fuse(sampler), "sample", x, how, seed=k))
    return jobs


def _run_alone(job, model, extra, device):
    """One scheduler request the way a pipeline's loop runs it (batch 1)."""
    s = copy.deepcopy(job.sampler)
    grid = {k: v for k, v in job.options.items() if k != "eta"}
    step_kwargs = {k: v for k, v in job.options.items() if k == "eta"}
    s.set_timesteps(**grid)
    if "generator" in s.step.__code__.co_varnames:
        step_kwargs["generator"] = job.generator()
    x = job.x[None]
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
        out = model(x_in, t.to(device=device, dtype=torch.long).expand(1), *extra)
        x = s.step(out, t, x, **step_kwargs).prev_sample
    return x


def serve_one_by_one(model, jobs, cond, device):
    extra = () if cond is None else (cond[None],)
    for job in jobs:
        if job.options:
            _run_alone(job, model, extra, device)
            continue

        def eps_fn(x, t):
            return model(x, torch.full((1,), t, device=device), *extra)
        if job.direction == "sample":
            job.sampler.sample(eps_fn, job.x[None])
        else:
            job.sampler.invert(eps_fn, job.x[None])
    return sum(j.steps for j in jobs)


def serve_batched(model, jobs, cond, device, shape, capacity, graph=False, stepper=None,
                  merge_bytes=None):
    st = stepper or BatchedStepper(model, SCHED, shape, capacity=capacity, device=device,
                                   cond_shape=None if cond is None else cond.shape,
                                   merge_bytes=merge_bytes)
    extra = {} if cond is None else {"cond": cond}
    queue, ticks = list(jobs), 0
    while queue or len(st):
        while queue and st.free:
            job = queue.pop(0)
            st.add(job.x, job.sampler, job.direction, generator=job.generator(), **extra,
                   **job.options)
        st.tick(graph=graph)
        ticks += 1
    return ticks, st


def throughput(case, device, num_requests, capacities, repeats, mixed=False):
    name, model, shape, cond = case
    jobs = (make_mixed_stream if mixed else make_stream)(num_requests, shape, device)
    request_steps = sum(j.steps for j in jobs)
    variants = {"per-request loop": lambda: serve_one_by_one(model, jobs, cond, device)}
    merges = [(None, ""), (0, ", a group per layout")] if mixed else [(None, "")]
    for c in capacities:
        for merge_bytes, label in merges:
            variants[f"batched, capacity {c}{label}"] = (
                lambda c=c, m=merge_bytes: serve_batched(model, jobs, cond, device, shape, c,
                                                         merge_bytes=m)[0])
    if device.type == "cuda":
        for c in capacities:  # graphs captured on a first pass, the timed passes only replay
            for merge_bytes, label in merges:
                _, warm = serve_batched(model, jobs, cond, device, shape, c, graph=True,
                                        merge_bytes=merge_bytes)
                variants[f"batched + CUDA graphs, capacity {c}{label}"] = (
                    lambda c=c, warm=warm: serve_batched(model, jobs, cond, device, shape, c,
                                                         graph=True, stepper=warm)[0])
    calls, times = {}, {v: [] for v in variants}
    for v, run in variants.items():  # warm-up pass (lazy initialisation, extension loading)
        calls[v] = run()
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every variant alike
        for v, run in variants.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times[v].append(time.perf_counter() - t0)
    base = statistics.median(times["per-request loop"])
    rows = []
    for v in variants:
        sec = statistics.median(times[v])
        rows.append({"part": "mixed" if mixed else "throughput", "model": name, "variant": v,
                     "requests": num_requests, "request_steps": request_steps,
                     "model_calls": calls[v], "seconds": round(sec, 4),
                     "min_seconds": round(min(times[v]), 4),
                     "requests_per_s": round(num_requests / sec, 2),
                     "request_steps_per_s": round(request_steps / sec, 1),
                     "speedup": round(base / sec, 2)})
        print(f"{name:26s} {v:38s} {sec:8.3f} s  {num_requests / sec:8.2f} req/s  "
              f"{calls[v]:5d} calls  x{base / sec:.2f}", flush=True)
    return rows


# ------------------------------------------------------------------------------ 2. overhead


def time_calls(fn, n, device):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def captured(fn, device):
    """fn captured into a CUDA graph (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def overhead(case, device, batch, mixed, graph, ticks):
    """Per-tick time with the model, of the model alone, and of the stepper alone (a tick whose
    model only returns a precomputed prediction): the overhead measured two ways."""
    name, model, shape, cond = case
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 500, device=device)
    args = (x, t) + (() if cond is None else (cond.expand(batch, *cond.shape).contiguous(),))
    eps = model(*args)
    sampler = bk.get_sampler("obelm", SCHED, 1000)
    steppers = []
    for m in (model, lambda x, *_: eps[:x.shape[0]]):
        gen = torch.Generator().manual_seed(1)
        st = BatchedStepper(m, SCHED, shape, capacity=batch, device=device,
                            cond_shape=None if cond is None else cond.shape)
        for i in range(batch):
            st.add(torch.randn(shape, generator=gen).to(device), sampler,
                   "invert" if mixed and i % 2 else "sample",
                   **({} if cond is None else {"cond": cond}))
        for _ in range(3):  # warm-up (and, with graph=True, the captures)
            st.tick(graph=graph)
        steppers.append(st)
    call = lambda: model(*args)  # noqa: E731
    call = captured(call, device) if graph else call
    call()
    fns = [lambda: steppers[0].tick(graph=graph), call, lambda: steppers[1].tick(graph=graph)]
    # Interleaved samples of `per` calls each, medians: robust to a noisy neighbour.
    per = 25 if device.type == "cuda" else 5
    samples = [[time_calls(fn, per, device) for fn in fns] for _ in range(max(1, ticks // per))]
    tick, alone, bare = (statistics.median(s[k] for s in samples) * 1e6 for k in range(3))
    row = {"part": "overhead", "model": name, "variant": "graph" if graph else "eager",
           "batch": batch, "layout": "sample + invert" if mixed else "sample",
           "tick_us": round(tick, 2), "model_us": round(alone, 2),
           "overhead_us": round(tick - alone, 2), "stepper_alone_us": round(bare, 2)}
    print(f"{name:14s} {row['variant']:6s} B={batch:3d} {row['layout']:16s} tick {tick:9.1f} us"
          f"  model {alone:9.1f} us  difference {tick - alone:8.1f} us  stepper alone "
          f"{bare:7.1f} us", flush=True)
    return row


# ------------------------------------------------------------------------------ 3. merging


def merging(device, shape, batch, graph, ticks):
    """Stepper-alone ticks of ``batch`` requests of five layouts: a group per layout against
    one merged group."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    eps = torch.randn(batch, *shape, device=device)
    kinds = [lambda: (bk.get_sampler("obelm", SCHED, 1000), {}),
             lambda: (DPMSolverMultistepScheduler.from_config(SD_CONFIG),
                      {"num_inference_steps": 1000}),
             lambda: (UniPCMultistepScheduler.from_config(SD_CONFIG),
                      {"num_inference_steps": 1000}),
             lambda: (EulerAncestralDiscreteScheduler.from_config(SD_CONFIG),
                      {"num_inference_steps": 1000, "generator": torch.Generator(device)}),
             lambda: (EulerDiscreteScheduler.from_config(SD_CONFIG),
                      {"num_inference_steps": 1000})]
    steppers = {}
    for label, merge_bytes in (("a group per layout", 0), ("merged", 1 << 62)):
        st = BatchedStepper(lambda x, t: eps[:x.shape[0]], SCHED, shape, capacity=batch,
                            device=device, merge_bytes=merge_bytes)
        for i in range(batch):
            sampler, options = kinds[i % len(kinds)]()
            st.add(torch.randn(shape, device=device), sampler, **options)
        for _ in range(9):  # warm-up, and with graph=True every phase of the rings captured
            st.tick(graph=graph)
        steppers[label] = st
    per = 25 if device.type == "cuda" else 5
    fns = [lambda st=st: st.tick(graph=graph) for st in steppers.values()]
    samples = [[time_calls(fn, per, device) for fn in fns] for _ in range(max(1, ticks // per))]
    sep, one = (statistics.median(s[k] for s in samples) * 1e6 for k in range(2))
    separate = steppers["a group per layout"]._groups
    moved = sum(sum(g.layout.shape) * (g.hi - g.lo) for g in separate)
    passes = sum(steppers["merged"]._groups[0].layout.shape) * batch
    extra = (passes - moved) * math.prod(shape) * 4
    row = {"part": "merging", "model": "x".join(map(str, shape)),
           "variant": "graph" if graph else "eager", "batch": batch, "groups": len(separate),
           "separate_us": round(sep, 2), "merged_us": round(one, 2), "extra_bytes": extra}
    print(f"merging {row['model']:10s} {row['variant']:6s} B={batch:3d} {row['groups']} groups "
          f"{sep:9.1f} us, merged {one:9.1f} us, extra traffic {extra / 1024:8.0f} KiB",
          flush=True)
    return row


# ------------------------------------------------------------------------------ output


def write(rows, info, slug, out_dir, command):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"batched_{slug}.csv"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tp = [r for r in rows if r["part"] == "throughput"]
    mx = [r for r in rows if r["part"] == "mixed"]
    oh = [r for r in rows if r["part"] == "overhead"]
    mg = [r for r in rows if r["part"] == "merging"]
    lines = [f"# Batched stepper on {info['device']}", "",
             "  ".join(f"{k}: {v}" for k, v in info.items()), "",
             "## Throughput: a stream of requests, batched vs one at a time", "",
             "Requests: O-BELM / BDIA / DDIM, 10-30 steps, half sampling and half inverting; "
             "median wall time for the whole stream; `speedup` is over the per-request loop.", "",
             "| model | variant | requests | request-steps | model calls | s | req/s | "
             "request-steps/s | speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def throughput_rows(rs):
        return [f"| {r['model']} | {r['variant']} | {r['requests']} | {r['request_steps']} | "
                f"{r['model_calls']} | {r['seconds']} | {r['requests_per_s']} | "
                f"{r['request_steps_per_s']} | {r['speedup']} |" for r in rs]

    lines += throughput_rows(tp)
    if mx:
        lines += ["", "## Throughput: a mixed stream of the samplers people run", "",
                  "Requests: DPM++ 2M Karras 20 steps, UniPC 8, Euler a 10-30 (seeded), LCM 4, "
                  "Euler 10-30, DDIM eta 0.5 10-30, O-BELM inversions 10-20 and O-BELM / BDIA "
                  "samplings 10-30. The per-request loop runs each alone as a pipeline does "
                  "(its fused scheduler, batch 1; or the plain sampler). `a group per layout`: "
                  "`merge_bytes=0` (one op per layout per tick); otherwise the default "
                  "`merge_bytes` merges compatible layouts.", "",
                  "| model | variant | requests | request-steps | model calls | s | req/s | "
                  "request-steps/s | speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|",
                  *throughput_rows(mx)]
    lines += ["", "## Per-step overhead of the stepper", "",
              "1000-step O-BELM requests; `sample + invert` runs two op launches per tick. "
              "`tick - model`: a tick's time minus the model call's alone (medians of "
              "interleaved samples); `stepper alone`: a tick whose model returns a precomputed "
              "prediction. `graph`: ticks and model replayed as CUDA graphs (target: at most "
              "3 us per step beyond the model). On a machine shared with other jobs (see "
              "load_average_at_start) `tick - model` is the difference of two noisy timings; "
              "`stepper alone` measures the overhead directly.", "",
              "| model | mode | batch | layout | tick us | model us | tick - model us | "
              "stepper alone us |", "|---|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['layout']} | {r['tick_us']} "
              f"| {r['model_us']} | {r['overhead_us']} | {r['stepper_alone_us']} |" for r in oh]
    if mg:
        lines += ["", "## Group merging: one op per layout, or one zero-padded op", "",
                  "A stepper's own tick (its model returns a precomputed prediction) for B "
                  "requests of five layouts (O-BELM, DPM++ 2M, UniPC, Euler a, Euler): one op "
                  "per layout, or one op over their merged layout, which reads and writes "
                  "`extra` more bytes per tick (zero terms and outputs). Merging pays where the "
                  "op launches it saves cost more than the extra traffic.", "",
                  "| latents | mode | batch | groups | a group per layout us | merged us | "
                  "extra KiB |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['variant']} | {r['batch']} | {r['groups']} | "
                  f"{r['separate_us']} | {r['merged_us']} | {r['extra_bytes'] / 1024:.0f} |"
                  for r in mg]
    lines += ["", f"Reproduce: `{command}`", ""]
    md_path = out_dir / f"batched_{slug}.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=24, help="requests in the stream")
    parser.add_argument("--capacities", default="4,16", help="stepper capacities to compare")
    parser.add_argument("--batches", default="1,16", help="batch sizes of the overhead part")
    parser.add_argument("--ticks", type=int, default=None,
                        help="ticks timed in the overhead part (default: 200 CPU, 500 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-unet", action="store_true", help="skip the diffusers UNet model")
    parser.add_argument("--merge-shapes", default="4x16x16,4x64x64,16x64x64",
                        help="latent shapes of the merging part")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ticks = args.ticks or (500 if device.type == "cuda" else 200)
    info = stamp(device)
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    cases = [mlp_case(device)]
    if not args.no_unet:
        cases.append(unet_case(device))
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
        print("diffusers is not installed: the mixed stream and the merging part are skipped")
    capacities = [int(c) for c in args.capacities.split(",")]
    graphs = (False, True) if device.type == "cuda" else (False,)
    rows = []
    with torch.no_grad():
        for case in cases:
            rows += throughput(case, device, args.requests, capacities, args.repeats)
        if have_diffusers:
            for case in cases:
                rows += throughput(case, device, args.requests, capacities, args.repeats,
                                   mixed=True)
        for batch in [int(b) for b in args.batches.split(",")]:  # the small model only
            for mixed in (False, True) if batch > 1 else (False,):
                for graph in graphs:
                    rows.append(overhead(cases[0], device, batch, mixed, graph, ticks))
        if have_diffusers:
            for shape in args.merge_shapes.split(","):
                for graph in graphs:
                    rows.append(merging(device, tuple(int(d) for d in shape.split("x")), 16,
                                        graph, ticks))
    command = "python bench/bench_batched.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    for path in write(rows, info, device_slug(device, info) + args.tag, args.out_dir,
                      command.strip()):
        print("wrote", path)


if __name__ == "__main__":
    main()
