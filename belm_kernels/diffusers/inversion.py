"""Exact inversion through a diffusers pipeline: ``invert(pipe, ...)``.

:func:`invert` is one entry point for every supported pipeline family. A family (``_FAMILIES``)
knows how to turn the pipeline's own arguments into the model call its ``__call__`` makes at each
step -- text encoders, extra conditioning, classifier-free guidance -- and which inverse scheduler
walks its grid; everything else (image to latents, the loop, the pair) is shared. Supported:

* ``StableDiffusionPipeline`` (SD 1.x / 2.x): ``encode_prompt``, CFG.
* ``StableDiffusionXLPipeline``: both text encoders, the pooled text embedding and the size
  conditioning (``added_cond_kwargs``), CFG with the negative conditioning the pipeline builds
  (zeros when ``force_zeros_for_empty_prompt`` and no negative prompt).
* ``StableDiffusion3Pipeline`` (rectified flow): the three text encoders through
  ``encode_prompt``, the pooled projections, CFG; the sigmas of ``num_inference_steps`` (or the
  given ``sigmas``) and, with dynamic shifting, mu from the latents' patch count (or the given
  ``mu``), as the pipeline passes them to its scheduler.
* ``FluxPipeline`` (rectified flow): packed latents with the pipeline's latent image ids and text
  ids, distilled guidance through the transformer's ``guidance`` input (``guidance_embeds``),
  true CFG (``true_cfg_scale`` with a negative prompt), the sigmas ``linspace(1, 1/N, N)`` and mu
  from the packed sequence length, as the pipeline computes them.

Subclasses of these are accepted; any other pipeline gets a TypeError naming the supported ones.
Exactness needs the regeneration to evaluate the very same model: pass the same prompt arguments,
guidance scale, size arguments and ``num_inference_steps`` to :func:`invert` and to the pipeline.
:func:`image_latents` gives the clean latents of an image that :func:`invert` inverts.

A new family is a conditioning function (see ``_stable_diffusion``) and, for a pipeline with
another kind of schedule or latents, its BELM schedulers (sampling and inverse) and its timesteps
and image-latents functions, added to ``_FAMILIES``; nothing else changes. ``SUPPORTED_PIPELINES``
names the families' pipeline classes (the bulk commands check a model folder against it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..schedule import calculate_shift
from .scheduling_belm import BELMScheduler
from .scheduling_belm_inverse import BELMInverseScheduler
from .scheduling_flow_match_belm import FlowMatchBELMScheduler
from .scheduling_flow_match_belm_inverse import FlowMatchBELMInverseScheduler
from .scheduling_utils import LatentPair, check_float_tensor

__all__ = ["SUPPORTED_PIPELINES", "image_latents", "invert"]


# --------------------------------------------------------------------------------------------
# Shared pieces.


def _vae_latents(pipe, image, height, width, generator) -> torch.Tensor:
    """Clean latents of ``image`` as the pipeline's VAE decoding expects them back (posterior
    mean, or a draw with ``generator``); float16 VAEs that ask for it encode in float32."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:  # as the SDXL img2img pipeline does: float16 overflows in this VAE
            vae.to(dtype=torch.float32)
        pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
        dist = vae.encode(pixels).latent_dist
        latents = (dist.mean if generator is None else dist.sample(generator)).to(dtype)
    finally:
        if upcast:
            vae.to(dtype=dtype)
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # the inverse of the pipelines' decoding
        view = dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(**view)
        std = torch.tensor(std).view(1, -1, 1, 1).to(**view)
        return (latents - mean) * cfg.scaling_factor / std
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * cfg.scaling_factor


