"""Serve a stream of sampling and inversion requests through one UNet with classifier-free guidance.

    python python/serve_batched.py                   # tiny random SD pipeline, offline, CPU
    python python/serve_batched.py --model runwayml/stable-diffusion-v1-5 --device cuda \\
        --size 64 --capacity 16

The requests differ in method (O-BELM, BDIA, DDIM), number of steps, direction (sampling from
noise, or inverting clean latents exactly) and prompt. A BatchedStepper with room for --capacity
of them runs the stream: every tick is ONE UNet call on the stacked batch (doubled for guidance)
with a per-sample timestep tensor, and the fused update with per-sample coefficient rows; a new
request joins as soon as a slot frees up. When an exact inversion finishes, a regeneration from
its pair joins the stream, and gives the clean latents back.

Afterwards every request is checked against the plain sampler (``sampler.sample`` /
``sampler.invert``) run on that request alone. The stepper takes the very same steps, so the
only difference is the UNet itself: its kernels may round differently for a batch of 8 than for
a batch of 2. In float64 (the default) that is ~1e-16 per call; guidance and the exact
inversion amplify it over the steps, but by far less than the 1e8 that the check allows (2e-8),
while a wrong coefficient, timestep, buffer role or prompt gives differences of order 1e-3 and
more. In float32 the same rounding differences are ~1e-7 per call and the inversion amplifies
them (up to ~1e-3 for a 5-step O-BELM inversion here), so a float32 run only prints them.
"""

import argparse
import functools
import random
import time

import torch

import belm_kernels as bk
from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers SD model id or path (default: tiny random)")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
parser.add_argument("--size", type=int, default=8, help="latent side")
parser.add_argument("--capacity", type=int, default=4, help="requests stepped at once")
parser.add_argument("--requests", type=int, default=6)
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


# The stream: (sampler, direction, latents, prompt); clean latents stand in for VAE encodings.
rng, gen = random.Random(0), torch.Generator().manual_seed(0)
prompts = ["a red fox", "a watercolor city", "a cat on a sofa", "mountains at dawn"]
stream = []
for k in range(args.requests):
    method, direction = ["obelm", "bdia", "ddim"][k % 3], ["sample", "invert"][k % 2]
    sampler = bk.get_sampler(method, schedule, rng.randint(3, 6))
    stream.append((sampler, direction, torch.randn(shape, generator=gen).to(device, dtype),
                   rng.choice(prompts)))

stepper = bk.BatchedStepper(guided_unet, schedule, shape, capacity=args.capacity, dtype=dtype,
                         device=device, cond_shape=embed("").shape)
jobs = {}  # request -> what it was given, for the check
queue, ticks, start = list(stream), 0, time.perf_counter()
while queue or len(stepper):
    while queue and stepper.free:
        sampler, direction, x, prompt, *pair = queue.pop(0)
        req = stepper.add(x, sampler, direction, x_T2=pair[0] if pair else None,
                          cond=embed(prompt))
        jobs[req] = (x, prompt, pair[0] if pair else None)
    for req in stepper.tick():
        print(f"tick {ticks:2d}: {req.name} done ({req.sampler.name}, {req.direction}, "
              f"{req.num_steps} steps)")
        if req.direction == "invert" and req.sampler.name != "ddim":  # regenerate exactly
            queue.append((req.sampler, "sample", req.result[0], jobs[req][1], req.result[1]))
    ticks += 1
print(f"{len(jobs)} requests, {ticks} ticks (= batched UNet calls), "
      f"{sum(r.num_steps for r in jobs)} request-steps, {time.perf_counter() - start:.1f} s")

# The check: each request against the plain sampler on that request alone.
tol = 1e8 * torch.finfo(torch.float64).eps
worst = 0.0
for req, (x, prompt, x_T2) in jobs.items():
    cond = embed(prompt)[None]

    def eps_fn(x, t, cond=cond):  # bound now: called only within this iteration
        return guided_unet(x, torch.full((x.shape[0],), t, device=device), cond)

    if req.direction == "sample":
        expected = [req.sampler.sample(eps_fn, x[None], None if x_T2 is None else x_T2[None])[0]]
        got = [req.result]
    else:
        expected = [t[0] for t in req.sampler.invert(eps_fn, x[None])]
        got = list(req.result)
    diff = max(float((g - e).norm() / e.norm()) for g, e in zip(got, expected, strict=True))
    worst = max(worst, diff)
    same = all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    print(f"{req.name:>4} {req.sampler.name:5} {req.direction:6} {req.num_steps} steps  "
          f"vs plain sampler: {'identical to the bit' if same else f'rel. diff {diff:.1e}'}")
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
    print(f"every request matches the plain sampler (worst rel. diff {worst:.1e} <= {tol:.0e})")
