"""The command line of the bulk jobs (registered by belm_kernels.cli): invert-dataset,
regenerate-dataset, generate-dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .items import BulkError, read_items, read_prompt_items
from .jobs import DTYPES, TINY, GenerateJob, InvertJob, RegenerateJob, load_pipeline, media_of
from .ranks import Ranks
from .runner import ITEMS_PER_SHARD, run_job


def _size(text: str) -> tuple[int, int]:
    """'512' or 'WxH' -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 768x512 (WxH), got "
                                         f"{text!r}")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[1], parts[0])


def _save(text: str) -> list[str]:
    items = sorted({v.strip() for v in text.split(",") if v.strip()})
    if not items or any(v not in ("images", "videos", "latents") for v in items):
        raise argparse.ArgumentTypeError(f"expected images (or videos), latents or both "
                                         f"(images,latents), got {text!r}")
    return items


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--shards", type=_positive,
                   help=f"number of shards, fixed on the first run into --out (default: one per "
                        f"{ITEMS_PER_SHARD} items); a later run reads it from the folder")
    p.add_argument("--threads", type=_positive, default=1,
                   help="intra-op CPU threads per process (default 1, what torchrun sets): "
                        "results are bitwise the same for any number of processes at the same "
                        "--threads")
    p.add_argument("--device", default="auto",
                   help="torch device (default: cuda:LOCAL_RANK if CUDA is available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--model", default="tiny",
                   help="a local diffusers pipeline folder (save_pretrained) of a class in "
                        "belm_kernels.diffusers.SUPPORTED_PIPELINES (the pipelines invert "
                        "supports; not those conditioned on an image of their own), or "
                        f"{' / '.join(TINY)}: a tiny random pipeline (SD, the default) built "
                        "offline, for trying")
    p.add_argument("--steps", type=_positive, default=steps,
                   help=f"model steps N (default {steps})")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="the pipeline's guidance_scale (default 7.5): classifier-free guidance, "
                        "for Flux its distilled guidance (negative prompts are not used there: "
                        "no true CFG)")
    p.add_argument("--negative-prompt", help="for items that do not give one")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the pipeline's dtype (default float32)")
    p.add_argument("--size", type=_size,
                   help="image or video size, 512 or WxH (default: the pipeline's default size)")
    p.add_argument("--frames", type=_positive,
                   help="video pipelines: frames per video, k * (the VAE's temporal "
                        "compression) + 1 (default: the pipeline's)")


def _execute(args, make_job) -> int:
    threads = torch.get_num_threads()
    ranks = None
    try:
        torch.set_num_threads(args.threads)
        ranks = Ranks(args.device)
        return run_job(make_job(ranks), args.out, ranks, args.shards,
                       progress=not args.no_progress)
    except BulkError as exc:
        if ranks is None or ranks.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ranks is not None:
            ranks.close()
        torch.set_num_threads(threads)


def invert_dataset(args) -> int:
    def make(ranks):
        pipe, model = load_pipeline(args.model, DTYPES[args.dtype], ranks.device)
        items = read_items(args.data, media_of(pipe), args.negative_prompt, type(pipe).__name__)
        return InvertJob(pipe, model, items, args.steps, args.guidance, args.dtype, args.size,
                         args.resize, args.method, args.frames)
    return _execute(args, make)


def regenerate_dataset(args) -> int:
    def make(ranks):
        return RegenerateJob(args.pairs, ranks, args.prompt, args.prompts, args.save)
    return _execute(args, make)


def generate_dataset(args) -> int:
    def make(ranks):
        items = read_prompt_items(args.prompts, args.negative_prompt)
        pipe, model = load_pipeline(args.model, DTYPES[args.dtype], ranks.device)
        return GenerateJob(pipe, model, items, args.steps, args.guidance, args.dtype, args.size,
                           args.seed, args.save, args.frames)
    return _execute(args, make)


def add_commands(sub) -> None:
    """Register invert-dataset, regenerate-dataset and generate-dataset on the CLI."""
    p = sub.add_parser("invert-dataset", help="invert a folder / manifest of images or videos "
                       "exactly (O-BELM) into latent pairs; one process or torchrun",
                       description="Invert images or videos (for a video pipeline) exactly with "
                       "O-BELM and store the latent pairs "
                       "(and the float64 states that make regeneration bit-exact) in sharded "
                       "safetensors files. Resumable; runs as one process or under torchrun.")
    p.add_argument("--data", type=Path, required=True,
                   help="a folder of images (video pipelines: of videos -- folders of frames "
                        "or video files, read by PyAV --) with a <stem>.txt prompt beside each, "
                        "or a manifest .jsonl / .csv with image (or video), prompt and optional "
                        "id, negative_prompt")
    _common(p, "output folder of the pairs (resumed if it holds a run of the same config)")
    _model_options(p, steps=50)
    p.add_argument("--resize", action="store_true",
                   help="resize images and videos of another size to --size (default: such an "
                        "item fails; a video of another frame count always does)")
    p.add_argument("--method", choices=("obelm",), default="obelm",
                   help="inversion method: obelm, the exact O-BELM inversion (the default and "
                        "the only one)")
    p.set_defaults(func=invert_dataset)

    p = sub.add_parser("regenerate-dataset", help="regenerate or edit from the pairs of "
                       "invert-dataset (exact with the stored prompts)",
                       description="Regenerate every stored item from its latent pair (with the "
                       "stored prompts: the inverted latents come back bit for bit), or edit it "
                       "with a new prompt. Sharded and resumable like invert-dataset.")
    p.add_argument("--pairs", type=Path, required=True, help="an output folder of invert-dataset")
    _common(p, "output folder (latents in shard files, images in images/, videos as frame "
               "folders in videos/)")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--prompt", help="one new prompt for every item (an edit)")
    edit.add_argument("--prompts", type=Path,
                      help="a .jsonl / .csv manifest of id, prompt: edit those items")
    p.add_argument("--save", type=_save,
                   help="what to write: images (videos, for a video pipeline), latents or both "
                        "(default both)")
    p.set_defaults(func=regenerate_dataset)

    p = sub.add_parser("generate-dataset", help="generate images or videos from a prompt list "
                       "with O-BELM, seeded per item", description="Generate an image (or a "
                       "video) per prompt "
                       "with O-BELM sampling, seeded per item id (reruns give the same images). "
                       "Sharded and resumable like invert-dataset.")
    p.add_argument("--prompts", type=Path, required=True,
                   help="a .txt file (one prompt per line) or a .jsonl / .csv manifest with "
                        "prompt and optional id, negative_prompt, seed")
    _common(p, "output folder (images/<id>.png, or videos/<id>/ of PNG frames, with a <id>.txt "
               "prompt each, so it can be inverted; latents in shard files)")
    _model_options(p, steps=30)
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; each item's seed derives from it and the item id (default 0)")
    p.add_argument("--save", type=_save,
                   help="what to write: images (videos, for a video pipeline), latents or both "
                        "(default images / videos)")
    p.set_defaults(func=generate_dataset)
