"""Exact inversion through a diffusers pipeline: :func:`invert` and :func:`regenerate`.

One mechanism for every pipeline. A diffusers pipeline's loop calls
``scheduler.set_timesteps(...)`` with the sigmas (and mu) it computes, then for each ``t`` in
``scheduler.timesteps`` evaluates its model -- text and image conditioning, guidance, Wan 2.2's
switch between its two experts on ``t`` -- and calls ``scheduler.step(model_output, t, latents)``.
Given the clean latents and an inverse BELM scheduler in place of its own, that very loop is the
exact inversion: the inverse scheduler publishes the grid's timesteps from the clean end, and each
of its steps undoes one O-BELM step with the model output the loop computed at that step's own
state and timestep. Regeneration is the same loop with the sampling BELM scheduler, armed with
the pair (``set_latent_pair``). Both directions therefore evaluate the very model function the
pipeline samples with, by construction, whatever the pipeline's conditioning is.

A family (``_FAMILIES``) keeps only what differs between pipelines:

* the kind of noise schedule: variance preserving (``BELMScheduler``: SD, SDXL, CogVideoX) or
  rectified flow (``FlowMatchBELMScheduler``: the others; it also reproduces Wan's UniPC flow
  sigmas);
* images or videos, and how the VAE's latents are laid out for the pipeline's ``latents``
  argument: scaled (SD, SDXL, SD3, HunyuanVideo), normalised by the VAE's mean and std (Wan,
  Qwen-Image), packed into tokens (Flux, Flux Kontext, Chroma, Qwen-Image, LTX-Video), frames
  before channels (CogVideoX);
* the pixel multiple and the frame count the VAE and the transformer's patches need;
* a conditioning image given as the pipeline's ``image`` argument (Flux Kontext,
  Qwen-Image-Edit, Wan image-to-video): ``condition_image`` here, since ``image`` is what gets
  inverted;
* what cannot be inverted: SD3's skip-layer guidance (switched by the loop's step index, not by
  the timestep), a Wan 2.2 pipeline without its second transformer;
* ``steps``: the ``set_timesteps`` arguments the pipeline's call passes, so that the bulk jobs
  know a run's grid before running it (the tests check them against the grids of real runs).

Sizes. For an image or a video the size arguments (``height``, ``width``, ``num_frames``)
default to the input's own size, rounded down to the pixel multiple; they are passed to the
pipeline, and the pair records them (``pair.sizes``) so that :func:`regenerate` passes them
again. Packed latents given directly are checked against the token count of ``height`` x
``width`` (default: the pipeline's), unpacked video latents give the sizes themselves.

Exactness needs the regeneration to evaluate the very same model: pass the same prompt
arguments, guidance scales, conditioning image and ``num_inference_steps`` to :func:`invert` and
:func:`regenerate` (which also checks that the pair was made by the pipeline's class).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..schedule import calculate_shift
from .scheduling_belm import BELMScheduler
from .scheduling_belm_inverse import BELMInverseScheduler
from .scheduling_flow_match_belm import FlowMatchBELMScheduler
from .scheduling_flow_match_belm_inverse import FlowMatchBELMInverseScheduler
from .scheduling_utils import LatentPair, check_float_tensor

__all__ = ["SUPPORTED_PIPELINES", "image_latents", "invert", "regenerate", "video_latents"]

# Arguments of a pipeline call that invert and regenerate set themselves, or that would break
# the correspondence between the two runs (a callback may replace the latents; denoising_end
# stops SDXL's loop early).
_OWN_ARGUMENTS = ("latents", "output_type", "return_dict", "callback_on_step_end",
                  "callback_on_step_end_tensor_inputs", "callback", "callback_steps",
                  "denoising_end")
_PER_PROMPT = ("num_images_per_prompt", "num_videos_per_prompt")


# --------------------------------------------------------------------------------------------
# The VAE, and the latents layouts of the pipelines' ``latents`` arguments.


def _vae_encode(pipe, pixels: torch.Tensor, generator) -> torch.Tensor:
    """The VAE's latents of ``pixels`` (posterior mean, or a draw with ``generator``), in the
    VAE's dtype; float16 VAEs that ask for it encode in float32."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:  # as the SDXL img2img pipeline does: float16 overflows in this VAE
            vae.to(dtype=torch.float32)
        pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
        dist = vae.encode(pixels).latent_dist
        return (dist.mean if generator is None else dist.sample(generator)).to(dtype)
    finally:
        if upcast:
            vae.to(dtype=dtype)


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (like.dim() - 2)
    return torch.as_tensor(values).view(shape).to(device=like.device, dtype=like.dtype)


