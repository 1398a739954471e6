"""The pipelines a job runs and the jobs themselves: what an item is made from (its
fingerprint) and what it makes (tensors and files). invert-dataset, regenerate-dataset and
generate-dataset, for image and video pipelines alike."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .items import BulkError, Item, _check_id, _check_unique, _manifest_rows, _text
from .media import image_files, read_rgb, read_video, video_files, video_sha256
from .ranks import Ranks
from .shards import _describe_mismatch, _normalise, _read_run, _stored_items, record_problem

# --model names of the tiny offline pipelines (random weights): builder, its options, and for the
# video ones the default height, width and frames (their pipelines' defaults are real models')
TINY = {"tiny": ("tiny_stable_diffusion_pipeline", {}),
        "tiny-sdxl": ("tiny_stable_diffusion_xl_pipeline", {}),
        "tiny-sd3": ("tiny_stable_diffusion_3_pipeline", {}),
        "tiny-flux": ("tiny_flux_pipeline", {}),
        "tiny-chroma": ("tiny_chroma_pipeline", {}),
        "tiny-wan": ("tiny_wan_pipeline", {}),
        "tiny-wan2.2": ("tiny_wan_pipeline", {"version": "2.2"}),
        "tiny-hunyuan-video": ("tiny_hunyuan_video_pipeline", {}),
        "tiny-ltx": ("tiny_ltx_pipeline", {}),
        "tiny-cogvideox": ("tiny_cogvideox_pipeline", {})}
TINY_VIDEO_SIZES = {"tiny-wan": (32, 32, 9), "tiny-wan2.2": (32, 32, 9),
                    "tiny-hunyuan-video": (16, 16, 9), "tiny-ltx": (32, 32, 9),
                    "tiny-cogvideox": (16, 16, 9)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bulk_pipelines() -> tuple[str, ...]:
    """The pipeline classes the bulk commands run: those ``invert`` supports, except the ones
    conditioned on an image of their own (Flux Kontext, Qwen-Image-Edit, Wan image-to-video),
    for which an item would need a second image."""
    from ..diffusers.inversion import _FAMILIES

    return tuple(f.pipeline for f in _FAMILIES if not f.condition)


def tiny_record(name: str) -> str:
    builder, options = TINY[name]
    args = "".join(f", {k}={v!r}" for k, v in options.items())
    return f"{name}: belm_kernels.diffusers.{builder}(seed=0{args}), random weights"


def load_pipeline(model: str, dtype: torch.dtype, device: torch.device):
    """The pipeline and how it is recorded: a name of ``TINY`` (the offline random ones;
    recorded as ``tiny_record(name)``, which loads them too) or a local diffusers pipeline folder
    of a supported class (checked before any weight is loaded; recorded by its absolute path)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from .. import diffusers as belm_diffusers

    tiny = {tiny_record(name): name for name in TINY} | {name: name for name in TINY}
    supported = bulk_pipelines()
    if model in tiny:
        builder, options = TINY[tiny[model]]
        pipe = getattr(belm_diffusers, builder)(0, dtype=dtype, device=device, **options)
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
        found = getattr(diffusers, str(cls), None)
        if not (isinstance(found, type)
                and issubclass(found, tuple(getattr(diffusers, c) for c in supported))):
            raise BulkError(f"--model {model} is a {cls}; the bulk commands support "
                            f"{', '.join(supported)} and their subclasses (the pipelines that "
                            "belm_kernels.diffusers.invert inverts, except those conditioned on "
                            "an image of their own)")
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


def media_of(pipe) -> str:
    """"image" or "video": what the pipeline makes (and its jobs read and write)."""
    from ..diffusers.inversion import _family

    return _family(pipe).media


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