def _prompt_batch(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    if prompt_embeds is None:
        raise ValueError("invert needs prompt or prompt_embeds (the conditioning used to "
                         "regenerate)")
    return prompt_embeds.shape[0]


def _do_cfg(pipe, guidance_scale: float) -> bool:
    """Classifier-free guidance, as the UNet pipelines decide it."""
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def _unet_model(pipe, latents: torch.Tensor, unet_kwargs: dict, guidance_scale: float
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guided noise prediction the UNet pipelines' loops compute: with CFG the batch
    [negative, positive] and ``uncond + g * (text - uncond)`` (no guidance rescale)."""
    do_cfg = _do_cfg(pipe, guidance_scale)
    unet = pipe.unet
    timestep_cond = None
    if unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM)
        w = torch.tensor(guidance_scale - 1).repeat(latents.shape[0])
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=unet.config.time_cond_proj_dim).to(latents.device, latents.dtype)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = unet(torch.cat([x] * 2) if do_cfg else x, t, timestep_cond=timestep_cond,
                     return_dict=False, **unet_kwargs)[0]
        if do_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance_scale * (text - uncond)
        return noise

    return model


def _steps(pipe, latents, num_inference_steps: int) -> dict:
    """The arguments of the inverse scheduler's ``set_timesteps``: here the pipeline's
    ``num_inference_steps``; a flow family also passes the pipeline's sigmas and mu."""
    return {"num_inference_steps": num_inference_steps}


# --------------------------------------------------------------------------------------------
# The families. Each conditioning function takes the pipeline, the clean latents (on the
# device), the number of latents per prompt, the guidance scale, the height/width given to
# invert, and the pipeline's own prompt arguments (its keyword names and defaults), and returns
# the model function and the latents in the model's dtype.


def _stable_diffusion(pipe, latents, per_prompt, guidance_scale, height, width, *, prompt=None,
                      prompt_embeds=None, negative_prompt=None, negative_prompt_embeds=None):
    do_cfg = _do_cfg(pipe, guidance_scale)
    cond, uncond = pipe.encode_prompt(prompt, latents.device, per_prompt, do_cfg, negative_prompt,
                                      prompt_embeds=prompt_embeds,
                                      negative_prompt_embeds=negative_prompt_embeds)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond
    latents = latents.to(cond.dtype)
    return _unet_model(pipe, latents, {"encoder_hidden_states": embeds}, guidance_scale), latents


def _stable_diffusion_xl(pipe, latents, per_prompt, guidance_scale, height, width, *, prompt=None,
                         prompt_2=None, prompt_embeds=None, negative_prompt=None,
                         negative_prompt_2=None, negative_prompt_embeds=None,
                         pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                         original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                         negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                         negative_target_size=None):
    device = latents.device
    do_cfg = _do_cfg(pipe, guidance_scale)
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=per_prompt,
        do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    # The size conditioning, defaulted as StableDiffusionXLPipeline.__call__ does: from height
    # and width, which default to the UNet's sample size (not to the latents' size).
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    proj_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                else pipe.text_encoder_2.config.projection_dim)

    def time_ids(size, crop, target):
        return pipe._get_add_time_ids(size or (height, width), crop, target or (height, width),
                                      dtype=embeds.dtype, text_encoder_projection_dim=proj_dim)

    ids = time_ids(original_size, crops_coords_top_left, target_size)
    neg_ids = ids
    if negative_original_size is not None and negative_target_size is not None:
        neg_ids = time_ids(negative_original_size, negative_crops_coords_top_left,
                           negative_target_size)
    if do_cfg:
        embeds = torch.cat([neg_embeds, embeds])
        pooled = torch.cat([neg_pooled, pooled])
        ids = torch.cat([neg_ids, ids])
    # as the pipeline does: the (negative, positive) rows repeated once per latent
    ids = ids.to(device).repeat(latents.shape[0], 1)
    unet_kwargs = {"encoder_hidden_states": embeds.to(device),
                   "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": ids}}
    latents = latents.to(embeds.dtype)
    return _unet_model(pipe, latents, unet_kwargs, guidance_scale), latents


