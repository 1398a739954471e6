"""Invert a real image exactly with O-BELM, reconstruct it, and edit it with a new prompt.

    python python/invert_and_edit.py                         # tiny random pipeline, offline
    python python/invert_and_edit.py --model runwayml/stable-diffusion-v1-5 --device cuda \\
        --image cat.png --prompt "a photo of a cat" --edit "a photo of a dog" --steps 50

1. invert(): image -> VAE latents -> the pair (x_T, x_T2) of noisy latents (N model calls),
   with the same classifier-free guidance the pipeline uses.
2. pipe.scheduler.set_latent_pair(pair); pipe(prompt, latents=pair.x_T2): the pipeline runs its
   usual loop (N-1 model calls) and gives back the image's latents -- exactly, not approximately.
3. The same pair with another prompt is the edit.
The latent reconstruction error is printed next to diffusers' DDIMInverseScheduler's.
Without --model a tiny random pipeline is built in memory and --image defaults to a synthetic one.
"""

import argparse

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from belm_kernels.diffusers import BELMScheduler, invert, tiny_stable_diffusion_pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--image", help="image to invert (default: a synthetic gradient)")
parser.add_argument("--prompt", default="a photo of a cat", help="describes the image")
parser.add_argument("--edit", default="a photo of a dog", help="the edit's prompt")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--guidance", type=float, default=3.0)
parser.add_argument("--size", type=int, default=512, help="image side for real models")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="belm_edit")
args = parser.parse_args()

if args.model:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype,
                                                   safety_checker=None).to(args.device)
    size = args.size
else:
    pipe = tiny_stable_diffusion_pipeline(device=args.device)
    size = 2 * pipe.unet.config.sample_size
pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)

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
with torch.no_grad():
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    pipe.image_processor.postprocess(decoded)[0].save(f"{args.out}_reconstruction.png")
    pixels = pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype)
    x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds = torch.cat(pipe.encode_prompt(args.prompt, pipe.device, 1, True)[::-1])
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(args.steps)
    x = x0.clone()
    for t in inverse.timesteps:
        noise = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=embeds).sample
        uncond, text = noise.chunk(2)
        x = inverse.step(uncond + args.guidance * (text - uncond), t, x).prev_sample
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
ddim = pipe(args.prompt, latents=x, output_type="latent", **common).images


def err(a):
    return float((a.double() - x0.double()).norm() / x0.double().norm())


print(f"latent reconstruction error, {args.steps} steps, guidance {args.guidance}: "
      f"O-BELM {err(latents):.2e}   DDIM inversion {err(ddim):.2e}")
print(f"wrote {args.out}_reconstruction.png and {args.out}_edit.png")
