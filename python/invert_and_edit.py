"""Invert a real image exactly with O-BELM, reconstruct it, and edit it with a new prompt.

    python python/invert_and_edit.py                         # tiny random SD pipeline, offline
    python python/invert_and_edit.py --tiny sdxl             # tiny random SDXL pipeline, offline
    python python/invert_and_edit.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --image cat.png --prompt "a photo of a cat" --edit "a photo of a dog"
    python python/invert_and_edit.py --model stabilityai/stable-diffusion-xl-base-1.0 ...

1. invert(): image -> VAE latents -> the pair (x_T, x_T2) of noisy latents (N model calls),
   with the conditioning the pipeline builds from the same arguments (prompt, guidance; for
   SDXL both text encoders and the size conditioning).
2. pipe.scheduler.set_latent_pair(pair); pipe(prompt, latents=pair.x_T2): the pipeline runs its
   usual loop (N-1 model calls) and gives back the image's latents -- exactly, not approximately.
3. The same pair with another prompt is the edit.
The latent reconstruction error is printed next to that of diffusers' DDIMInverseScheduler (run
through the same pipeline loop, then DDIMScheduler). --model takes a StableDiffusionPipeline or a
StableDiffusionXLPipeline; without it a tiny random pipeline is built in memory and --image
defaults to a synthetic one.
"""

import argparse

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline
from PIL import Image

from belm_kernels.diffusers import (
    BELMScheduler,
    image_latents,
    invert,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--tiny", choices=["sd", "sdxl"], default="sd",
                    help="which tiny random pipeline to build without --model")
parser.add_argument("--image", help="image to invert (default: a synthetic gradient)")
parser.add_argument("--prompt", default="a photo of a cat", help="describes the image")
parser.add_argument("--edit", default="a photo of a dog", help="the edit's prompt")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--guidance", type=float, default=3.0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="belm_edit")
args = parser.parse_args()

if args.model:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    tiny = {"sd": tiny_stable_diffusion_pipeline, "sdxl": tiny_stable_diffusion_xl_pipeline}
    pipe = tiny[args.tiny](device=args.device)
pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)

size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the pipeline's default size
if args.image:
    image = Image.open(args.image).convert("RGB").resize((size, size))
else:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.add.outer(ramp, ramp) // 2, np.tile(ramp, (size, 1)),
                                      np.tile(ramp[:, None], (1, size))], -1).astype(np.uint8))
common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)

# 1. exact inversion: the pair of noisiest latents
pair = invert(pipe, image=image, prompt=args.prompt, **common)
# 2. reconstruction through the unchanged pipeline loop
pipe.scheduler.set_latent_pair(pair)
latents = pipe(args.prompt, latents=pair.x_T2, output_type="latent", **common).images
# 3. the edit: same pair, new prompt
pipe.scheduler.set_latent_pair(pair)
edited = pipe(args.edit, latents=pair.x_T2, **common).images[0]
edited.save(f"{args.out}_edit.png")

# the latents we inverted, and what diffusers' DDIM inversion + DDIM sampling gives back
x0 = image_latents(pipe, image)
belm = pipe.scheduler
pipe.scheduler = DDIMInverseScheduler.from_config(belm.config)
x_T = pipe(args.prompt, latents=x0, output_type="latent", **common).images
pipe.scheduler = DDIMScheduler.from_config(belm.config)
ddim = pipe(args.prompt, latents=x_T, output_type="latent", **common).images
pipe.scheduler = belm
with torch.no_grad():
    decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    pipe.image_processor.postprocess(decoded)[0].save(f"{args.out}_reconstruction.png")


def err(a):
    return float((a.double() - x0.double()).norm() / x0.double().norm())


print(f"{type(pipe).__name__}, latent reconstruction error, {args.steps} steps, guidance "
      f"{args.guidance}: O-BELM {err(latents):.2e}   DDIM inversion {err(ddim):.2e}")
print(f"wrote {args.out}_reconstruction.png and {args.out}_edit.png")
