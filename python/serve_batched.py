"""Serve a mixed stream of requests through one UNet with classifier-free guidance.

    python python/serve_batched.py                   # tiny random SD pipeline, offline, CPU
    python python/serve_batched.py --model runwayml/stable-diffusion-v1-5 --device cuda \\
        --size 64 --capacity 16

The requests differ in sampler -- the diffusers schedulers people run (DPM++ 2M Karras, UniPC,
Euler ancestral with its own seed), fused, next to O-BELM, BDIA and DDIM -- in number of steps,
direction (sampling from noise, or inverting clean latents exactly) and prompt. A BatchedStepper
with room for --capacity of them runs the stream: every tick is ONE UNet call on the stacked
batch (doubled for guidance) with a per-sample timestep tensor (Euler's inputs scaled per
sample), and one fused op per group of requests that share a layout, with per-sample coefficient
rows; a new request joins as soon as a slot frees up. When an exact inversion finishes, a
regeneration from its pair joins the stream, and gives the clean latents back.

Afterwards every request is checked against its sampler run on that request alone: the plain
sampler (``sampler.sample`` / ``sampler.invert``), or the fused scheduler in a pipeline's loop
(``scale_model_input``, the UNet, ``step`` with the request's seed). The stepper takes the very
same steps, so the only difference is the UNet itself: its kernels may round differently for a
batch of 8 than for a batch of 2. In float64 (the default) that is ~1e-16 per call; guidance and
the exact inversion amplify it over the steps, but by far less than the 1e8 that the check
allows (2e-8), while a wrong coefficient, timestep, buffer role, noise draw or prompt gives
differences of order 1e-3 and more. In float32 the same rounding differences are ~1e-7 per call
and the inversion amplifies them (up to ~1e-3 for a 5-step O-BELM inversion here), so a float32
run only prints them.
"""

import argparse
import copy
import functools
import random
import time

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)

import belm_kernels as bk
from belm_kernels.diffusers import fuse, tiny_stable_diffusion_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers SD model id or path (default: tiny random)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
parser.add_argument("--size", type=int, default=8, help="latent side")
parser.add_argument("--capacity", type=int, default=4, help="requests stepped at once")
parser.add_argument("--requests", type=int, default=9)
parser.add_argument("--guidance", type=float, default=3.0)
args = parser.parse_args()
dtype, device = getattr(torch, args.dtype), torch.device(args.device)

if args.model:
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
else:
    pipe = tiny_stable_diffusion_pipeline()
pipe = pipe.to(device=device, dtype=dtype)
unet, config = pipe.unet, pipe.scheduler.config
schedule = bk.Schedule.from_betas(config.beta_start, config.beta_end, config.beta_schedule,
                                  config.num_train_timesteps)
shape = (unet.config.in_channels, args.size, args.size)


@torch.no_grad()
def guided_unet(x, t, cond):
    """The stepper's model: x (B, C, H, W), t (B,) timesteps, cond (B, 2, L, D) holding each
    request's [negative, prompt] embeddings. Guidance as in the SD pipeline's loop."""
    out = unet(torch.cat([x, x]), torch.cat([t, t]),
               encoder_hidden_states=torch.cat([cond[:, 0], cond[:, 1]])).sample
    uncond, text = out.chunk(2)
    return uncond + args.guidance * (text - uncond)


@functools.cache
def embed(prompt):
    text, negative = pipe.encode_prompt(prompt, device, 1, True, negative_prompt="")
    return torch.stack([negative[0], text[0]])


# The stream: (sampler, direction, latents, prompt, options); clean latents stand in for VAE
# encodings. The diffusers schedulers come from the pipeline's config (its betas: its timesteps
# mean the UNet's noise levels), each with its number of steps and, if it draws noise, a seed.
rng, gen = random.Random(0), torch.Generator().manual_seed(0)
prompts = ["a red fox", "a watercolor city", "a cat on a sofa", "mountains at dawn"]
kinds = [
    lambda: (fuse(DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)),
             "sample", {"num_inference_steps": 20}),
    lambda: (bk.get_sampler("obelm", schedule, rng.randint(3, 6)), "invert", {}),
    lambda: (fuse(UniPCMultistepScheduler.from_config(config)), "sample",
             {"num_inference_steps": 8}),
    lambda: (bk.get_sampler("bdia", schedule, rng.randint(3, 6)), "sample", {}),
    lambda: (fuse(EulerAncestralDiscreteScheduler.from_config(config)), "sample",
             {"num_inference_steps": rng.randint(4, 8), "seed": rng.randrange(1 << 30)}),
    lambda: (bk.get_sampler("ddim", schedule, rng.randint(3, 6)), "invert", {}),
]
stream = []
for k in range(args.requests):
    sampler, direction, options = kinds[k % len(kinds)]()
    stream.append((sampler, direction, torch.randn(shape, generator=gen).to(device, dtype),
                   rng.choice(prompts), options, None))


