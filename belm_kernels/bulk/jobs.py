"""The pipelines a job runs and the jobs themselves: what an item is made from (its
fingerprint) and what it makes (tensors and files). invert-dataset, regenerate-dataset and
generate-dataset."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .items import BulkError, Item, _check_id, _check_unique, _manifest_rows, _text
from .ranks import Ranks
from .shards import _describe_mismatch, _normalise, _read_run, _stored_items, record_problem

# The pipelines are those belm_kernels.diffusers.invert supports (its SUPPORTED_PIPELINES).
# --model names of the tiny offline pipelines (random weights), and how runs record them
TINY = {"tiny": "tiny_stable_diffusion_pipeline",
        "tiny-sdxl": "tiny_stable_diffusion_xl_pipeline",
        "tiny-sd3": "tiny_stable_diffusion_3_pipeline",
        "tiny-flux": "tiny_flux_pipeline"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_record(name: str) -> str:
    return f"{name}: belm_kernels.diffusers.{TINY[name]}(seed=0), random weights"


def load_pipeline(model: str, dtype: torch.dtype, device: torch.device):
    """The pipeline and how it is recorded: a name of ``TINY`` (the offline random ones;
    recorded as ``tiny_record(name)``, which loads them too) or a local diffusers pipeline folder
    of a supported class (checked before any weight is loaded; recorded by its absolute path)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from .. import diffusers as belm_diffusers

    tiny = {tiny_record(name): name for name in TINY} | {name: name for name in TINY}
    if model in tiny:
        make = getattr(belm_diffusers, TINY[tiny[model]])
        pipe = make(0, dtype=dtype, device=device)
        name = tiny_record(tiny[model])
    else:
        path = Path(model)
        index = path / "model_index.json"
        if not index.is_file():
            raise BulkError(f"--model {model}: not a diffusers pipeline folder (no "
                            f"model_index.json); give a folder written by save_pretrained, or "
                            f"{' / '.join(TINY)} for a tiny offline pipeline")
        try:
            cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError) as exc:
            raise BulkError(f"--model {model}: cannot read {index}: {exc}") from None
        supported = tuple(getattr(diffusers, c) for c in belm_diffusers.SUPPORTED_PIPELINES)
        found = getattr(diffusers, str(cls), None)
        if not (isinstance(found, type) and issubclass(found, supported)):
            raise BulkError(f"--model {model} is a {cls}; the bulk commands support "
                            f"{', '.join(belm_diffusers.SUPPORTED_PIPELINES)} and their subclasses "
                            "(the pipelines that belm_kernels.diffusers.invert inverts)")
        pipe = DiffusionPipeline.from_pretrained(path, **{_dtype_keyword(): dtype}).to(device)
        name = str(path.resolve())
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def _dtype_keyword() -> str:
    """from_pretrained's dtype keyword: ``dtype`` since diffusers 0.42.1, where ``torch_dtype``
    warns."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42.1") else "torch_dtype"


def default_size(pipe) -> tuple[int, int]:
    """(height, width) of a run without --size, from the model's config (kept by save_pretrained):
    the denoiser's sample_size in latents, as the UNet and SD3 pipelines default; a Flux
    transformer has none (FluxPipeline's default_sample_size is a constant 128 that a loaded
    pipeline always gets), so there the VAE's sample_size in pixels (FLUX.1: 1024, its default)."""
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    sample = getattr(model.config, "sample_size", None)
    if sample is None:
        return pipe.vae.config.sample_size, pipe.vae.config.sample_size
    return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor


def _scheduler_config(scheduler) -> dict:
    config = json.loads(scheduler.to_json_string())
    config.pop("_diffusers_version", None)
    return config


def _belm_scheduler(pipe, config: dict):
    """The sampling scheduler of the runs: the BELM scheduler of the pipeline's family (O-BELM;
    BELMScheduler or FlowMatchBELMScheduler), from a scheduler ``config``."""
    from ..diffusers.inversion import _family

    return _family(pipe).scheduler.from_config(config)


