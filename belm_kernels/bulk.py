"""Bulk jobs over a dataset, in one process or many: invert, regenerate / edit, generate.

Three commands (``belm-kernels invert-dataset | regenerate-dataset | generate-dataset``) share one
engine. They run unchanged as one process or under ``torchrun`` (or ``accelerate launch``):
with ``WORLD_SIZE > 1`` in the environment each process joins a ``torch.distributed`` group
(gloo on CPU, nccl on GPUs with one GPU per rank, ``cuda:LOCAL_RANK``).

Sharding. Every item has an id; ``shard_of(id, num_shards)`` (SHA-256 of the id, not Python's
salted ``hash``) puts it in one of a fixed number of shards. The number is chosen on the first
run into an output folder (``--shards``, default one shard per 8 items) and recorded there
(``run.json``), so a later run with any number of ranks finds the same shards. Shards that still
have work are dealt to the ranks (largest first, to the least loaded); finished ones are skipped.

Nothing lost. A shard is one safetensors file, ``shard-00003-of-00016.safetensors``, holding its
items' tensors (``<id>/<name>``) and, in its metadata, the run's config and a record per item
(what it was made from, the SHA-256 of each of its tensors and files, and of the record itself).
It is written whole: to a temporary file in the same folder, fsync'ed, then ``os.replace``'d
over the old one, so a reader sees the old shard or the new one, never a part. Image outputs
(``images/<id>.png``) are written the same way, before the shard that records them. A later run
into the folder verifies each shard file (readable, same config, and per item: inputs as in
this run, its record, tensors and files all matching their SHA-256) and skips it, or keeps what
passes and computes only the rest; an item that fails verification, or a shard file it cannot
read, is redone and reported. regenerate-dataset verifies each stored pair the same way before
using it, and refuses (fails) an item whose pair does not pass. Items are processed one at a
time, so an item's result does not depend on how many processes ran or which shard was next.

Bitwise reproducibility. Results depend on the device and on the number of intra-op CPU threads,
not on the number of processes: ``--threads`` (default 1, what torchrun's OMP_NUM_THREADS=1 gives
too) is set in every process, so one process and N ranks write the same bytes.

Failures. A bad item (unreadable or corrupt image, an image of another size or of a mode with no
defined 8-bit range, a missing prompt, an error in the model) is reported with its id and the
reason, and the others go on; a shard that cannot be written (disk full) is reported with its
items, its old file stays as it was and the temporary file is removed. Rank 0 prints the summary
of all ranks (items done, skipped, failed, stored results that failed verification) and writes it
to ``summary.json``; the exit code is 1 when anything failed. Problems with the job as a whole
(an unsupported pipeline, an output folder made by another model or grid, a malformed manifest)
stop it before anything is written, with exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import heapq
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The pipelines are those belm_kernels.diffusers.invert supports (its SUPPORTED_PIPELINES).
# --model names of the tiny offline pipelines (random weights), and how runs record them
TINY = {"tiny": "tiny_stable_diffusion_pipeline",
        "tiny-sdxl": "tiny_stable_diffusion_xl_pipeline",
        "tiny-sd3": "tiny_stable_diffusion_3_pipeline",
        "tiny-flux": "tiny_flux_pipeline"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMS_PER_SHARD = 8  # default shard size on the first run into a folder
# 3: a SHA-256 of every stored tensor, file and item record; 2: the full grid record (flow sigmas
# and mu), not timesteps. A folder of another format is refused.
FORMAT = "belm-kernels bulk 3"
META_KEY = "belm_kernels.bulk"  # the one metadata entry of a shard file (one key: stable bytes)
TIMEOUT = datetime.timedelta(hours=24)  # ranks wait for each other only at the start and the end
# Test hook: "RANK:K" makes that rank exit hard (os._exit) right after writing its K-th shard.
EXIT_HOOK = "BELM_BULK_TEST_EXIT_AFTER_SHARDS"


class BulkError(Exception):
    """A problem with the job as a whole: reported before anything is written (exit code 2)."""


# --------------------------------------------------------------------------------------------
# Items and where they come from.


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str | None
    negative_prompt: str | None = None
    image: Path | None = None
    seed: int | None = None
    origin: str = ""  # where it was read, for messages


def shard_of(item_id: str, num_shards: int) -> int:
    """The shard of an item: stable across processes, machines and Python versions."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _check_id(item_id: str, origin: str) -> str:
    if (not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id
            or len(item_id) > 200 or not item_id.isprintable()):
        raise BulkError(f"{origin}: bad item id {item_id!r}: ids name files, so they must be "
                        "non-empty, printable, at most 200 characters, without '/' or '\\' and "
                        "not start with '.'")
    return item_id


