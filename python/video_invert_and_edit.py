"""Invert a video exactly through a diffusers video pipeline with O-BELM, reconstruct it, edit it.

    python python/video_invert_and_edit.py                   # tiny random Wan 2.1, offline
    python python/video_invert_and_edit.py --tiny wan2.2     # two experts (Wan 2.2 A14B style)
    python python/video_invert_and_edit.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --device cuda --frames clip/ --prompt "a cat walks on grass" --edit "a dog walks on grass"

1. invert(): frames -> VAE latents (batch, channels, frames, height, width) -> the pair
   (x_T, x_T2) of noisy latents: the pipeline's own loop runs with the inverse O-BELM scheduler
   (on the sigmas of its scheduler's config: UniPC's flow sigmas for Wan), N model calls.
2. regenerate() with the same prompt: the pipeline's loop from the pair (N-1 model calls) gives
   back the video's latents -- exactly, not approximately.
3. regenerate() with another prompt is the edit.
The latent reconstruction error is printed next to that of FlowMatchEulerDiscreteScheduler
inverted by hand (its Euler steps run backwards from the clean latents through the same pipeline
loop, then forwards). --model takes a rectified-flow video pipeline of
belm_kernels.diffusers.SUPPORTED_PIPELINES (Wan, HunyuanVideo, LTX-Video; invert and regenerate
take CogVideoX too, but its baseline would be DDIM); --frames a folder of frames (sorted by name;
4k + 1 of them). Without them a tiny random Wan pipeline and a synthetic video are used.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image

from belm_kernels.diffusers import invert, regenerate, tiny_wan_pipeline, video_latents

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="diffusers model id or local path (default: tiny random)")
parser.add_argument("--tiny", choices=["wan2.1", "wan2.2"], default="wan2.1",
                    help="which tiny random Wan pipeline to build without --model")
parser.add_argument("--frames", help="folder of frames to invert (default: a synthetic video)")
parser.add_argument("--prompt", default="a cat walks on grass", help="describes the video")
parser.add_argument("--edit", default="a dog walks on grass", help="the edit's prompt")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--guidance", type=float, help="default: the pipeline's (Wan 5.0)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="belm_video")
args = parser.parse_args()

if args.model:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
else:
    pipe = tiny_wan_pipeline(version=args.tiny.removeprefix("wan"), device=args.device)
pipe.set_progress_bar_config(disable=True)

if args.frames:
    files = sorted(p for p in Path(args.frames).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    frames = [Image.open(p).convert("RGB") for p in files]
else:  # 9 frames of a moving pattern, 32x32
    y, x = np.mgrid[0:32, 0:32] / 32
    frames = [Image.fromarray((255 * (np.sin(np.stack([6 * (x + k / 9), 6 * (y - k / 9),
                                                       3 * (x + y)], -1)) + 1) / 2)
                              .astype(np.uint8)) for k in range(9)]
call = dict(prompt=args.prompt, num_inference_steps=args.steps)
if args.guidance is not None:
    call["guidance_scale"] = args.guidance

# 1. exact inversion: the pair of noisiest latents (float64 states inside, for exactness)
pair = invert(pipe, video=frames, **call)
# 2. reconstruction through the unchanged pipeline loop; pair.sizes: height, width, num_frames
latents = regenerate(pipe, pair, output_type="latent", **call).frames
# 3. the edit: same pair, new prompt
edited = regenerate(pipe, pair, **{**call, "prompt": args.edit}).frames[0]
Image.fromarray((edited[0] * 255).round().astype(np.uint8)).save(f"{args.out}_edit_frame0.png")


class EulerInverse(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler backwards: timesteps ascending, x + (sigma_j - sigma_{j+1}) v per step."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        self.timesteps, self.sigmas = self.timesteps.flip(0), self.sigmas.flip(0)


# the latents we inverted, and what Euler inversion + Euler sampling gives back (Wan's config
# ships UniPC with flow_shift: FlowMatchEuler with that shift)
x0 = video_latents(pipe, frames)
config = pipe.scheduler.config
config = dict(shift=config.flow_shift) if config.get("use_flow_sigmas") else config
own = pipe.scheduler
common = dict(output_type="latent", **pair.sizes, **call)
pipe.scheduler = EulerInverse.from_config(config)
x_T = pipe(latents=x0, **common).frames
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
euler = pipe(latents=x_T, **common).frames
pipe.scheduler = own


def err(a):
    return float((a.double() - x0.double()).norm() / x0.double().norm())


print(f"{type(pipe).__name__}, video latents {tuple(x0.shape)}, reconstruction error, "
      f"{args.steps} steps: O-BELM {err(latents):.2e}   FlowMatchEuler inverted by hand "
      f"{err(euler):.2e}")
print(f"wrote {args.out}_edit_frame0.png")
