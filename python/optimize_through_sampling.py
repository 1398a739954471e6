"""Optimise a pipeline's initial noise so that its image moves toward a target, with exact
gradients through the whole sampling loop in constant memory (backprop by exact inversion).

    python python/optimize_through_sampling.py               # tiny random SD pipeline, offline
    python python/optimize_through_sampling.py --tiny flux   # or sdxl, sd3
    python python/optimize_through_sampling.py --device cuda --target cat.png --steps 50 \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a cat"

Each iteration runs the pipeline's own denoising loop (its model call with guidance, O-BELM on its
grid) through ``belm_kernels.diffusers.sample_reversible``, decodes the latents, takes the mean
squared error to the target image and steps Adam on the noise; the backward pass rebuilds every
earlier state with the exact inverse step instead of storing it. First, one forward + backward
is measured with the reversible chain and with full autograd through the same chain (and with
every model call checkpointed): peak memory side by side (CPU: the profiler's memory events;
GPU: max_memory_allocated). Images are written to --out*.png.
"""

import argparse

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from belm_kernels.diffusers import (
    BELMScheduler,
    FlowMatchBELMScheduler,
    decode,
    sample_reversible,
    tiny_flux_pipeline,
    tiny_stable_diffusion_3_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
)
from belm_kernels.diffusers.reversible import sample_autograd
from belm_kernels.reversible import peak_memory

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--tiny", choices=["sd", "sdxl", "sd3", "flux"], default="sd",
                    help="which tiny random pipeline to build without --model")
parser.add_argument("--target", help="target image (default: a synthetic colour gradient)")
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--steps", type=int, default=20, help="sampling steps")
parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
parser.add_argument("--iters", type=int, default=10, help="optimisation steps")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="belm_optimize")
args = parser.parse_args()

if args.model:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    tiny = {"sd": tiny_stable_diffusion_pipeline, "sdxl": tiny_stable_diffusion_xl_pipeline,
            "sd3": tiny_stable_diffusion_3_pipeline, "flux": tiny_flux_pipeline}
    pipe = tiny[args.tiny](device=args.device)
flow = hasattr(pipe, "transformer")
scheduler = FlowMatchBELMScheduler if flow else BELMScheduler
pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
for component in pipe.components.values():  # only the noise is optimised
    if isinstance(component, torch.nn.Module):
        component.requires_grad_(False)

# The initial noise, as the pipeline's own prepare_latents makes it (Flux: packed).
generator = torch.Generator(args.device).manual_seed(0)
size = (pipe.default_sample_size if flow else pipe.unet.config.sample_size) * pipe.vae_scale_factor
channels = (pipe.transformer if flow else pipe.unet).config.in_channels
if type(pipe).__name__.startswith("Flux"):
    channels //= 4
noise = pipe.prepare_latents(1, channels, size, size, pipe.dtype, args.device, generator)
noise = (noise[0] if isinstance(noise, tuple) else noise).detach().requires_grad_()

if args.target:
    target = np.asarray(Image.open(args.target).convert("RGB").resize((size, size))) / 255.0
else:  # a smooth colour gradient
    ramp = np.linspace(0, 1, size)
    target = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                       1 - ramp[None, :].repeat(size, 0)], axis=-1)
target = torch.tensor(target, dtype=torch.float32).permute(2, 0, 1)[None].to(args.device)
call = dict(prompt=args.prompt, num_inference_steps=args.steps, progress=False,
            **({} if args.guidance is None else {"guidance_scale": args.guidance}))


def loss_of(sample_fn, **extra):
    image = decode(pipe, sample_fn(pipe, noise, **call, **extra))
    return ((image.float() - target) ** 2).mean(), image


def forward_backward(sample_fn, **extra):
    loss, _ = loss_of(sample_fn, **extra)
    loss.backward()
    grad, noise.grad = noise.grad, None
    return grad


def save(image, name):
    pixels = (image[0].detach().float().permute(1, 2, 0).cpu().numpy() * 255).round()
    Image.fromarray(pixels.astype(np.uint8)).save(f"{args.out}_{name}.png")


print(f"{type(pipe).__name__}, {args.steps} steps, guidance "
      f"{call.get('guidance_scale', 'default')}, on {args.device}")
print("peak memory of one forward + backward through the sampling loop:")
grads = {}
for label, fn, extra in [("reversible (exact inversion)", sample_reversible, {}),
                         ("full autograd", sample_autograd, {}),
                         ("checkpoint every model call", sample_autograd,
                          {"checkpoint": True})]:
    grads[label], peak = peak_memory(lambda fn=fn, extra=extra: forward_backward(fn, **extra),
                                     args.device)
    print(f"  {label:30s} {peak / 2**20:9.1f} MB")
ref = grads["full autograd"]
err = float((grads["reversible (exact inversion)"] - ref).norm() / ref.norm())
print(f"  reversible gradient vs full autograd: relative difference {err:.1e}")

optimizer = torch.optim.Adam([noise], lr=args.lr)
for it in range(args.iters + 1):
    loss, image = loss_of(sample_reversible)
    if it == 0:
        save(image, "before")
        first = loss.item()
    print(f"iteration {it:3d}  loss {loss.item():.5f}")
    if it == args.iters:
        break
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
save(image, "after")
save(target, "target")
print(f"loss {first:.5f} -> {loss.item():.5f}; images in {args.out}_{{before,after,target}}.png")