def _stable_diffusion_3(pipe, latents, per_prompt, guidance_scale, height, width, *, prompt=None,
                        prompt_2=None, prompt_3=None, prompt_embeds=None, negative_prompt=None,
                        negative_prompt_2=None, negative_prompt_3=None,
                        negative_prompt_embeds=None, pooled_prompt_embeds=None,
                        negative_pooled_prompt_embeds=None, clip_skip=None,
                        max_sequence_length=256):
    transformer = pipe.transformer
    channels = transformer.config.in_channels
    if latents.dim() != 4 or latents.shape[1] != channels:
        raise ValueError(f"{type(pipe).__name__} latents have shape (batch, {channels}, height, "
                         f"width), got {tuple(latents.shape)}")
    do_cfg = guidance_scale > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
        do_classifier_free_guidance=do_cfg, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=latents.device,
        clip_skip=clip_skip, num_images_per_prompt=per_prompt,
        max_sequence_length=max_sequence_length)
    if do_cfg:
        embeds = torch.cat([neg_embeds, embeds])
        pooled = torch.cat([neg_pooled, pooled])

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x] * 2) if do_cfg else x
        v = transformer(hidden_states=x_in, timestep=t.expand(x_in.shape[0]),
                        encoder_hidden_states=embeds, pooled_projections=pooled,
                        joint_attention_kwargs=None, return_dict=False)[0]
        if do_cfg:
            uncond, text = v.chunk(2)
            v = uncond + guidance_scale * (text - uncond)
        return v

    return model, latents.to(embeds.dtype)


