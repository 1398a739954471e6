"""Make the scheduler you already use faster: `pipe.scheduler = bk.diffusers.fuse(pipe.scheduler)`.

    python python/fused_scheduler.py                                   # tiny random SD, offline
    python python/fused_scheduler.py --scheduler euler_a --steps 30
    python python/fused_scheduler.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --scheduler dpm++2m-karras --prompt "a watercolor fox"

Generates the same seed twice, with the scheduler as diffusers gives it and fused, and prints how
far apart the two latents are (float32 rounding, which the model then carries along) and what one
scheduler step costs each way (the model excluded). Without --model a tiny random pipeline is
built in memory (no download): the image is noise, but every call is the real pipeline code.
"""

import argparse
import time

import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import belm_kernels as bk
from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

SCHEDULERS = {
    "dpm++2m-karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "dpm++2m-sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random SD)")
parser.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm++2m-karras")
parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

if args.model:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    pipe = tiny_stable_diffusion_pipeline(device=args.device)
pipe.set_progress_bar_config(disable=True)
cls, options = SCHEDULERS[args.scheduler]
original = cls.from_config(pipe.scheduler.config, **options)


def generate(scheduler):
    pipe.scheduler = scheduler
    return pipe(args.prompt, num_inference_steps=args.steps, output_type="latent",
                generator=torch.Generator(args.device).manual_seed(args.seed)).images


def step_cost(scheduler, latents) -> float:
    """Seconds per scheduler step over a run with a fixed model output."""
    scheduler.set_timesteps(args.steps, device=args.device)
    noise_pred = torch.randn_like(latents)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    kwargs = {"generator": generator} if cls is not UniPCMultistepScheduler else {}
    x = latents
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = scheduler.step(noise_pred, t, x, **kwargs).prev_sample
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


with torch.no_grad():
    reference = generate(original)
    fused_scheduler = bk.diffusers.fuse(original)
    fused = generate(fused_scheduler)
    gap = float((fused.double() - reference.double()).norm() / reference.double().norm())
    print(f"{type(fused_scheduler).__name__}: {args.steps} steps, relative L2 distance to "
          f"{cls.__name__}'s latents {gap:.1e}")
    costs = [step_cost(s, reference) for s in (original, fused_scheduler) for _ in range(3)]
    print(f"one step (model excluded): {min(costs[:3]) * 1e6:.0f} us diffusers, "
          f"{min(costs[3:]) * 1e6:.0f} us fused")