def default_video_size(pipe, model: str) -> tuple[int, int, int]:
    """(height, width, frames) of a video run without --size / --frames: a tiny pipeline's own
    (``TINY_VIDEO_SIZES``), else the pipeline's defaults (its ``__call__``'s; CogVideoX: its
    transformer's sample size)."""
    for name, size in TINY_VIDEO_SIZES.items():
        if model in (name, tiny_record(name)):
            return size
    params = inspect.signature(type(pipe).__call__).parameters
    height, width = params["height"].default, params["width"].default
    frames = params["num_frames"].default
    cfg = pipe.transformer.config
    if height is None:  # CogVideoX
        height = cfg.sample_height * pipe.vae_scale_factor_spatial
        width = cfg.sample_width * pipe.vae_scale_factor_spatial
    return height, width, frames


def _scheduler_config(scheduler) -> dict:
    config = json.loads(scheduler.to_json_string())
    config.pop("_diffusers_version", None)
    return config


def _belm_scheduler(pipe, config: dict):
    """The sampling scheduler of the runs: the BELM scheduler of the pipeline's family (O-BELM;
    BELMScheduler or FlowMatchBELMScheduler), from a scheduler ``config``."""
    from ..diffusers.inversion import _family

    return _family(pipe).scheduler.from_config(config)


def _timesteps_args(pipe, steps: int, height: int, width: int,
                    frames: int | None = None) -> dict:
    """The ``set_timesteps`` arguments the pipeline passes for a run of ``steps`` at height x
    width (x frames, for a video pipeline): its family's, from the latents of a blank image or
    video (they depend on the latents' shape only)."""
    from PIL import Image

    from ..diffusers import image_latents, video_latents
    from ..diffusers.inversion import _family

    blank = Image.new("RGB", (width, height))
    latents = (image_latents(pipe, blank, height, width) if frames is None else
               video_latents(pipe, [blank] * frames, height, width))
    return _family(pipe).steps(pipe, latents, steps)


def _grid(pipe, steps: int, height: int, width: int, frames: int | None = None) -> dict:
    """The grid record (``LatentPair.grid``, as JSON reads it back) of such a run with
    ``pipe.scheduler``'s config: the family's BELM scheduler set as the pipeline sets it
    (timesteps; for flow also the sigmas, and mu from the image or video size)."""
    scheduler = _belm_scheduler(pipe, pipe.scheduler.config)
    scheduler.set_timesteps(**_timesteps_args(pipe, steps, height, width, frames))
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


class _Geometry:
    """The size of a run's images or videos, from --size / --frames or the pipeline's defaults;
    a video run's config records num_frames too."""

    def __init__(self, pipe, model: str, size: tuple[int, int] | None, frames: int | None):
        self.media = media_of(pipe)
        self.name = type(pipe).__name__
        if self.media == "image":
            if frames is not None:
                raise BulkError(f"--frames {frames}: {self.name} makes images, which have no "
                                "frames")
            self.height, self.width = size or default_size(pipe)
            self.frames = None
        else:
            height, width, default_frames = default_video_size(pipe, model)
            self.height, self.width = size or (height, width)
            self.frames = frames or default_frames

    @property
    def config(self) -> dict:
        sizes = {"height": self.height, "width": self.width}
        return sizes if self.frames is None else {**sizes, "num_frames": self.frames}

    @property
    def per_item(self) -> int:  # what the progress bar counts per item
        return self.frames or 1

    def check_save(self, save: list[str]) -> list[str]:
        other = "videos" if self.media == "image" else "images"
        if other in save:
            raise BulkError(f"--save {','.join(save)}: {self.name} makes {self.media}s, not "
                            f"{other}")
        return save

    def files(self, item_id: str, prompt: str, output) -> dict[str, bytes]:
        """The image or video files of a pipeline's output (its first image / frames)."""
        if self.media == "image":
            return image_files(item_id, prompt, output[0])
        return video_files(item_id, prompt, output[0])


class Job:
    command: str
    config: dict
    items: list[Item]
    source_failures: Sequence[dict] = ()  # items lost before the run (unreadable sources)
    default_shards: int | None = None  # shard count of a first run without --shards
    unit: str = "item"  # what the progress bar counts: items, or the frames of videos
    per_item: int = 1  # units per item

    def fingerprint(self, item: Item) -> dict:
        raise NotImplementedError

    def process(self, item: Item) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """Tensors (by name) and files (by path relative to the output folder) of one item."""
        raise NotImplementedError