def _check_unique(items: list[Item], source: Path) -> list[Item]:
    seen: dict[str, str] = {}
    dupes = []
    for item in items:
        if item.id in seen:
            dupes.append(f"{item.id!r} ({seen[item.id]} and {item.origin})")
        seen[item.id] = item.origin
    if dupes:
        raise BulkError(f"{source}: item ids must be unique; duplicated: {', '.join(dupes[:10])}"
                        + (f" and {len(dupes) - 10} more" if len(dupes) > 10 else ""))
    return items


def _text(value: Any) -> str | None:
    """A prompt from a manifest: None when absent or blank."""
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _manifest_rows(path: Path) -> list[tuple[str, int, dict]]:
    """(origin, line number, row) of a .jsonl or .csv manifest; a malformed one is a BulkError."""
    if not path.is_file():
        raise BulkError(f"manifest {path} does not exist")
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BulkError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise BulkError(f"{path} line {n}: expected a JSON object, got {line.strip()!r}")
            rows.append((f"{path.name} line {n}", n, row))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                row = {k: v for k, v in row.items() if k is not None and v not in ("", None)}
                rows.append((f"{path.name} line {n}", n, row))
    else:
        raise BulkError(f"{path}: a manifest must be a .jsonl or .csv file")
    return rows


def read_image_items(data: Path, negative_prompt: str | None = None) -> list[Item]:
    """Images to invert: a folder of images with a sidecar ``<stem>.txt`` prompt each (id: the
    stem), or a manifest (.jsonl / .csv) with ``image`` (relative to the manifest), ``prompt`` and
    optional ``id`` (default: the image's stem) and ``negative_prompt``."""
    items = []
    if data.is_dir():
        for path in sorted(data.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                txt = path.with_suffix(".txt")
                prompt = _text(txt.read_text(encoding="utf-8")) if txt.is_file() else None
                items.append(Item(_check_id(path.stem, str(path)), prompt, negative_prompt, path,
                                  origin=str(path)))
        if not items:
            raise BulkError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    else:
        for origin, _, row in _manifest_rows(data):
            if "image" not in row:
                raise BulkError(f"{origin}: no 'image' field (expected id, image, prompt)")
            image = data.parent / str(row["image"])
            item_id = _check_id(str(row.get("id", image.stem)), origin)
            items.append(Item(item_id, _text(row.get("prompt")),
                              _text(row.get("negative_prompt", negative_prompt)), image,
                              origin=origin))
    return _check_unique(items, data)


def read_prompt_items(path: Path, negative_prompt: str | None = None) -> list[Item]:
    """Prompts: a .txt file (one per line; id: the line number, 6 digits; blank lines skipped) or
    a .jsonl / .csv manifest with ``prompt`` and optional ``id`` (default: the line number),
    ``negative_prompt`` and ``seed``."""
    items = []
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise BulkError(f"prompt list {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                items.append(Item(f"{n:06d}", line.strip(), negative_prompt,
                                  origin=f"{path.name} line {n}"))
    else:
        for origin, n, row in _manifest_rows(path):
            seed = row.get("seed")
            try:
                seed = None if seed is None else int(seed)
            except ValueError:
                raise BulkError(f"{origin}: seed must be an integer, got {seed!r}") from None
            items.append(Item(_check_id(str(row.get("id", f"{n:06d}")), origin),
                              _text(row.get("prompt")),
                              _text(row.get("negative_prompt", negative_prompt)), seed=seed,
                              origin=origin))
    if not items:
        raise BulkError(f"{path}: no prompts in this file")
    return _check_unique(items, path)