def _stable_diffusion_3_steps(pipe, latents, num_inference_steps, *, sigmas=None, mu=None):
    """As StableDiffusion3Pipeline: mu from the patch count when the scheduler shifts dynamically
    (and no mu is given); custom sigmas replace num_inference_steps."""
    cfg = pipe.scheduler.config
    if cfg.get("use_dynamic_shifting", None) and mu is None:
        patch = pipe.transformer.config.patch_size
        _, _, h, w = latents.shape
        mu = calculate_shift((h // patch) * (w // patch), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.16))  # the pipeline's fallbacks
    steps = {"num_inference_steps": num_inference_steps} if sigmas is None else {"sigmas": sigmas}
    return steps if mu is None else {**steps, "mu": mu}


def _flux_latent_size(pipe, height, width) -> tuple[int, int, int, int]:
    """(height, width) in pixels, defaulted as FluxPipeline does, and the unpacked latents'
    (height, width) as its prepare_latents computes them (even, for the 2x2 packing)."""
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    step = pipe.vae_scale_factor * 2
    return height, width, 2 * (int(height) // step), 2 * (int(width) // step)


def _flux_image_latents(pipe, image, height, width, generator) -> torch.Tensor:
    """Packed latents of ``image`` resized to (height, width), defaulted as the pipeline does."""
    height, width, _, _ = _flux_latent_size(pipe, height, width)
    latents = _vae_latents(pipe, image, height, width, generator)
    return pipe._pack_latents(latents, *latents.shape)


def _flux(pipe, latents, per_prompt, guidance_scale, height, width, *, prompt=None,
          prompt_2=None, prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt=None,
          negative_prompt_2=None, negative_prompt_embeds=None,
          negative_pooled_prompt_embeds=None, true_cfg_scale=1.0, max_sequence_length=512):
    transformer = pipe.transformer
    channels = transformer.config.in_channels
    height, width, lh, lw = _flux_latent_size(pipe, height, width)
    tokens = (lh // 2) * (lw // 2)
    if latents.dim() != 3:
        hint = (f"; pack (batch, {channels // 4}, h, w) latents with pipe._pack_latents(latents, "
                "*latents.shape), or pass image=" if latents.dim() == 4 else "")
        raise ValueError(f"{type(pipe).__name__} takes packed latents of shape (batch, tokens, "
                         f"{channels}) (2x2 patches), got shape {tuple(latents.shape)}{hint}")
    if tuple(latents.shape[1:]) != (tokens, channels):
        raise ValueError(
            f"packed latents of a {height}x{width} image have shape (batch, {tokens}, "
            f"{channels}), got {tuple(latents.shape)}: pass the height and width of the image "
            "they encode (to invert and to the pipeline)")
    device = latents.device
    encode = dict(device=device, num_images_per_prompt=per_prompt,
                  max_sequence_length=max_sequence_length)
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds, **encode)
    has_negative = negative_prompt is not None or (
        negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
    true_cfg = true_cfg_scale > 1 and has_negative  # as FluxPipeline decides it
    if true_cfg:
        neg_embeds, neg_pooled, neg_text_ids = pipe.encode_prompt(
            prompt=negative_prompt, prompt_2=negative_prompt_2,
            prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=negative_pooled_prompt_embeds, **encode)
    latents = latents.to(embeds.dtype)
    image_ids = pipe._prepare_latent_image_ids(latents.shape[0], lh // 2, lw // 2, device,
                                               embeds.dtype)
    guidance = None
    if transformer.config.guidance_embeds:  # guidance-distilled (FLUX.1-dev)
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
        guidance = guidance.expand(latents.shape[0])

    def velocity(x, timestep, embeds, pooled, ids, context):
        with transformer.cache_context(context):
            return transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=ids, img_ids=image_ids, joint_attention_kwargs={},
                               return_dict=False)[0]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        v = velocity(x, timestep, embeds, pooled, text_ids, "cond")
        if true_cfg:
            neg = velocity(x, timestep, neg_embeds, neg_pooled, neg_text_ids, "uncond")
            v = neg + true_cfg_scale * (v - neg)
        return v

    return model, latents


def _flux_steps(pipe, latents, num_inference_steps, *, sigmas=None):
    """As FluxPipeline: sigmas linspace(1, 1/N, N) unless given, mu from the packed sequence
    length (passed even to a static config, whose scheduler ignores it)."""
    cfg = pipe.scheduler.config
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if cfg.get("use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                         cfg.get("max_shift", 1.15))
    steps = {"num_inference_steps": num_inference_steps} if sigmas is None else {"sigmas": sigmas}
    return {**steps, "mu": mu}


class _Family(NamedTuple):
    pipeline: str                      # diffusers pipeline class (its subclasses included)
    conditioning: Callable             # see above
    scheduler: type = BELMScheduler    # the BELM scheduler that samples (and regenerates) its grid
    inverse_scheduler: type = BELMInverseScheduler
    steps: Callable = _steps           # (pipe, latents, N, **kw) -> set_timesteps arguments
    image_latents: Callable = _vae_latents


_FAMILIES = (
    _Family("StableDiffusionPipeline", _stable_diffusion),
    _Family("StableDiffusionXLPipeline", _stable_diffusion_xl),
    _Family("StableDiffusion3Pipeline", _stable_diffusion_3, FlowMatchBELMScheduler,
            FlowMatchBELMInverseScheduler, _stable_diffusion_3_steps),
    _Family("FluxPipeline", _flux, FlowMatchBELMScheduler, FlowMatchBELMInverseScheduler,
            _flux_steps, _flux_image_latents),
)
#: The diffusers pipeline classes :func:`invert` supports (their subclasses too), by name.
SUPPORTED_PIPELINES = tuple(family.pipeline for family in _FAMILIES)


def _family(pipe) -> _Family:
    import diffusers

    for family in _FAMILIES:
        if isinstance(pipe, getattr(diffusers, family.pipeline)):
            return family
    names = ", ".join(SUPPORTED_PIPELINES)
    raise TypeError(
        f"invert() does not support {type(pipe).__name__}; it supports {names} (and their "
        "subclasses). A pipeline with the same components can be rebuilt as a supported one, "
        "e.g. StableDiffusionPipeline(**pipe.components)")


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


def _keywords(fn: Callable) -> set[str]:
    """The keyword-only arguments of a family function: the pipeline's own argument names."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@torch.no_grad()
def image_latents(pipe, image, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean latents of ``image`` that :func:`invert` inverts (and the pipeline's decoding
    turns back into the image): ``pipe.image_processor`` then the VAE encoder's posterior mean
    (a draw with ``generator``), shifted and scaled as the pipeline's VAE config says; packed for
    Flux (the image resized to ``height`` x ``width``, by default the pipeline's size)."""
    return _family(pipe).image_latents(pipe, image, height, width, generator)


# --------------------------------------------------------------------------------------------


@torch.no_grad()
def invert(pipe, image=None, latents: torch.Tensor | None = None, prompt=None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt=None,
           negative_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int = 50,
           guidance_scale: float | None = None, generator: torch.Generator | None = None,
           height: int | None = None, width: int | None = None, backend: str | None = None,
           state_dtype: str | None = "float64", progress: bool = True,
           **pipeline_kwargs) -> LatentPair:
    """Invert an image (or its clean latents) exactly with O-BELM through ``pipe``'s model.

    ``pipe`` is a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (or a subclass). ``image`` goes through
    ``pipe.image_processor`` and the VAE encoder (posterior mean, or a draw with ``generator``);
    or pass clean ``latents`` (for Flux packed, as the pipeline's ``latents`` argument and its
    ``output_type="latent"`` have them). The conditioning is built as the pipeline's ``__call__``
    builds it from the same arguments: ``prompt`` / ``prompt_embeds``, ``negative_prompt`` /
    ``negative_prompt_embeds``, ``guidance_scale`` (default: the pipeline's own default; for Flux
    the distilled guidance), and ``pipeline_kwargs`` among the pipeline's own arguments:

    * SDXL: ``prompt_2``, ``negative_prompt_2``, ``pooled_prompt_embeds``,
      ``negative_pooled_prompt_embeds``, ``original_size``, ``crops_coords_top_left``,
      ``target_size`` and their ``negative_`` variants; ``height`` / ``width`` size the image and
      default the size conditioning as in the pipeline (to the UNet's sample size);
    * SD3: ``prompt_2``, ``prompt_3``, their ``negative_`` variants, the pooled embeddings,
      ``clip_skip``, ``max_sequence_length``, and the scheduler's ``sigmas`` and ``mu``;
    * Flux: ``prompt_2``, ``negative_prompt_2``, the pooled embeddings, ``true_cfg_scale``,
      ``max_sequence_length`` and ``sigmas``; ``height`` / ``width`` (default: the pipeline's)
      set the image size, the latent image ids and mu: pass the same ones to the pipeline.

    Classifier-free guidance is applied as the pipeline's loop does (no guidance rescale).
    Several latents per prompt are regenerated with ``num_images_per_prompt``.

    The grid is the one ``pipe.scheduler.config`` gives for ``num_inference_steps`` (and the
    sigmas and mu the pipeline passes to its scheduler); ``backend`` defaults to that config's.
    ``state_dtype`` is the dtype the inversion keeps its two states in (float64 by default; None:
    the latents' dtype): the pair carries them (``pair.state``) and a BELM scheduler armed with
    the pair continues in that dtype, so that the regeneration evaluates the model on the very
    inputs the inversion saw and gives the latents back to the last bit. N model calls (2N rows
    of the denoiser with guidance).

    Returns the :class:`LatentPair` ``(x_T, x_T2)`` in the model's dtype; regenerate with
    ``pipe.scheduler.set_latent_pair(pair)`` (a ``BELMScheduler``, or a ``FlowMatchBELMScheduler``
    for SD3 and Flux) and ``pipe(prompt, latents=pair.x_T2, num_inference_steps=...,
    guidance_scale=..., ...)``.
    """
    family = _family(pipe)
    if (image is None) == (latents is None):
        raise ValueError("invert needs exactly one of image or latents")
    conditioning, steps = _keywords(family.conditioning), _keywords(family.steps)
    allowed = conditioning | steps
    unknown = sorted(set(pipeline_kwargs) - allowed)
    if unknown:
        raise TypeError(f"invert() got arguments that {family.pipeline} does not take: {unknown} "
                        f"(it takes {sorted(allowed)})")
    if guidance_scale is None:
        guidance_scale = _call_default(pipe, "guidance_scale")
    device = pipe._execution_device
    if image is not None:
        latents = image_latents(pipe, image, height, width, generator)
    check_float_tensor(latents, "latents")
    batch = _prompt_batch(prompt, prompt_embeds)
    if latents.shape[0] % batch:
        raise ValueError(f"the latents' batch {latents.shape[0]} is not a multiple of the prompt "
                         f"batch {batch}")
    model, latents = family.conditioning(
        pipe, latents.to(device), latents.shape[0] // batch, guidance_scale, height, width,
        prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
        negative_prompt_embeds=negative_prompt_embeds,
        **{k: v for k, v in pipeline_kwargs.items() if k in conditioning})
    options = {"state_dtype": state_dtype} | ({} if backend is None else {"backend": backend})
    inverse = family.inverse_scheduler.from_config(pipe.scheduler.config, **options)
    inverse.set_timesteps(device=device, **family.steps(
        pipe, latents, num_inference_steps,
        **{k: v for k, v in pipeline_kwargs.items() if k in steps}))
    for t in tqdm(inverse.timesteps, disable=not progress, desc="O-BELM inversion", unit="step"):
        latents = inverse.step(model(latents, t), t, latents, return_dict=False)[0]
    return inverse.latent_pair
