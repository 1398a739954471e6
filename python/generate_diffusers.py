"""Generate with a diffusers pipeline using O-BELM: swap in BELMScheduler, nothing else changes.

    python python/generate_diffusers.py                      # tiny random SD pipeline, offline
    python python/generate_diffusers.py --tiny sdxl          # tiny random SDXL pipeline
    python python/generate_diffusers.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --device cuda --prompt "a watercolor fox" --steps 30 --out fox.png

Without --model a tiny random pipeline is built in memory (no download): the image is noise, but
every call is the real pipeline code path. The same seed with DDIMScheduler is generated beside
it for comparison.
"""

import argparse

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from belm_kernels.diffusers import (
    BELMScheduler,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--tiny", choices=["sd", "sdxl"], default="sd",
                    help="which tiny random pipeline to build without --model")
parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--guidance", type=float, default=7.5)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--backend", help="fused-op backend: torch|triton|cuda|cpu (default: auto)")
parser.add_argument("--out", default="belm_generate.png")
args = parser.parse_args()

if args.model:
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    tiny = {"sd": tiny_stable_diffusion_pipeline, "sdxl": tiny_stable_diffusion_xl_pipeline}
    pipe = tiny[args.tiny](device=args.device)

# The one line that matters: same config (betas, timestep spacing, offset), O-BELM steps.
config = pipe.scheduler.config
options = {"backend": args.backend} if args.backend else {}
pipe.scheduler = BELMScheduler.from_config(config, **options)

image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
             generator=torch.Generator(args.device).manual_seed(args.seed)).images[0]
image.save(args.out)
print(f"O-BELM, {args.steps} steps -> {args.out} ({image.size[0]}x{image.size[1]})")

pipe.scheduler = DDIMScheduler.from_config(config)
ddim_out = args.out.rsplit(".", 1)[0] + "_ddim.png"
pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
     generator=torch.Generator(args.device).manual_seed(args.seed)).images[0].save(ddim_out)
print(f"DDIM,   {args.steps} steps -> {ddim_out}")