# --------------------------------------------------------------------------------------------
# Files: atomic writes and shard files.


def _write_bytes(f, data: bytes) -> None:
    """The one place output bytes hit the disk (tests simulate a full disk here)."""
    f.write(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: temporary file in the same folder, fsync,
    ``os.replace``, fsync of the folder. On any error the temporary file is removed and ``path``
    keeps its old content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_path(out: Path, shard: int, num_shards: int) -> Path:
    return out / f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a shard file; raises if it is unreadable or not a shard."""
    from safetensors import safe_open
    from safetensors.torch import load

    data = path.read_bytes()
    tensors = load(data)
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"no {META_KEY!r} metadata: not a shard of this tool")
    return tensors, json.loads(meta)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write(path, data)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor as a shard stores it: dtype, shape and bytes (C order, on the CPU)."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}\n".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def record_sha256(rec: dict) -> str:
    """SHA-256 of an item record (its JSON, keys sorted) without its own ``sha256`` entry: covers
    what the item was made from and the digests of its tensors and files."""
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def record_problem(out: Path, rec: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why a stored item cannot be trusted -- its record, a tensor (in ``tensors``, by
    ``<id>/<name>``) or a file (relative to ``out``) missing or not matching its SHA-256 --, or
    None. The one check of everything a shard stores, wherever a stored item is used."""
    if rec.get("sha256") != record_sha256(rec):
        return "its record does not match its SHA-256"
    for name, sha in rec["tensors"].items():
        t = tensors.get(f"{rec['id']}/{name}")
        if t is None:
            return f"tensor {name!r} is missing"
        if tensor_sha256(t) != sha:
            return f"tensor {name!r} does not match its SHA-256 (corrupted)"
    for rel, sha in rec["files"].items():
        try:
            data = (out / rel).read_bytes()
        except OSError as exc:
            return f"file {rel} is unreadable ({exc.strerror or exc})"
        if hashlib.sha256(data).hexdigest() != sha:
            return f"file {rel} does not match its SHA-256 (corrupted)"
    return None


def _normalise(obj: Any) -> Any:
    """JSON round trip (tuples -> lists, keys sorted): what a stored config reads back as."""
    return json.loads(json.dumps(obj, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Processes.


class Ranks:
    """This process's place in the job: rank, world size, device; a torch.distributed group when
    launched by torchrun / accelerate with WORLD_SIZE > 1 (gloo on CPU, nccl on GPUs)."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":  # one GPU per rank
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BulkError(f"--device {device} but no CUDA device is available")
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            cuda = self.device.type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                    device_id=self.device if cuda else None)

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Pipelines.


def tiny_record(name: str) -> str:
    return f"{name}: belm_kernels.diffusers.{TINY[name]}(seed=0), random weights"


def load_pipeline(model: str, dtype: torch.dtype, device: torch.device):
    """The pipeline and how it is recorded: a name of ``TINY`` (the offline random ones;
    recorded as ``tiny_record(name)``, which loads them too) or a local diffusers pipeline folder
    of a supported class (checked before any weight is loaded; recorded by its absolute path)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from . import diffusers as belm_diffusers

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
    from .diffusers.inversion import _family

    return _family(pipe).scheduler.from_config(config)


def _grid(pipe, steps: int, height: int, width: int) -> dict:
    """The grid record (``LatentPair.grid``, as JSON reads it back) of a run of ``steps`` at
    height x width with ``pipe.scheduler``'s config: the family's BELM scheduler set as the
    pipeline sets it (timesteps; for flow also the sigmas, and mu from the image size)."""
    from PIL import Image

    from .diffusers import image_latents
    from .diffusers.inversion import _family

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


# --------------------------------------------------------------------------------------------
# The jobs: what an item is made from (fingerprint) and what it makes (tensors and files).


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
        from .diffusers import invert

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

        from .diffusers import LatentPair

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


def _read_run(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BulkError(f"{path} is unreadable ({exc}); it records the folder's config: restore "
                        "it, or use another output folder") from None
    if run.get("format") != FORMAT:
        raise BulkError(f"{path} is not a run record of this version of the tool ({FORMAT}; it "
                        f"has {run.get('format')!r}): use another folder")
    return run


def _stored_items(out: Path, num_shards: int) -> tuple[dict[str, tuple[Path, dict]], list[dict]]:
    """Every item record of a folder's shards with its shard's path (the records are verified
    where their tensors are read), and a failure per shard file that cannot be read (its items
    cannot be used)."""
    from safetensors import safe_open

    stored, failures = {}, []
    for shard in range(num_shards):
        path = shard_path(out, shard, num_shards)
        if not path.exists():
            continue
        try:
            with safe_open(path, "pt") as f:
                meta = json.loads(f.metadata()[META_KEY])
        except Exception as exc:
            failures.append({"id": None, "shard": shard,
                             "error": f"shard file {path} is unreadable ({exc}); its items are "
                                      "missing: run invert-dataset into that folder again"})
            continue
        for rec in meta["items"]:
            stored[rec["id"]] = (path, rec)
    return stored, failures


# --------------------------------------------------------------------------------------------
# The engine.


def _describe_mismatch(old: dict, new: dict, prefix: str = "") -> str:
    """The keys whose values differ (nested ones as ``grid.mu``), with both values."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(
        _describe_mismatch(old[k], new[k], f"{prefix}{k}.")
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict) else
        f"{prefix}{k}: {json.dumps(old.get(k))[:200]} there, {json.dumps(new.get(k))[:200]} "
        "in this run" for k in keys)


def _check_folder(job: Job, out: Path, num_shards: int | None) -> tuple[dict | None, int]:
    """The folder's run record (None on a first run) and the shard count; refuses a folder made
    by another command or config before anything is written."""
    if out.exists() and not out.is_dir():
        raise BulkError(f"--out {out} exists and is not a folder")
    run = _read_run(out)
    if run is None:
        if any(out.glob("shard-*.safetensors")):
            raise BulkError(f"--out {out} holds shard files but no run.json: not safe to add to; "
                            "use another output folder")
        return None, (num_shards or job.default_shards
                      or max(1, math.ceil(len(job.items) / ITEMS_PER_SHARD)))
    how = f"use another --out folder, or delete {out} to start over"
    if run["command"] != job.command:
        raise BulkError(f"--out {out} holds the output of {run['command']}, not {job.command}: "
                        f"{how}")
    if run["config"] != job.config:
        raise BulkError(f"--out {out} holds results made with another config ("
                        f"{_describe_mismatch(run['config'], job.config)}): refusing to mix "
                        f"them; rerun with the same options to resume, or {how}")
    if num_shards not in (None, run["num_shards"]):
        raise BulkError(f"--out {out} is split into {run['num_shards']} shards (fixed per folder),"
                        f" not --shards {num_shards}: omit --shards to resume, or {how}")
    return run, run["num_shards"]


def _load_shard(job: Job, out: Path, shard: int):
    """(tensors, trusted records, problems) of a shard file: what it holds, the records of the
    items that pass their checks (``record_problem``), and a problem (shard, id, text) per item
    that does not -- or one for the whole file if it is unreadable (then nothing is trusted). A
    shard of another config than the job's is a BulkError."""
    path = shard_path(out, shard, job.num_shards)
    if not path.exists():
        return {}, {}, []
    try:
        tensors, meta = read_shard(path)
    except Exception as exc:
        return {}, {}, [{"shard": shard, "id": None, "problem": f"shard file {path.name} is "
                         f"unreadable ({exc}): its items are computed again"}]
    if meta.get("config") != job.config:
        raise BulkError(f"{path} was made with another config than its folder's run.json "
                        f"({_describe_mismatch(meta.get('config') or {}, job.config)}); "
                        "refusing to overwrite it")
    trusted, problems = {}, []
    for rec in meta.get("items", []):
        problem = record_problem(out, rec, tensors)
        if problem is None:
            trusted[rec["id"]] = rec
        else:
            problems.append({"shard": shard, "id": rec.get("id"), "problem": f"shard file "
                             f"{path.name}, item {rec.get('id')!r}: {problem}: computed again"})
    return tensors, trusted, problems


def _shard_status(job, out, shard, items):
    """(shard, items to compute, items reusable, refusal, problems) of a shard of this rank's
    check: the stored items are verified here, before anything is counted as done."""
    try:
        _, trusted, problems = _load_shard(job, out, shard)
    except BulkError as exc:
        return shard, None, None, str(exc), []
    reuse = sum(1 for it in items
                if it.id in trusted and trusted[it.id]["fingerprint"] == job.fingerprint(it))
    return shard, len(items) - reuse, reuse, None, problems


def _deal(todo: list[tuple[int, int]], world: int) -> list[list[int]]:
    """Shards with work -> ranks: largest first, each to the least loaded rank (deterministic)."""
    loads = [(0, r) for r in range(world)]
    assigned: list[list[int]] = [[] for _ in range(world)]
    for shard, n in sorted(todo, key=lambda sn: (-sn[1], sn[0])):
        load, r = heapq.heappop(loads)
        assigned[r].append(shard)
        heapq.heappush(loads, (load + n, r))
    return [sorted(a) for a in assigned]


def _exit_hook(rank: int) -> int | None:
    spec = os.environ.get(EXIT_HOOK)
    if not spec:
        return None
    who, k = spec.split(":")
    return int(k) if int(who) == rank else None


def _prepare_folder(job: Job, out: Path, record: bool) -> None:
    """Rank 0, before any shard is written: create the folder, remove temporary files left by a
    killed process, and on a first run record the config (run.json)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "images"):
        for stale in folder.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    if record:
        import diffusers

        atomic_write(out / "run.json", json.dumps(
            {"format": FORMAT, "command": job.command, "num_shards": job.num_shards,
             "config": job.config,
             "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}},
            indent=1, sort_keys=True).encode("utf-8"))


def _summarise(job: Job, out: Path, ranks: Ranks, mine: dict, skipped: int,
               untrusted: list[dict]) -> int:
    """Gather every rank's counts; rank 0 prints them and writes summary.json. The exit code."""
    parts = ranks.gather(mine)
    failures = [*job.source_failures, *(f for p in parts for f in p["failures"])]
    done = sum(p["done"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    summary = {
        "command": job.command, "items": len(job.items), "done": done, "skipped": skipped,
        "failed": len(failures), "failures": failures, "untrusted": untrusted,
        "num_shards": job.num_shards,
        "shards_written": sum(p["written"] for p in parts), "world_size": ranks.world,
        "threads": torch.get_num_threads(), "device": str(ranks.device),
        "seconds": round(seconds, 3),
        "check_seconds": round(max(p["check_seconds"] for p in parts), 3),
        "items_per_second": round(done / seconds, 4) if done and seconds > 0 else None}
    if ranks.rank == 0:
        atomic_write(out / "summary.json", json.dumps(summary, indent=1).encode("utf-8"))
        rate = f", {summary['items_per_second']} items/s" if summary["items_per_second"] else ""
        bad = (f", {len(untrusted)} stored result(s) failing verification computed again"
               if untrusted else "")
        print(f"{job.command}: {len(job.items)} items: {done} done, {skipped} skipped (already "
              f"in {out}, verified), {len(failures)} failed{bad}; {summary['shards_written']} of "
              f"{job.num_shards} shards written by {ranks.world} process(es) in {seconds:.1f} s"
              f"{rate}")
        for f in failures:
            what = f"item {f['id']!r}" if f["id"] is not None else "shard"
            print(f"  FAILED {what} (shard {f['shard']}): {f['error']}")
        print(f"summary: {out / 'summary.json'}")
    return 1 if failures else 0


def run_job(job: Job, out: Path, ranks: Ranks, num_shards: int | None = None,
            progress: bool = True) -> int:
    """Run ``job`` into ``out`` on this rank; returns the exit code (the same on every rank)."""
    from tqdm.auto import tqdm

    run, job.num_shards = _check_folder(job, out, num_shards)
    by_shard: dict[int, list[Item]] = {}
    for item in job.items:
        by_shard.setdefault(shard_of(item.id, job.num_shards), []).append(item)
    if ranks.rank == 0:
        _prepare_folder(job, out, record=run is None)

    # Which shards have work: each rank checks (and verifies) a slice, then all see all (and
    # wait for rank 0).
    checking = time.perf_counter()
    mine = [s for s in sorted(by_shard) if s % ranks.world == ranks.rank]
    status = [_shard_status(job, out, s, by_shard[s]) for s in mine]
    check_seconds = time.perf_counter() - checking
    status = sorted(st for part in ranks.gather(status) for st in part)
    foreign = [refusal for *_, refusal, _ in status if refusal]
    if foreign:
        raise BulkError(foreign[0] + (f" (and {len(foreign) - 1} more shards)"
                                      if len(foreign) > 1 else ""))
    untrusted = [p for *_, problems in status for p in problems]
    if ranks.rank == 0:
        for p in untrusted:
            print(f"NOT TRUSTED: {p['problem']}", file=sys.stderr, flush=True)
    skipped = sum(reuse for _, _, reuse, _, _ in status)
    todo = [(s, n) for s, n, *_ in status if n]
    my_shards = _deal(todo, ranks.world)[ranks.rank]
    n_mine = sum(n for s, n in todo if s in my_shards)

    done, failures, written = 0, [], 0
    exit_after = _exit_hook(ranks.rank)
    start = time.perf_counter()
    bar = tqdm(total=n_mine, position=ranks.rank, desc=f"{job.command} [rank {ranks.rank}]",
               unit="item", disable=not progress, dynamic_ncols=True)

    def report(shard, item_id, error):
        failures.append({"id": item_id, "shard": shard, "error": error})
        bar.write(f"[rank {ranks.rank}] FAILED item {item_id!r} (shard {shard}): {error}",
                  file=sys.stderr)

    for shard in my_shards:
        path = shard_path(out, shard, job.num_shards)
        tensors, records, _ = _load_shard(job, out, shard)  # its problems were reported above
        new = []
        for item in by_shard[shard]:
            fingerprint = job.fingerprint(item)
            rec = records.get(item.id)
            if rec is not None and rec["fingerprint"] == fingerprint:
                continue
            try:
                made, files = job.process(item)
                for rel, data in files.items():
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(out / rel, data)
            except Exception as exc:  # reported; the other items go on
                report(shard, item.id, str(exc) if isinstance(exc, ValueError)  # ours: readable
                       else f"{type(exc).__name__}: {exc}")
                bar.update()
                continue
            for name in [k for k in tensors if k.startswith(f"{item.id}/")]:
                del tensors[name]  # an outdated result of this id
            tensors.update({f"{item.id}/{name}": t for name, t in made.items()})
            rec = {"id": item.id, "fingerprint": fingerprint, "origin": item.origin,
                   "tensors": {name: tensor_sha256(t) for name, t in sorted(made.items())},
                   "files": {rel: hashlib.sha256(data).hexdigest()
                             for rel, data in sorted(files.items())}}
            records[item.id] = {**rec, "sha256": record_sha256(rec)}
            new.append(item.id)
            bar.update()
        if not new:  # (an unreadable old file stays until there is something to replace it)
            continue
        meta = {"config": job.config, "shard": shard, "num_shards": job.num_shards,
                "items": [records[i] for i in sorted(records)]}
        tensors = {k: v for k, v in tensors.items() if k.rsplit("/", 1)[0] in records}
        try:
            write_shard(path, tensors, meta)
        except OSError as exc:
            for item_id in new:
                report(shard, item_id, f"shard file {path} could not be written ({exc}); the "
                                       "item is not saved, its shard file is as it was")
            continue
        done += len(new)
        written += 1
        if exit_after is not None and written >= exit_after:
            bar.close()
            print(f"[rank {ranks.rank}] {EXIT_HOOK}: exiting after {written} shards",
                  file=sys.stderr, flush=True)
            os._exit(17)
    bar.close()
    return _summarise(job, out, ranks, {"done": done, "failures": failures, "written": written,
                                        "seconds": time.perf_counter() - start,
                                        "check_seconds": check_seconds}, skipped, untrusted)


# --------------------------------------------------------------------------------------------
# Command line (registered by belm_kernels.cli).


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
    if not items or any(v not in ("images", "latents") for v in items):
        raise argparse.ArgumentTypeError(f"expected images, latents or images,latents, got "
                                         f"{text!r}")
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
                        f"supports), or {' / '.join(TINY)}: a tiny random SD (the default) / "
                        "SDXL / SD3 / Flux pipeline built offline, for trying")
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
                   help="image size, 512 or WxH (default: the pipeline's default size)")


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
        items = read_image_items(args.data, args.negative_prompt)
        pipe, model = load_pipeline(args.model, DTYPES[args.dtype], ranks.device)
        return InvertJob(pipe, model, items, args.steps, args.guidance, args.dtype, args.size,
                         args.resize, args.method)
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
                           args.seed, args.save)
    return _execute(args, make)


def add_commands(sub) -> None:
    """Register invert-dataset, regenerate-dataset and generate-dataset on the CLI."""
    p = sub.add_parser("invert-dataset", help="invert a folder / manifest of images exactly "
                       "(O-BELM) into latent pairs; one process or torchrun",
                       description="Invert images exactly with O-BELM and store the latent pairs "
                       "(and the float64 states that make regeneration bit-exact) in sharded "
                       "safetensors files. Resumable; runs as one process or under torchrun.")
    p.add_argument("--data", type=Path, required=True,
                   help="a folder of images with a <stem>.txt prompt beside each, or a manifest "
                        ".jsonl / .csv with image, prompt and optional id, negative_prompt")
    _common(p, "output folder of the pairs (resumed if it holds a run of the same config)")
    _model_options(p, steps=50)
    p.add_argument("--resize", action="store_true",
                   help="resize images of another size to --size (default: such an item fails)")
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
    _common(p, "output folder (latents in shard files, images in images/)")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--prompt", help="one new prompt for every item (an edit)")
    edit.add_argument("--prompts", type=Path,
                      help="a .jsonl / .csv manifest of id, prompt: edit those items")
    p.add_argument("--save", type=_save, default=["images", "latents"],
                   help="what to write: images, latents or both (default images,latents)")
    p.set_defaults(func=regenerate_dataset)

    p = sub.add_parser("generate-dataset", help="generate images from a prompt list with "
                       "O-BELM, seeded per item", description="Generate an image per prompt "
                       "with O-BELM sampling, seeded per item id (reruns give the same images). "
                       "Sharded and resumable like invert-dataset.")
    p.add_argument("--prompts", type=Path, required=True,
                   help="a .txt file (one prompt per line) or a .jsonl / .csv manifest with "
                        "prompt and optional id, negative_prompt, seed")
    _common(p, "output folder (images/<id>.png with a <id>.txt prompt each, so it can be "
               "inverted; latents in shard files)")
    _model_options(p, steps=30)
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; each item's seed derives from it and the item id (default 0)")
    p.add_argument("--save", type=_save, default=["images"],
                   help="what to write: images, latents or both (default images)")
    p.set_defaults(func=generate_dataset)