def _grid(pipe, steps: int, height: int, width: int) -> dict:
    """The grid record (``LatentPair.grid``, as JSON reads it back) of a run of ``steps`` at
    height x width with ``pipe.scheduler``'s config: the family's BELM scheduler set as the
    pipeline sets it (timesteps; for flow also the sigmas, and mu from the image size)."""
    from PIL import Image

    from ..diffusers import image_latents
    from ..diffusers.inversion import _family

    scheduler = _belm_scheduler(pipe, pipe.scheduler.config)
    # the latents of a blank image: the steps' arguments depend on their shape only
    latents = image_latents(pipe, Image.new("RGB", (width, height)), height, width)
    scheduler.set_timesteps(**_family(pipe).steps(pipe, latents, steps))
    return _normalise(scheduler._grid_record)


def _stored_grid(record: dict) -> dict:
    """A grid record read from JSON as the scheduler keeps it (sequences are tuples there)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


class _LastLatents:
    """``callback_on_step_end`` keeping the latents after the last step (what
    ``output_type="latent"`` returns), so one call gives both latents and images."""

    def __init__(self):
        self.latents = None

    def __call__(self, pipe, i, t, kwargs):
        self.latents = kwargs["latents"]
        return kwargs


def read_rgb(path: Path):
    """An image file as an 8-bit RGB PIL image with its content kept, or a ValueError that says
    why not. 8-bit modes convert as PIL converts them (palette, CMYK, YCbCr, LAB, HSV; alpha and
    palette transparency dropped); 16-bit ones (``I;16*``, and ``I`` from a PNG or PPM, which
    hold at most 16 bits) scale 0..65535 to 0..255 and float ones (``F``) 0..1 to 0..255,
    rounding to nearest (PIL's own conversion clips them at 255 instead). Other ``I`` images
    (32-bit or signed integers) and float ones with values outside 0..1 have no range to scale
    from: they fail."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            image, fmt = opened.copy(), opened.format
    except Exception as exc:  # PIL raises several kinds for unreadable / corrupt files
        raise ValueError(f"cannot read image {path}: {exc}") from None
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or mode == "I" and fmt in ("PNG", "PPM"):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"image {path} ({fmt}, mode {mode}) holds values outside 0..65535, "
                             "the range of its 16 bits")
        pixels = np.rint(values / 257)  # 65535 / 255 = 257
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"image {path} ({fmt}, mode F) holds float values in "
                             f"[{values.min()}, {values.max()}]; float images are read as 0..1: "
                             "rescale it to 0..1, or save it with 8 or 16 bits")
        pixels = np.rint(values * 255)
    elif mode == "I":
        raise ValueError(f"image {path} ({fmt}, mode I: 32-bit or signed integers) has no "
                         "defined range to scale to 8 bits: save it with 8 or 16 bits")
    else:
        try:
            return image.convert("RGB")
        except Exception as exc:
            raise ValueError(f"cannot convert image {path} ({fmt}, mode {mode}) to RGB: "
                             f"{exc}") from None
    return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Job:
    command: str
    config: dict
    items: list[Item]
    source_failures: Sequence[dict] = ()  # items lost before the run (unreadable sources)
    default_shards: int | None = None  # shard count of a first run without --shards

    def fingerprint(self, item: Item) -> dict:
        raise NotImplementedError

    def process(self, item: Item) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """Tensors (by name) and files (by path relative to the output folder) of one item."""
        raise NotImplementedError