def _scaled(pipe, z: torch.Tensor) -> torch.Tensor:
    """As the image pipelines decode them: shift_factor and scaling_factor, or SDXL-style
    latents_mean / latents_std."""
    cfg = pipe.vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        return (z - _channel_view(mean, z)) * cfg.scaling_factor / _channel_view(std, z)
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        z = z - shift
    return z * cfg.scaling_factor


def _pack_2x2(pipe, latents: torch.Tensor) -> torch.Tensor:
    return pipe._pack_latents(latents, *latents.shape)


def _encode_image(pipe, pixels, generator):  # SD, SDXL, SD3
    return _scaled(pipe, _vae_encode(pipe, pixels, generator))


def _encode_packed_image(pipe, pixels, generator):  # Flux, Flux Kontext, Chroma
    return _pack_2x2(pipe, _encode_image(pipe, pixels, generator))


def _normalised(pipe, z: torch.Tensor) -> torch.Tensor:
    """Wan's and Qwen-Image's (z - latents_mean) / latents_std, as their encoders compute it."""
    cfg = pipe.vae.config
    return (z - _channel_view(cfg.latents_mean, z)) * (1.0 / _channel_view(cfg.latents_std, z))


def _encode_qwen_image(pipe, pixels, generator):  # a one-frame video for the 3-D VAE, packed
    z = _normalised(pipe, _vae_encode(pipe, pixels.unsqueeze(2), generator))
    b, c, _, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


def _encode_wan(pipe, pixels, generator):
    return _normalised(pipe, _vae_encode(pipe, pixels, generator))


def _encode_hunyuan(pipe, pixels, generator):
    return _vae_encode(pipe, pixels, generator) * pipe.vae.config.scaling_factor


def _encode_ltx(pipe, pixels, generator):
    z = _vae_encode(pipe, pixels, generator)
    vae = pipe.vae
    z = pipe._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return pipe._pack_latents(z, pipe.transformer_spatial_patch_size,
                              pipe.transformer_temporal_patch_size)


def _encode_cogvideox(pipe, pixels, generator):  # (batch, frames, channels, height, width)
    z = _vae_encode(pipe, pixels, generator).permute(0, 2, 1, 3, 4)
    return z * pipe.vae_scaling_factor_image


# --------------------------------------------------------------------------------------------
# The families' geometry: pixel multiples, frames, latents shapes.


def _vae_factor(pipe) -> int:
    return pipe.vae_scale_factor


def _sd3_multiple(pipe) -> int:
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size


def _packed_multiple(pipe) -> int:  # 2x2 packing of the VAE's latents
    return pipe.vae_scale_factor * 2


def _wan_multiple(pipe) -> int:
    model = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    return pipe.vae_scale_factor_spatial * model.config.patch_size[1]


def _hunyuan_multiple(pipe) -> int:
    return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size


def _ltx_multiple(pipe) -> int:
    return 32  # LTXPipeline.check_inputs


def _cogvideox_multiple(pipe) -> int:
    return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size


def _temporal(pipe) -> int:
    """How many frames the VAE compresses into one latent frame (videos have k * this + 1)."""
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):
        if hasattr(pipe, name):
            return getattr(pipe, name)
    raise AttributeError(f"{type(pipe).__name__} has no temporal compression factor")


def _spatial(pipe) -> int:
    for name in ("vae_scale_factor_spatial", "vae_spatial_compression_ratio"):
        if hasattr(pipe, name):
            return getattr(pipe, name)
    return pipe.vae_scale_factor


class _Layout(NamedTuple):
    """The shape of a family's latents (batch excluded): ``dims`` names each dimension; sizes are
    known for channels and, for packed latents, for tokens (from the size arguments)."""

    dims: tuple[str, ...]
    channels: int
    tokens: int | None = None
    hint: str = ""


def _unet_layout(pipe, sizes):
    return _Layout(("channels", "height", "width"), pipe.unet.config.in_channels)


def _sd3_layout(pipe, sizes):
    return _Layout(("channels", "height", "width"), pipe.transformer.config.in_channels)


