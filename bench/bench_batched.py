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
2. Per-step overhead (the MLP). B requests on a 1000-step O-BELM grid (all sampling, or half
   sampling and half inverting: two op launches per tick); a tick's time minus the time of the
   bare model call on tensors of the same shapes is the stepper's overhead per step (gathering
   this tick's rows and timesteps, the fused update(s), the step-index increment, the host
   bookkeeping); medians of interleaved samples.
   Eager on any device; on a GPU also under CUDA-graph replay (the tick replayed, against the
   model alone replayed), with the target of at most 3 us of overhead per step.

Writes bench/results/batched_<device-slug>.csv and .md, stamped (bench/stamp.py).

    python bench/bench_batched.py                       # CPU unless a GPU is present
    python bench/bench_batched.py --device cuda         # adds the graph columns
    python bench/bench_batched.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
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


def make_stream(n, shape, device, seed=0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    jobs = []
    for k in range(n):
        method = rng.choice(["obelm", "bdia", "ddim"])
        sampler = bk.get_sampler(method, SCHED, rng.randint(10, 30))
        jobs.append((sampler, "sample" if k % 2 == 0 else "invert",
                     torch.randn(shape, generator=gen).to(device)))
    return jobs


def serve_one_by_one(model, jobs, cond, device):
    extra = () if cond is None else (cond[None],)
    for sampler, direction, x in jobs:
        def eps_fn(x, t):
            return model(x, torch.full((1,), t, device=device), *extra)
        if direction == "sample":
            sampler.sample(eps_fn, x[None])
        else:
            sampler.invert(eps_fn, x[None])
    return sum(s.num_steps for s, _, _ in jobs)


def serve_batched(model, jobs, cond, device, shape, capacity, graph=False, stepper=None):
    st = stepper or BatchedStepper(model, SCHED, shape, capacity=capacity, device=device,
                                   cond_shape=None if cond is None else cond.shape)
    extra = {} if cond is None else {"cond": cond}
    queue, ticks = list(jobs), 0
    while queue or len(st):
        while queue and st.free:
            sampler, direction, x = queue.pop(0)
            st.add(x, sampler, direction, **extra)
        st.tick(graph=graph)
        ticks += 1
    return ticks, st


def throughput(case, device, num_requests, capacities, repeats):
    name, model, shape, cond = case
    jobs = make_stream(num_requests, shape, device)
    request_steps = sum(s.num_steps for s, _, _ in jobs)
    variants = {"per-request loop": lambda: serve_one_by_one(model, jobs, cond, device)}
    for c in capacities:
        variants[f"batched, capacity {c}"] = (
            lambda c=c: serve_batched(model, jobs, cond, device, shape, c)[0])
    if device.type == "cuda":
        for c in capacities:  # graphs captured on a first pass, the timed passes only replay
            _, warm = serve_batched(model, jobs, cond, device, shape, c, graph=True)
            variants[f"batched + CUDA graphs, capacity {c}"] = (
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
        rows.append({"part": "throughput", "model": name, "variant": v,
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
    oh = [r for r in rows if r["part"] == "overhead"]
    lines = [f"# Batched stepper on {info['device']}", "",
             "  ".join(f"{k}: {v}" for k, v in info.items()), "",
             "## Throughput: a stream of requests, batched vs one at a time", "",
             "Requests: O-BELM / BDIA / DDIM, 10-30 steps, half sampling and half inverting; "
             "median wall time for the whole stream; `speedup` is over the per-request loop.", "",
             "| model | variant | requests | request-steps | model calls | s | req/s | "
             "request-steps/s | speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['requests']} | {r['request_steps']} | "
              f"{r['model_calls']} | {r['seconds']} | {r['requests_per_s']} | "
              f"{r['request_steps_per_s']} | {r['speedup']} |" for r in tp]
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
    rows = []
    with torch.no_grad():
        for case in cases:
            rows += throughput(case, device, args.requests,
                               [int(c) for c in args.capacities.split(",")], args.repeats)
        for batch in [int(b) for b in args.batches.split(",")]:  # the small model only
            for mixed in (False, True) if batch > 1 else (False,):
                for graph in (False, True) if device.type == "cuda" else (False,):
                    rows.append(overhead(cases[0], device, batch, mixed, graph, ticks))
    command = "python bench/bench_batched.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    for path in write(rows, info, device_slug(device, info) + args.tag, args.out_dir,
                      command.strip()):
        print("wrote", path)


if __name__ == "__main__":
    main()