class InvertJob(Job):
    command = "invert-dataset"

    def __init__(self, pipe, model: str, items: list[Item], steps: int, guidance: float,
                 dtype: str, size: tuple[int, int] | None, resize: bool, method: str = "obelm"):
        if method != "obelm":
            raise BulkError(f"unknown inversion method {method!r}: only 'obelm' is available")
        if steps < 2:  # the pair is the two noisiest states of the grid
            raise BulkError(f"--steps must be at least 2 for an inversion, got {steps}")
        self.pipe, self.items, self.steps, self.guidance = pipe, items, steps, guidance
        self.height, self.width = size or default_size(pipe)
        self.resize = resize
        self.config = _normalise({
            "model": model, "pipeline": type(pipe).__name__,
            "scheduler": _scheduler_config(pipe.scheduler), "steps": steps,
            "grid": _grid(pipe, steps, self.height, self.width), "guidance_scale": guidance,
            "method": method, "dtype": dtype, "state_dtype": "float64",
            "height": self.height, "width": self.width, "resize": resize})

    def fingerprint(self, item):
        try:
            sha = hashlib.sha256(item.image.read_bytes()).hexdigest()
        except OSError:
            sha = None
        return {"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                "image_sha256": sha}

    def process(self, item):
        from ..diffusers import invert

        if item.prompt is None:
            raise ValueError(f"missing prompt ({item.origin}: expected a non-empty "
                             f"{item.image.stem}.txt beside a folder's image, or a 'prompt' "
                             "field in a manifest)")
        image = read_rgb(item.image)
        if image.size != (self.width, self.height) and not self.resize:
            raise ValueError(f"image {item.image} is {image.width}x{image.height} (WxH), this run "
                             f"inverts {self.width}x{self.height}: resize it, or pass --resize")
        pair = invert(self.pipe, image=image, prompt=item.prompt,
                      negative_prompt=item.negative_prompt, num_inference_steps=self.steps,
                      guidance_scale=self.guidance, height=self.height, width=self.width,
                      progress=False)
        if _normalise(pair.grid) != self.config["grid"]:
            raise RuntimeError(f"invert walked the grid {pair.grid}, this run records "
                               f"{self.config['grid']}")
        tensors = {"x_T": pair.x_T, "x_T2": pair.x_T2}
        if pair.state is not None:
            tensors.update(state_T=pair.state[0], state_T2=pair.state[1])
        return tensors, {}


def _image_files(item_id: str, prompt: str, images) -> dict[str, bytes]:
    """The image and its prompt as a sidecar, so an output folder can be inverted again."""
    return {f"images/{item_id}.png": _png(images[0]),
            f"images/{item_id}.txt": prompt.encode("utf-8")}


class RegenerateJob(Job):
    """Regenerate (the stored prompts) or edit (new prompts) from the pairs of invert-dataset."""

    command = "regenerate-dataset"

    def __init__(self, pairs: Path, ranks: Ranks, prompt: str | None, prompts: Path | None,
                 save: list[str]):
        run = _read_run(pairs)
        if run is None or run.get("command") != InvertJob.command:
            raise BulkError(f"--pairs {pairs}: not an output folder of invert-dataset (no "
                            "run.json of it)")
        src = run["config"]
        self.pairs, self.src, self.save = pairs, src, save
        self.stored, self.source_failures = _stored_items(pairs, run["num_shards"])
        self.default_shards = run["num_shards"]  # the same sharding as the pairs
        if prompts is not None:
            self.items = []
            for origin, _, row in _manifest_rows(prompts):
                if "id" not in row:
                    raise BulkError(f"{origin}: no 'id' field (expected id, prompt)")
                self.items.append(Item(_check_id(str(row["id"]), origin),
                                       _text(row.get("prompt")), origin=origin))
            _check_unique(self.items, prompts)
        else:
            self.items = [Item(i, prompt if prompt is not None else rec["fingerprint"]["prompt"],
                               origin=f"{pairs} item {i}")
                          for i, (_, rec) in sorted(self.stored.items(), key=lambda kv: kv[0])]
        dtype = DTYPES[src["dtype"]]
        self.pipe, model = load_pipeline(src["model"], dtype, ranks.device)
        if model != src["model"]:
            raise BulkError(f"the pairs were made with {src['model']}, which now loads as {model}")
        self.pipe.scheduler = _belm_scheduler(self.pipe, src["scheduler"])
        grid = _grid(self.pipe, src["steps"], src["height"], src["width"])
        if grid != src["grid"]:
            raise BulkError(f"the pairs were made on another grid than their config gives here "
                            f"({_describe_mismatch(src['grid'], grid)}): diffusers version "
                            "change?")
        edit = ({"prompt": prompt} if prompt is not None else
                {"prompts": str(prompts.resolve())} if prompts is not None else "stored prompts")
        self.config = _normalise({"pairs": str(pairs.resolve()), "source": src, "edit": edit,
                                  "save": sorted(save)})

    def fingerprint(self, item):
        _, rec = self.stored.get(item.id, (None, None))
        return {"prompt": item.prompt, "pair": None if rec is None else rec["fingerprint"],
                "negative_prompt": None if rec is None else rec["fingerprint"]["negative_prompt"]}

    def process(self, item):
        from safetensors import safe_open

        from ..diffusers import LatentPair

        if item.id not in self.stored:
            raise ValueError(f"no stored pair for this id in {self.pairs} (from {item.origin})")
        if item.prompt is None:
            raise ValueError(f"missing prompt ({item.origin})")
        path, rec = self.stored[item.id]
        with safe_open(path, "pt") as f:
            there = set(f.keys())
            t = {k: f.get_tensor(k) for k in (f"{item.id}/{name}" for name in rec["tensors"])
                 if k in there}
        problem = record_problem(self.pairs, rec, t)
        if problem is not None:
            raise ValueError(f"the stored pair in {path} fails verification ({problem}): refusing "
                             f"it; run invert-dataset into {self.pairs} again to redo it")
        t = {name: t[f"{item.id}/{name}"] for name in rec["tensors"]}
        device = self.pipe.device
        state = ((t["state_T"].to(device), t["state_T2"].to(device)) if "state_T" in t else None)
        # the stored grid: the scheduler refuses the pair if its run walks another one
        pair = LatentPair(t["x_T"].to(device), t["x_T2"].to(device), state=state,
                          grid=_stored_grid(self.src["grid"]))
        self.pipe.scheduler.set_latent_pair(pair)
        last = _LastLatents()
        images = self.pipe(item.prompt, negative_prompt=rec["fingerprint"]["negative_prompt"],
                           latents=pair.x_T2, num_inference_steps=self.src["steps"],
                           guidance_scale=self.src["guidance_scale"], height=self.src["height"],
                           width=self.src["width"], callback_on_step_end=last,
                           output_type="pil" if "images" in self.save else "latent").images
        tensors = {"latents": last.latents} if "latents" in self.save else {}
        files = _image_files(item.id, item.prompt, images) if "images" in self.save else {}
        return tensors, files


class GenerateJob(Job):
    """Images (and latents) from prompts with O-BELM sampling, seeded per item id."""

    command = "generate-dataset"

    def __init__(self, pipe, model: str, items: list[Item], steps: int, guidance: float,
                 dtype: str, size: tuple[int, int] | None, seed: int, save: list[str]):
        self.pipe, self.items, self.steps, self.guidance = pipe, items, steps, guidance
        self.height, self.width = size or default_size(pipe)
        self.seed, self.save = seed, save
        scheduler = _scheduler_config(pipe.scheduler)
        grid = _grid(pipe, steps, self.height, self.width)
        pipe.scheduler = _belm_scheduler(pipe, scheduler)
        self.config = _normalise({
            "model": model, "pipeline": type(pipe).__name__, "scheduler": scheduler,
            "steps": steps, "grid": grid, "guidance_scale": guidance, "method": "obelm",
            "dtype": dtype, "height": self.height, "width": self.width, "seed": seed,
            "save": sorted(save)})

    def item_seed(self, item: Item) -> int:
        """The item's own seed, or one derived from ``--seed`` and its id (stable)."""
        if item.seed is not None:
            return item.seed
        digest = hashlib.sha256(f"{self.seed}:{item.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def fingerprint(self, item):
        return {"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                "seed": self.item_seed(item)}

    def process(self, item):
        if item.prompt is None:
            raise ValueError(f"missing prompt ({item.origin})")
        generator = torch.Generator(self.pipe.device).manual_seed(self.item_seed(item))
        last = _LastLatents()
        images = self.pipe(item.prompt, negative_prompt=item.negative_prompt,
                           num_inference_steps=self.steps, guidance_scale=self.guidance,
                           height=self.height, width=self.width, generator=generator,
                           callback_on_step_end=last,
                           output_type="pil" if "images" in self.save else "latent").images
        tensors = {"latents": last.latents} if "latents" in self.save else {}
        files = _image_files(item.id, item.prompt, images) if "images" in self.save else {}
        return tensors, files