def _packed_layout(pipe, sizes):
    h, w = sizes["height"], sizes["width"]
    step = pipe.vae_scale_factor * 2
    return _Layout(("tokens", "channels"), pipe.transformer.config.in_channels,
                   (h // step) * (w // step),
                   "; pack (batch, channels, h, w) latents with pipe._pack_latents(latents, "
                   "*latents.shape), or pass image=")


def _qwen_layout(pipe, sizes):
    h, w = sizes["height"], sizes["width"]
    step = pipe.vae_scale_factor * 2
    return _Layout(("tokens", "channels"), pipe.transformer.config.in_channels,
                   (h // step) * (w // step), "; pass image= or the packed latents")


def _wan_layout(pipe, sizes):
    return _Layout(("channels", "frames", "height", "width"), pipe.vae.config.z_dim)


def _hunyuan_layout(pipe, sizes):
    return _Layout(("channels", "frames", "height", "width"), pipe.transformer.config.in_channels)


def _ltx_layout(pipe, sizes):
    s, t = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
    p, pt = pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
    frames = (sizes["num_frames"] - 1) // t + 1
    tokens = (frames // pt) * (sizes["height"] // s // p) * (sizes["width"] // s // p)
    return _Layout(("tokens", "channels"), pipe.transformer.config.in_channels, tokens,
                   "; pass video= or the packed latents")


def _cogvideox_layout(pipe, sizes):
    return _Layout(("frames", "channels", "height", "width"), pipe.transformer.config.in_channels)


def _unpacked_video_sizes(pipe, latents) -> dict:
    """height, width and num_frames of unpacked video latents (the pipelines' own formula for
    the latents of a video of these sizes, inverted)."""
    dims = _FAMILY_OF[type(pipe)].layout(pipe, {}).dims
    shape = dict(zip(dims, latents.shape[1:], strict=True))
    s = _spatial(pipe)
    return {"height": shape["height"] * s, "width": shape["width"] * s,
            "num_frames": (shape["frames"] - 1) * _temporal(pipe) + 1}


# --------------------------------------------------------------------------------------------
# The set_timesteps arguments of a pipeline call (for the bulk jobs: the grid before the run).


def _steps(pipe, latents, num_inference_steps: int) -> dict:
    """The pipeline passes ``num_inference_steps`` only (SD, SDXL, Wan, CogVideoX)."""
    return {"num_inference_steps": num_inference_steps}


def _seq_len_mu(pipe, image_seq_len: int, max_shift: float = 1.15) -> float:
    cfg = pipe.scheduler.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                           cfg.get("max_shift", max_shift))


def _stable_diffusion_3_steps(pipe, latents, num_inference_steps, *, sigmas=None, mu=None):
    """As StableDiffusion3Pipeline: mu from the patch count when the scheduler shifts dynamically
    (and no mu is given); custom sigmas replace num_inference_steps."""
    if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
        patch = pipe.transformer.config.patch_size
        _, _, h, w = latents.shape
        mu = _seq_len_mu(pipe, (h // patch) * (w // patch), max_shift=1.16)  # its fallback
    steps = {"num_inference_steps": num_inference_steps} if sigmas is None else {"sigmas": sigmas}
    return steps if mu is None else {**steps, "mu": mu}


def _linspace_sigmas(n: int):
    return np.linspace(1.0, 1 / n, n)


def _flux_steps(pipe, latents, num_inference_steps, *, sigmas=None):
    """As FluxPipeline and FluxKontextPipeline: sigmas linspace(1, 1/N, N) unless given (none
    for a scheduler with UniPC's flow sigmas), mu from the packed sequence length (passed even to
    a static config, whose scheduler ignores it)."""
    if sigmas is None:
        sigmas = _linspace_sigmas(num_inference_steps)
    if pipe.scheduler.config.get("use_flow_sigmas", False):
        sigmas = None
    steps = {"num_inference_steps": num_inference_steps} if sigmas is None else {"sigmas": sigmas}
    return {**steps, "mu": _seq_len_mu(pipe, latents.shape[1])}


def _packed_steps(pipe, latents, num_inference_steps, *, sigmas=None):
    """As ChromaPipeline and the Qwen-Image pipelines: sigmas linspace(1, 1/N, N) unless given,
    mu from the packed sequence length."""
    if sigmas is None:
        sigmas = _linspace_sigmas(num_inference_steps)
    return {"sigmas": sigmas, "mu": _seq_len_mu(pipe, latents.shape[1])}


def _hunyuan_steps(pipe, latents, num_inference_steps, *, sigmas=None):
    """As HunyuanVideoPipeline: sigmas linspace(1, 0, N + 1)[:-1] unless given."""
    if sigmas is None:
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
    return {"sigmas": sigmas}


def _ltx_steps(pipe, latents, num_inference_steps):
    """As LTXPipeline: sigmas linspace(1, 1/N, N), mu from the video's latent voxel count."""
    voxels = pipe.transformer_spatial_patch_size ** 2 * pipe.transformer_temporal_patch_size
    return {"sigmas": _linspace_sigmas(num_inference_steps),
            "mu": _seq_len_mu(pipe, latents.shape[1] * voxels)}


# --------------------------------------------------------------------------------------------
# What a family refuses, and the call arguments it adds.


def _no_skip_layer_guidance(pipe, call):
    if call.get("skip_guidance_layers") is not None:
        raise ValueError(
            "skip_guidance_layers: StableDiffusion3Pipeline switches skip-layer guidance on and "
            "off by the loop's step index (skip_layer_guidance_start / _stop), not by the "
            "timestep, so the inversion (which walks the grid the other way) would evaluate "
            "another model than the regeneration; exact inversion needs it off (None)")


def _wan_experts(pipe, call):
    ratio = pipe.config.boundary_ratio
    if ratio is not None and pipe.transformer_2 is None and ratio > 0:
        raise ValueError(
            f"{type(pipe).__name__} has boundary_ratio={ratio} (Wan 2.2: transformer_2 denoises "
            "below the boundary timestep) but no transformer_2: load the pipeline with its "
            "second transformer (the low-noise expert)")
    if pipe.transformer is None and (ratio is None or ratio < 1):
        raise ValueError(f"{type(pipe).__name__} has no transformer (the high-noise expert), "
                         f"which boundary_ratio={ratio} uses")


def _kontext_area(sizes) -> dict:
    """FluxKontextPipeline rescales height x width to max_area (default a megapixel): an area
    of exactly height x width keeps the size of the latents."""
    return {"max_area": sizes["height"] * sizes["width"]}


class _Family(NamedTuple):
    pipeline: str                # diffusers pipeline class (its subclasses included)
    media: str                   # "image" or "video": what invert takes and the pipeline makes
    flow: bool                   # rectified flow (FlowMatchBELM schedulers) or VP (BELM)
    encode: Callable             # (pipe, pixels, generator) -> latents as the pipeline takes them
    multiple: Callable           # (pipe) -> the pixel multiple of height and width
    layout: Callable             # (pipe, sizes) -> _Layout of the latents
    steps: Callable = _steps     # (pipe, latents, N, **kw) -> the pipeline's set_timesteps args
    condition: bool = False      # takes condition_image (the pipeline's ``image`` argument)
    check: Callable | None = None  # (pipe, call) -> raise for what cannot be inverted
    extra: Callable | None = None  # (sizes) -> further size arguments of the call

    @property
    def scheduler(self) -> type:  # the BELM scheduler that samples (and regenerates) its grid
        return FlowMatchBELMScheduler if self.flow else BELMScheduler

    @property
    def inverse_scheduler(self) -> type:
        return FlowMatchBELMInverseScheduler if self.flow else BELMInverseScheduler

    @property
    def packed(self) -> bool:
        return self.layout in (_packed_layout, _qwen_layout, _ltx_layout)


_FAMILIES = (
    _Family("StableDiffusionPipeline", "image", False, _encode_image, _vae_factor, _unet_layout),
    _Family("StableDiffusionXLPipeline", "image", False, _encode_image, _vae_factor, _unet_layout),
    _Family("StableDiffusion3Pipeline", "image", True, _encode_image, _sd3_multiple, _sd3_layout,
            _stable_diffusion_3_steps, check=_no_skip_layer_guidance),
    _Family("FluxPipeline", "image", True, _encode_packed_image, _packed_multiple, _packed_layout,
            _flux_steps),
    _Family("FluxKontextPipeline", "image", True, _encode_packed_image, _packed_multiple,
            _packed_layout, _flux_steps, condition=True, extra=_kontext_area),
    _Family("ChromaPipeline", "image", True, _encode_packed_image, _packed_multiple,
            _packed_layout, _packed_steps),
    _Family("QwenImagePipeline", "image", True, _encode_qwen_image, _packed_multiple,
            _qwen_layout, _packed_steps),
    _Family("QwenImageEditPipeline", "image", True, _encode_qwen_image, _packed_multiple,
            _qwen_layout, _packed_steps, condition=True),
    _Family("WanPipeline", "video", True, _encode_wan, _wan_multiple, _wan_layout,
            check=_wan_experts),
    _Family("WanImageToVideoPipeline", "video", True, _encode_wan, _wan_multiple, _wan_layout,
            condition=True, check=_wan_experts),
    _Family("HunyuanVideoPipeline", "video", True, _encode_hunyuan, _hunyuan_multiple,
            _hunyuan_layout, _hunyuan_steps),
    _Family("LTXPipeline", "video", True, _encode_ltx, _ltx_multiple, _ltx_layout, _ltx_steps),
    _Family("CogVideoXPipeline", "video", False, _encode_cogvideox, _cogvideox_multiple,
            _cogvideox_layout),
)
#: The diffusers pipeline classes :func:`invert` supports (their subclasses too), by name.
SUPPORTED_PIPELINES = tuple(family.pipeline for family in _FAMILIES)


class _FamilyOf(dict):
    """pipeline class -> its family (the first supported base class), cached."""

    def __missing__(self, cls):
        import diffusers

        for family in _FAMILIES:
            if issubclass(cls, getattr(diffusers, family.pipeline)):
                self[cls] = family
                return family
        names = ", ".join(SUPPORTED_PIPELINES)
        raise TypeError(
            f"invert() does not support {cls.__name__}; it supports {names} (and their "
            "subclasses). A pipeline with the same components can be rebuilt as a supported "
            "one, e.g. StableDiffusionPipeline(**pipe.components)")


_FAMILY_OF = _FamilyOf()


def _family(pipe) -> _Family:
    return _FAMILY_OF[type(pipe)]


# --------------------------------------------------------------------------------------------
# Inputs: images and videos to pixels, sizes, the checks.


def _parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def _rounded(value: int, multiple: int, name: str) -> int:
    rounded = value // multiple * multiple
    if rounded <= 0:
        raise ValueError(f"{name} {value} is smaller than the pipeline's multiple of {multiple} "
                         "pixels")
    return rounded


def _check_multiple(pipe, sizes: dict, m: int) -> None:
    for name in ("height", "width"):
        if sizes[name] % m:
            raise ValueError(f"{name}={sizes[name]} is not a multiple of {m} pixels, which "
                             f"{type(pipe).__name__}'s VAE and patches need")


def _image_pixels(pipe, family, image, sizes) -> tuple[torch.Tensor, dict]:
    """``image`` through the pipeline's image processor at height x width (default: its own size
    rounded down to the family's multiple); returns the pixels and the sizes."""
    m = family.multiple(pipe)
    if "height" not in sizes or "width" not in sizes:
        h, w = pipe.image_processor.get_default_height_width(image)
        sizes = {"height": _rounded(h, m, "the image's height"),
                 "width": _rounded(w, m, "the image's width"), **sizes}
    _check_multiple(pipe, sizes, m)
    return pipe.image_processor.preprocess(image, height=sizes["height"],
                                           width=sizes["width"]), sizes


def _video_pixels(pipe, family, video, sizes) -> tuple[torch.Tensor, dict]:
    """``video`` (a list of frames, a (frames, channels, height, width) tensor, a batch of
    them; see diffusers' VideoProcessor.preprocess_video) at height x width (default: its own
    size rounded down to the family's multiple) as (batch, channels, frames, height, width)."""
    processor = pipe.video_processor
    try:
        pixels = processor.preprocess_video(video, sizes.get("height"), sizes.get("width"))
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"video must be a list of frames (PIL images or arrays), a (frames, "
                         "channels, height, width) tensor in [0, 1] or a batch of them: "
                         f"{exc}") from None
    m, t = family.multiple(pipe), _temporal(pipe)
    _, _, frames, h, w = pixels.shape
    if "height" not in sizes or "width" not in sizes:
        rh, rw = _rounded(h, m, "the video's height"), _rounded(w, m, "the video's width")
        if (rh, rw) != (h, w):
            pixels = processor.preprocess_video(video, rh, rw)
        sizes = {"height": rh, "width": rw, **sizes}
    _check_multiple(pipe, sizes, m)
    if (frames - 1) % t:
        raise ValueError(f"video has {frames} frames, but {type(pipe).__name__}'s VAE compresses "
                         f"{t} frames into one latent frame after the first: a video needs "
                         f"{t}k + 1 frames ({', '.join(str(t * k + 1) for k in range(4))}, ...)")
    if sizes.setdefault("num_frames", frames) != frames:
        raise ValueError(f"num_frames={sizes['num_frames']} but the video has {frames} frames")
    return pixels, sizes


def _default_sizes(pipe, params) -> dict:
    """The size arguments a call without them uses, for packed latents: the pipeline's default
    sample size, or its __call__ defaults."""
    sizes = {}
    for name in ("height", "width", "num_frames"):
        if name in params:
            default = params[name].default
            if default is None and name != "num_frames":
                default = pipe.default_sample_size * pipe.vae_scale_factor
            sizes[name] = default
    return sizes


def _check_layout(pipe, family, latents, sizes) -> None:
    layout = family.layout(pipe, sizes)
    expected = [layout.channels if d == "channels" else layout.tokens if d == "tokens" else None
                for d in layout.dims]
    shape = tuple(latents.shape)
    fits = latents.dim() == len(layout.dims) + 1 and all(
        e is None or e == s for e, s in zip(expected, shape[1:], strict=True))
    if fits:
        return
    name = type(pipe).__name__
    described = ", ".join(d if e is None else f"{d}={e}" for d, e in zip(layout.dims, expected,
                                                                           strict=True))
    if latents.dim() == len(layout.dims) + 1 and layout.tokens is not None \
            and shape[-1] == layout.channels:
        size = "x".join(str(sizes[k]) for k in ("height", "width") if k in sizes)
        frames = f", {sizes['num_frames']} frames" if "num_frames" in sizes else ""
        raise ValueError(
            f"packed latents of {size}{frames} have shape (batch, {described}), got {shape}: "
            "pass the height and width (and num_frames) of what they encode (to invert and to "
            "the pipeline)")
    packed = "packed " if layout.tokens is not None else ""
    raise ValueError(f"{name} takes {packed}latents of shape (batch, {described}), got shape "
                     f"{shape}{layout.hint}")


def _per_prompt(pipe, params, latents, call) -> dict:
    """num_images_per_prompt (or _videos_): the latents' batch over the prompts' batch, unless
    given."""
    prompt, embeds = call.get("prompt"), call.get("prompt_embeds")
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, (list, tuple)):
        batch = len(prompt)
    elif embeds is not None:
        batch = embeds.shape[0]
    else:
        raise ValueError("invert needs prompt or prompt_embeds (the conditioning used to "
                         "regenerate)")
    if latents.shape[0] % batch:
        raise ValueError(f"the latents' batch {latents.shape[0]} is not a multiple of the prompt "
                         f"batch {batch}")
    name = next((n for n in _PER_PROMPT if n in params), None)
    if name is None or name in call:
        return {}
    return {name: latents.shape[0] // batch}


def _call(pipe, family, params, call: dict, condition_image, what: str) -> dict:
    """The pipeline call's arguments from invert's / regenerate's: unknown and reserved ones
    refused, condition_image as the pipeline's image, the family's checks."""
    name = type(pipe).__name__
    unknown = sorted(set(call) - set(params))
    if unknown:
        allowed = sorted(set(params) - {"self", "image", *_OWN_ARGUMENTS})
        raise TypeError(f"{what}() got arguments that {name} does not take: {unknown} (it "
                        f"takes {allowed})")
    reserved = sorted(set(call) & set(_OWN_ARGUMENTS))
    if reserved:
        raise TypeError(f"{what}() sets or cannot pass {reserved} itself")
    call = {k: v for k, v in call.items() if v is not None}
    if family.condition:
        if condition_image is None:
            raise ValueError(f"{name} is conditioned on an image (its image argument): pass it "
                             f"as condition_image= (image= is what {what} takes)")
        call["image"] = condition_image
    elif condition_image is not None:
        raise ValueError(f"condition_image: {name} takes no conditioning image")
    if family.check is not None:
        family.check(pipe, call)
    return call


def _media(family, name, image, video, latents) -> None:
    given = [n for n, v in (("image", image), ("video", video), ("latents", latents))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"invert needs exactly one of image, video or latents, got "
                         f"{given or 'none'}")
    wrong = {"image": video, "video": image}[family.media]
    if wrong is not None:
        other = "video" if family.media == "image" else "image"
        raise ValueError(f"{name} makes {family.media}s: pass {family.media}=, not {other}= "
                         + ("(a list of frames or a (frames, channels, height, width) tensor)"
                            if family.media == "video" else "(one image or a list of them)"))


def _encode(pipe, family, media, sizes, generator) -> tuple[torch.Tensor, dict]:
    if family.media == "video":
        pixels, sizes = _video_pixels(pipe, family, media, sizes)
    else:
        pixels, sizes = _image_pixels(pipe, family, media, sizes)
    return family.encode(pipe, pixels, generator), sizes


@torch.no_grad()
def image_latents(pipe, image, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean latents of ``image`` that :func:`invert` inverts (and the pipeline's decoding
    turns back into the image), laid out as the pipeline's ``latents`` argument (packed for Flux,
    Chroma and Qwen-Image): ``pipe.image_processor`` at ``height`` x ``width`` (default: the
    image's own size, rounded down to the pipeline's multiple), then the VAE encoder's posterior
    mean (a draw with ``generator``), normalised as the pipeline's VAE config says."""
    family = _family(pipe)
    _media(family, type(pipe).__name__, image, None, None)
    sizes = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    return _encode(pipe, family, image, sizes, generator)[0]


@torch.no_grad()
def video_latents(pipe, video, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean latents of ``video`` (a list of frames, or a (frames, channels, height, width)
    tensor in [0, 1], or a batch of them) that :func:`invert` inverts, laid out as the video
    pipeline's ``latents`` argument: (batch, channels, frames, height, width) (CogVideoX: frames
    before channels; LTX-Video: packed). The frame count must be k * (the VAE's temporal
    compression) + 1; height and width default to the video's own, rounded down to the
    pipeline's multiple."""
    family = _family(pipe)
    _media(family, type(pipe).__name__, None, video, None)
    sizes = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    return _encode(pipe, family, video, sizes, generator)[0]


# --------------------------------------------------------------------------------------------
# Running the pipeline's loop with a BELM scheduler.


def _run(pipe, scheduler, progress: bool | None, desc: str, **call):
    """``pipe(**call)`` with ``scheduler`` in place of the pipeline's (restored afterwards)."""
    own = pipe.scheduler
    bar = getattr(pipe, "_progress_bar_config", None)
    try:
        pipe.scheduler = scheduler
        if progress is not None:
            pipe.set_progress_bar_config(**{**(bar or {}), "disable": not progress,
                                            "desc": desc})
        return pipe(**call)
    finally:
        pipe.scheduler = own
        if progress is not None:
            if bar is None:
                del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = bar


@torch.no_grad()
def invert(pipe, image=None, latents: torch.Tensor | None = None, prompt=None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt=None,
           negative_prompt_embeds: torch.Tensor | None = None,
           num_inference_steps: int | None = None, guidance_scale: float | None = None,
           generator: torch.Generator | None = None, height: int | None = None,
           width: int | None = None, backend: str | None = None,
           state_dtype: str | None = "float64", progress: bool = True, *, video=None,
           num_frames: int | None = None, condition_image=None,
           **pipeline_kwargs) -> LatentPair:
    """Invert an image, a video or their clean latents exactly with O-BELM through ``pipe``.

    ``pipe`` is one of ``SUPPORTED_PIPELINES`` (or a subclass). The input is one of ``image``
    (image pipelines), ``video`` (video pipelines: a list of frames, a (frames, channels, height,
    width) tensor in [0, 1], or a batch of them), each encoded by the pipeline's VAE (posterior
    mean, or a draw with ``generator``; see :func:`image_latents` / :func:`video_latents`), or
    clean ``latents`` as the pipeline's ``latents`` argument takes them (packed for Flux, Flux
    Kontext, Chroma, Qwen-Image and LTX-Video, as their ``output_type="latent"`` returns them).

    Every other argument is the pipeline's own and is passed to its call as given: ``prompt`` /
    ``prompt_embeds``, ``negative_prompt`` / ``negative_prompt_embeds``, ``guidance_scale``
    (default: the pipeline's), ``num_inference_steps`` (default: the pipeline's), and
    ``pipeline_kwargs`` among the pipeline's ``__call__`` arguments (e.g. ``true_cfg_scale``,
    ``guidance_scale_2``, ``max_sequence_length``, ``sigmas``, SDXL's size conditioning); unknown
    ones are refused. ``condition_image`` is the conditioning image of Flux Kontext,
    Qwen-Image-Edit and Wan image-to-video (their ``image`` argument). ``height``, ``width`` and
    ``num_frames`` default to the input's (see the module docstring) and are passed too.

    The pipeline's own loop runs once with the family's inverse BELM scheduler in place of its
    scheduler (built from ``pipe.scheduler.config``; ``backend`` defaults to that config's), so
    the model is evaluated exactly as the pipeline samples: N model calls (times the guidance
    batch). ``state_dtype`` is the dtype the inversion keeps its two states in (float64 by
    default; None: the latents' dtype): the pair carries them (``pair.state``) and a BELM
    scheduler armed with the pair continues in that dtype, so that the regeneration evaluates the
    model on the very inputs the inversion saw and gives the latents back to the last bit.

    Returns the :class:`LatentPair` ``(x_T, x_T2)`` in the latents' dtype, recording the grid,
    the pipeline's class (``pair.pipeline``) and the size arguments (``pair.sizes``). Regenerate
    with :func:`regenerate` (the same arguments; other prompts edit), or by hand:
    ``pipe.scheduler.set_latent_pair(pair)`` on the family's BELM scheduler, then
    ``pipe(..., latents=pair.x_T2, **pair.sizes)``.
    """
    family = _family(pipe)
    name = type(pipe).__name__
    _media(family, name, image, video, latents)
    params = _parameters(pipe)
    call = {"prompt": prompt, "prompt_embeds": prompt_embeds, "negative_prompt": negative_prompt,
            "negative_prompt_embeds": negative_prompt_embeds,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            **pipeline_kwargs}
    call = _call(pipe, family, params, call, condition_image, "invert")
    sizes = {k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames))
             if v is not None}
    unknown_sizes = sorted(set(sizes) - set(params))
    if unknown_sizes:
        raise TypeError(f"invert() got arguments that {name} does not take: {unknown_sizes}")
    if latents is None:
        latents, sizes = _encode(pipe, family, image if video is None else video, sizes,
                                 generator)
    else:
        check_float_tensor(latents, "latents")
        if family.packed:
            sizes = {**_default_sizes(pipe, params), **sizes}
        elif family.media == "video" and latents.dim() == 5:
            derived = _unpacked_video_sizes(pipe, latents)
            clash = {k: (v, derived[k]) for k, v in sizes.items() if derived[k] != v}
            if clash:
                raise ValueError(f"the latents are those of a video of {derived}, not {clash}")
            sizes = derived
        _check_layout(pipe, family, latents, sizes)
    if family.extra is not None:
        sizes = {**{k: v for k, v in family.extra(sizes).items() if k not in call}, **sizes}
    call.update(_per_prompt(pipe, params, latents, call))
    options = {"state_dtype": state_dtype} | ({} if backend is None else {"backend": backend})
    inverse = family.inverse_scheduler.from_config(pipe.scheduler.config, **options)
    _run(pipe, inverse, progress, "O-BELM inversion", latents=latents.to(pipe._execution_device),
         output_type="latent", **sizes, **call)
    pair = inverse.latent_pair
    return LatentPair(pair.x_T, pair.x_T2, state=pair.state, grid=pair.grid, pipeline=name,
                      sizes=sizes)


@torch.no_grad()
def regenerate(pipe, pair: LatentPair, *, condition_image=None, progress: bool | None = None,
               **call):
    """Sample from a pair made by :func:`invert`: with the arguments given to :func:`invert` the
    latents come back bit for bit; other prompts (or guidance) edit.

    Runs ``pipe(latents=pair.x_T2, **pair.sizes, **call)`` with the family's BELM sampling
    scheduler armed with the pair (``pipe.scheduler`` if it is one, else one built from its
    config for this call), N-1 model calls (N-2 on a zero-SNR grid). ``num_inference_steps``
    defaults to the pair's. Returns the pipeline's output (``output_type`` as given: pass
    ``"latent"`` for the latents). A pair made by another pipeline class, or on another grid, is
    refused.
    """
    family = _family(pipe)
    name = type(pipe).__name__
    if not isinstance(pair, LatentPair):
        raise TypeError(f"pair must be the LatentPair invert returned, got "
                        f"{type(pair).__name__}")
    if pair.pipeline is not None and pair.pipeline != name:
        raise ValueError(f"the pair was made by {pair.pipeline}, not {name}: another model "
                         "denoises other latents; regenerate with the pipeline that inverted")
    params = _parameters(pipe)
    output = {k: call.pop(k) for k in ("output_type", "return_dict") if k in call}
    if "num_inference_steps" not in call and "timesteps" in pair.grid:
        call["num_inference_steps"] = len(pair.grid["timesteps"])
    call = _call(pipe, family, params, call, condition_image, "regenerate")
    call.update(_per_prompt(pipe, params, pair.x_T2, call))
    scheduler = pipe.scheduler
    if not isinstance(scheduler, family.scheduler):
        scheduler = family.scheduler.from_config(scheduler.config)
    scheduler.set_latent_pair(pair)
    return _run(pipe, scheduler, progress, "O-BELM regeneration", latents=pair.x_T2,
                **{**pair.sizes, **call}, **output)