def _counting(job: Job, geometry: _Geometry) -> None:
    job.unit = "item" if geometry.frames is None else "frame"
    job.per_item = geometry.per_item


class InvertJob(Job):
    command = "invert-dataset"

    def __init__(self, pipe, model: str, items: list[Item], steps: int, guidance: float,
                 dtype: str, size: tuple[int, int] | None, resize: bool, method: str = "obelm",
                 frames: int | None = None):
        from ..diffusers.inversion import _family

        if method != "obelm":
            raise BulkError(f"unknown inversion method {method!r}: only 'obelm' is available")
        if steps < 2:  # the pair is the two noisiest states of the grid
            raise BulkError(f"--steps must be at least 2 for an inversion, got {steps}")
        self.geometry = g = _Geometry(pipe, model, size, frames)
        self.pipe, self.items, self.steps, self.guidance = pipe, items, steps, guidance
        self.height, self.width, self.resize = g.height, g.width, resize
        _counting(self, g)
        try:  # a zero-SNR grid (CogVideoX) needs a step more for its pair
            inverse = _family(pipe).inverse_scheduler.from_config(pipe.scheduler.config)
            inverse.set_timesteps(**_timesteps_args(pipe, steps, g.height, g.width, g.frames))
        except ValueError as exc:
            raise BulkError(f"--steps {steps}: {exc}") from None
        grid = _grid(pipe, steps, g.height, g.width, g.frames)
        self.config = _normalise({
            "model": model, "pipeline": type(pipe).__name__,
            "scheduler": _scheduler_config(pipe.scheduler), "steps": steps, "grid": grid,
            "guidance_scale": guidance, "method": method, "dtype": dtype,
            "state_dtype": "float64", **g.config, "resize": resize})

    def fingerprint(self, item):
        if self.geometry.media == "video":
            return {"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                    "video_sha256": video_sha256(item.video)}
        try:
            sha = hashlib.sha256(item.image.read_bytes()).hexdigest()
        except OSError:
            sha = None
        return {"prompt": item.prompt, "negative_prompt": item.negative_prompt,
                "image_sha256": sha}

    def _video(self, item: Item) -> dict:
        """invert's input for a video item, checked against the run's size and frame count."""
        frames = read_video(item.video)
        g = self.geometry
        if len(frames) != g.frames:
            truncated = " (a truncated file?)" if item.video.is_file() else ""
            raise ValueError(f"video {item.video} has {len(frames)} frames{truncated}, this run "
                             f"inverts {g.frames} (the grid and the latents are made for that "
                             "many: --frames)")
        w, h = frames[0].size
        if (w, h) != (g.width, g.height) and not self.resize:
            raise ValueError(f"video {item.video} is {w}x{h} (WxH), this run inverts "
                             f"{g.width}x{g.height}: resize it, or pass --resize")
        return {"video": frames, "num_frames": g.frames}

    def process(self, item):
        from ..diffusers import invert

        source = item.video if self.geometry.media == "video" else item.image
        if item.prompt is None:
            raise ValueError(f"missing prompt ({item.origin}: expected a non-empty "
                             f"{source.stem if source.is_file() else source.name}.txt beside "
                             f"a folder's {self.geometry.media}, or a 'prompt' field in a "
                             "manifest)")
        if self.geometry.media == "video":
            media = self._video(item)
        else:
            image = read_rgb(item.image)
            if image.size != (self.width, self.height) and not self.resize:
                raise ValueError(f"image {item.image} is {image.width}x{image.height} (WxH), "
                                 f"this run inverts {self.width}x{self.height}: resize it, or "
                                 "pass --resize")
            media = {"image": image}
        pair = invert(self.pipe, prompt=item.prompt, negative_prompt=item.negative_prompt,
                      num_inference_steps=self.steps, guidance_scale=self.guidance,
                      height=self.height, width=self.width, progress=False, **media)
        if _normalise(pair.grid) != self.config["grid"]:
            raise RuntimeError(f"invert walked the grid {pair.grid}, this run records "
                               f"{self.config['grid']}")
        tensors = {"x_T": pair.x_T, "x_T2": pair.x_T2}
        if pair.state is not None:
            tensors.update(state_T=pair.state[0], state_T2=pair.state[1])
        return tensors, {}


def _default_save(geometry: _Geometry, save: list[str] | None, latents: bool) -> list[str]:
    if save is None:
        save = [f"{geometry.media}s"] + (["latents"] if latents else [])
    return sorted(geometry.check_save(save))


class RegenerateJob(Job):
    """Regenerate (the stored prompts) or edit (new prompts) from the pairs of invert-dataset."""

    command = "regenerate-dataset"

    def __init__(self, pairs: Path, ranks: Ranks, prompt: str | None, prompts: Path | None,
                 save: list[str] | None):
        run = _read_run(pairs)
        if run is None or run.get("command") != InvertJob.command:
            raise BulkError(f"--pairs {pairs}: not an output folder of invert-dataset (no "
                            "run.json of it)")
        src = run["config"]
        self.pairs, self.src = pairs, src
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
        self.geometry = g = _Geometry(self.pipe, model, (src["height"], src["width"]),
                                      src.get("num_frames"))
        _counting(self, g)
        self.save = _default_save(g, save, latents=True)
        self.pipe.scheduler = _belm_scheduler(self.pipe, src["scheduler"])
        grid = _grid(self.pipe, src["steps"], g.height, g.width, g.frames)
        if grid != src["grid"]:
            raise BulkError(f"the pairs were made on another grid than their config gives here "
                            f"({_describe_mismatch(src['grid'], grid)}): diffusers version "
                            "change?")
        edit = ({"prompt": prompt} if prompt is not None else
                {"prompts": str(prompts.resolve())} if prompts is not None else "stored prompts")
        self.config = _normalise({"pairs": str(pairs.resolve()), "source": src, "edit": edit,
                                  "save": self.save})

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
        media = f"{self.geometry.media}s"
        output = self.pipe(item.prompt, negative_prompt=rec["fingerprint"]["negative_prompt"],
                           latents=pair.x_T2, num_inference_steps=self.src["steps"],
                           guidance_scale=self.src["guidance_scale"], **self.geometry.config,
                           callback_on_step_end=last, return_dict=False,
                           output_type="pil" if media in self.save else "latent")[0]
        tensors = {"latents": last.latents} if "latents" in self.save else {}
        files = self.geometry.files(item.id, item.prompt, output) if media in self.save else {}
        return tensors, files


class GenerateJob(Job):
    """Images or videos (and latents) from prompts with O-BELM sampling, seeded per item id."""

    command = "generate-dataset"

    def __init__(self, pipe, model: str, items: list[Item], steps: int, guidance: float,
                 dtype: str, size: tuple[int, int] | None, seed: int, save: list[str] | None,
                 frames: int | None = None):
        self.geometry = g = _Geometry(pipe, model, size, frames)
        self.pipe, self.items, self.steps, self.guidance = pipe, items, steps, guidance
        self.height, self.width = g.height, g.width
        _counting(self, g)
        self.seed, self.save = seed, _default_save(g, save, latents=False)
        scheduler = _scheduler_config(pipe.scheduler)
        grid = _grid(pipe, steps, g.height, g.width, g.frames)
        pipe.scheduler = _belm_scheduler(pipe, scheduler)
        self.config = _normalise({
            "model": model, "pipeline": type(pipe).__name__, "scheduler": scheduler,
            "steps": steps, "grid": grid, "guidance_scale": guidance, "method": "obelm",
            "dtype": dtype, **g.config, "seed": seed, "save": self.save})

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
        media = f"{self.geometry.media}s"
        output = self.pipe(item.prompt, negative_prompt=item.negative_prompt,
                           num_inference_steps=self.steps, guidance_scale=self.guidance,
                           **self.geometry.config, generator=generator,
                           callback_on_step_end=last, return_dict=False,
                           output_type="pil" if media in self.save else "latent")[0]
        tensors = {"latents": last.latents} if "latents" in self.save else {}
        files = self.geometry.files(item.id, item.prompt, output) if media in self.save else {}
        return tensors, files
