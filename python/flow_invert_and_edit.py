"""Invert an image exactly through SD3 or Flux with O-BELM, reconstruct it, and edit it.

    python python/flow_invert_and_edit.py                   # tiny random Flux pipeline, offline
    python python/flow_invert_and_edit.py --tiny sd3        # tiny random SD3 pipeline, offline
    python python/flow_invert_and_edit.py --model black-forest-labs/FLUX.1-dev --device cuda \\
        --image cat.png --prompt "a photo of a cat" --edit "a photo of a dog" --steps 28
    python python/flow_invert_and_edit.py --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --device cuda --image cat.png

1. invert(): image -> VAE latents (packed, for Flux) -> the pair (x_T, x_T2) of noisy latents
   (N model calls), with the conditioning the pipeline builds from the same arguments (SD3: three
   text encoders and classifier-free guidance; Flux: distilled guidance, mu from the image size).
2. pipe.scheduler.set_latent_pair(pair); pipe(prompt, latents=pair.x_T2): the pipeline runs its
   usual loop (N-1 model calls) and gives back the image's latents -- exactly, not approximately.
3. The same pair with another prompt is the edit.
The latent reconstruction error is printed next to that of FlowMatchEulerDiscreteScheduler
inverted by hand (its Euler steps run backwards from the clean latents through the same pipeline
loop, then forwards). --model takes a StableDiffusion3Pipeline or a FluxPipeline; without it a
tiny random pipeline is built in memory and --image defaults to a synthetic one.
"""

import argparse

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image

from belm_kernels.diffusers import (
    FlowMatchBELMScheduler,
    image_latents,
    invert,
    tiny_flux_pipeline,
    tiny_stable_diffusion_3_pipeline,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--tiny", choices=["flux", "sd3"], default="flux",
                    help="which tiny random pipeline to build without --model")
parser.add_argument("--image", help="image to invert (default: a synthetic gradient)")
parser.add_argument("--prompt", default="a photo of a cat", help="describes the image")
parser.add_argument("--edit", default="a photo of a dog", help="the edit's prompt")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--guidance", type=float, help="default: the pipeline's (Flux 3.5, SD3 7)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="belm_flow")
args = parser.parse_args()

if args.model:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    tiny = {"flux": tiny_flux_pipeline, "sd3": tiny_stable_diffusion_3_pipeline}
    pipe = tiny[args.tiny](device=args.device)
pipe.scheduler = FlowMatchBELMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)

size = pipe.default_sample_size * pipe.vae_scale_factor  # the pipeline's default size
if args.image:
    image = Image.open(args.image).convert("RGB").resize((size, size))
else:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.add.outer(ramp, ramp) // 2, np.tile(ramp, (size, 1)),
                                      np.tile(ramp[:, None], (1, size))], -1).astype(np.uint8))
# the same arguments to invert and to every pipeline call (Flux: height and width set mu)
common = dict(num_inference_steps=args.steps, height=size, width=size)
if args.guidance is not None:
    common["guidance_scale"] = args.guidance

# 1. exact inversion: the pair of noisiest latents (float64 states inside, for exactness)
pair = invert(pipe, image=image, prompt=args.prompt, **common)
# 2. reconstruction through the unchanged pipeline loop
pipe.scheduler.set_latent_pair(pair)
latents = pipe(args.prompt, latents=pair.x_T2, output_type="latent", **common).images
# 3. the edit: same pair, new prompt
pipe.scheduler.set_latent_pair(pair)
edited = pipe(args.edit, latents=pair.x_T2, **common).images[0]
edited.save(f"{args.out}_edit.png")


class EulerInverse(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler backwards: timesteps ascending, x + (sigma_j - sigma_{j+1}) v per step."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        self.timesteps, self.sigmas = self.timesteps.flip(0), self.sigmas.flip(0)


# the latents we inverted, and what Euler inversion + Euler sampling gives back
x0 = image_latents(pipe, image, height=size, width=size)
belm = pipe.scheduler
pipe.scheduler = EulerInverse.from_config(belm.config)
x_T = pipe(args.prompt, latents=x0, output_type="latent", **common).images
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(belm.config)
euler = pipe(args.prompt, latents=x_T, output_type="latent", **common).images
pipe.scheduler = belm

with torch.no_grad():
    unpacked = (pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
                if isinstance(pipe, FluxPipeline) else latents)
    cfg = pipe.vae.config
    decoded = pipe.vae.decode(unpacked.to(pipe.vae.dtype) / cfg.scaling_factor
                              + cfg.shift_factor).sample
    pipe.image_processor.postprocess(decoded)[0].save(f"{args.out}_reconstruction.png")


def err(a):
    return float((a.double() - x0.double()).norm() / x0.double().norm())


print(f"{type(pipe).__name__}, latent reconstruction error, {args.steps} steps: "
      f"O-BELM {err(latents):.2e}   FlowMatchEuler inverted by hand {err(euler):.2e}")
print(f"wrote {args.out}_reconstruction.png and {args.out}_edit.png")