def kind(req):
    return getattr(req.sampler, "name", None) or type(req.sampler).__bases__[-1].__name__


# Float model times: Euler's timesteps are fractional (a UNet takes them as they are).
stepper = bk.BatchedStepper(guided_unet, schedule, shape, capacity=args.capacity, dtype=dtype,
                            device=device, cond_shape=embed("").shape, time_dtype=torch.float64)
jobs = {}  # request -> what it was given, for the check
queue, ticks, start = list(stream), 0, time.perf_counter()
while queue or len(stepper):
    while queue and stepper.free:
        sampler, direction, x, prompt, options, x_T2 = queue.pop(0)
        options = dict(options)
        seed = options.pop("seed", None)
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        req = stepper.add(x, sampler, direction, x_T2=x_T2, cond=embed(prompt),
                          generator=generator, **options)
        jobs[req] = (x, prompt, x_T2, seed)
    for req in stepper.tick():
        print(f"tick {ticks:2d}: {req.name} done ({kind(req)}, {req.direction}, "
              f"{req.num_steps} steps)")
        if req.direction == "invert" and req.sampler.name != "ddim":  # regenerate exactly
            queue.append((req.sampler, "sample", req.result[0], jobs[req][1], {}, req.result[1]))
    ticks += 1
print(f"{len(jobs)} requests, {ticks} ticks (= batched UNet calls), "
      f"{sum(r.num_steps for r in jobs)} request-steps, {time.perf_counter() - start:.1f} s")

def scheduler_alone(req, x, cond, seed):
    """The request's fused scheduler alone on it, as a pipeline's denoising loop runs it."""
    s = copy.deepcopy(req.sampler)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    kwargs = {"generator": generator} if "generator" in s.step.__code__.co_varnames else {}
    x = x[None]
    for t in s.timesteps:
        out = guided_unet(s.scale_model_input(x, t), t.to(device, torch.float64).expand(1), cond)
        x = s.step(out, t, x, **kwargs).prev_sample
    return x[0]


# The check: each request against its sampler on that request alone.
tol = 1e8 * torch.finfo(torch.float64).eps
worst = 0.0
for req, (x, prompt, x_T2, seed) in jobs.items():
    cond = embed(prompt)[None]

    def eps_fn(x, t, cond=cond):  # bound now: called only within this iteration
        return guided_unet(x, torch.full((x.shape[0],), t, device=device), cond)

    if not isinstance(req.sampler, bk.Sampler):
        expected, got = [scheduler_alone(req, x, cond, seed)], [req.result]
    elif req.direction == "sample":
        expected = [req.sampler.sample(eps_fn, x[None], None if x_T2 is None else x_T2[None])[0]]
        got = [req.result]
    else:
        expected = [t[0] for t in req.sampler.invert(eps_fn, x[None])]
        got = list(req.result)
    diff = max(float((g - e).norm() / e.norm()) for g, e in zip(got, expected, strict=True))
    worst = max(worst, diff)
    same = all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    print(f"{req.name:>4} {kind(req):32} {req.direction:6} {req.num_steps:2d} steps  "
          f"vs alone: {'identical to the bit' if same else f'rel. diff {diff:.1e}'}")
    if x_T2 is not None:  # a regeneration from an inverted pair: did it give x0 back?
        source = next(r for r, (x0, *_) in jobs.items()
                      if r.direction == "invert" and r.result[0] is x)
        x0 = jobs[source][0]
        print(f"      regenerated {source.name}'s latents: rel. error "
              f"{float((req.result - x0).norm() / x0.norm()):.1e}")
if dtype != torch.float64:
    print(f"worst rel. diff {worst:.1e}: float32 rounding of the batched UNet, amplified over the "
          "steps (an exact inversion by up to 1/a per step); check in float64 (the default)")
elif worst > tol:
    raise SystemExit(f"MISMATCH: a request differs from the plain sampler by {worst:.1e}")
else:
    print(f"every request matches the plain sampler or fused scheduler run alone (worst rel. "
          f"diff {worst:.1e} <= {tol:.0e})")
