"""Exact inversion through a diffusers pipeline: ``invert(pipe, ...)``.

:func:`invert` is one entry point for every supported pipeline family. A family (``_FAMILIES``)
knows how to turn the pipeline's own arguments into the model call its ``__call__`` makes at each
step -- text encoders, extra conditioning, classifier-free guidance -- and which inverse scheduler
walks its grid; everything else (image to latents, the loop, the pair) is shared. Supported:

* ``StableDiffusionPipeline`` (SD 1.x / 2.x): ``encode_prompt``, CFG.
* ``StableDiffusionXLPipeline``: both text encoders, the pooled text embedding and the size
  conditioning (``added_cond_kwargs``), CFG with the negative conditioning the pipeline builds
  (zeros when ``force_zeros_for_empty_prompt`` and no negative prompt).

Subclasses of these are accepted; any other pipeline gets a TypeError naming the supported ones.
Exactness needs the regeneration to evaluate the very same model: pass the same prompt arguments,
guidance scale, size arguments and ``num_inference_steps`` to :func:`invert` and to the pipeline.
:func:`image_latents` gives the clean latents of an image that :func:`invert` inverts.

A new family is a conditioning function (see ``_stable_diffusion``) and, for a pipeline with
another kind of schedule or latents, its inverse-scheduler and image-latents functions, added to
``_FAMILIES``; nothing else changes.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from .scheduling_belm_inverse import BELMInverseScheduler
from .scheduling_utils import LatentPair, check_float_tensor

__all__ = ["image_latents", "invert"]


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


def _vp_inverse_scheduler(pipe, num_inference_steps: int, device, **options):
    inverse = BELMInverseScheduler.from_config(pipe.scheduler.config, **options)
    inverse.set_timesteps(num_inference_steps, device=device)
    return inverse


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


class _Family(NamedTuple):
    pipeline: str                      # diffusers pipeline class (its subclasses included)
    conditioning: Callable             # see above
    inverse_scheduler: Callable = _vp_inverse_scheduler
    image_latents: Callable = _vae_latents


_FAMILIES = (
    _Family("StableDiffusionPipeline", _stable_diffusion),
    _Family("StableDiffusionXLPipeline", _stable_diffusion_xl),
)


def _family(pipe) -> _Family:
    import diffusers

    for family in _FAMILIES:
        if isinstance(pipe, getattr(diffusers, family.pipeline)):
            return family
    names = ", ".join(f.pipeline for f in _FAMILIES)
    raise TypeError(
        f"invert() does not support {type(pipe).__name__}; it supports {names} (and their "
        "subclasses). A pipeline with the same components can be rebuilt as a supported one, "
        "e.g. StableDiffusionPipeline(**pipe.components)")


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


@torch.no_grad()
def image_latents(pipe, image, height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean latents of ``image`` that :func:`invert` inverts (and the pipeline's decoding
    turns back into the image): ``pipe.image_processor`` then the VAE encoder's posterior mean
    (a draw with ``generator``), shifted and scaled as the pipeline's VAE config says."""
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

    ``pipe`` is a ``StableDiffusionPipeline`` or a ``StableDiffusionXLPipeline`` (or a subclass).
    ``image`` goes through ``pipe.image_processor`` and the VAE encoder (posterior mean, or a
    draw with ``generator``); or pass clean ``latents``. The conditioning is built as the
    pipeline's ``__call__`` builds it from the same arguments: ``prompt`` / ``prompt_embeds``,
    ``negative_prompt`` / ``negative_prompt_embeds``, ``guidance_scale`` (default: the
    pipeline's own default), and, for SDXL, ``pipeline_kwargs`` among ``prompt_2``,
    ``negative_prompt_2``, ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``,
    ``original_size``, ``crops_coords_top_left``, ``target_size`` and their ``negative_``
    variants; ``height`` / ``width`` size the image and, for SDXL, default the size conditioning
    as in the pipeline (to the UNet's sample size, not to the image's). Classifier-free guidance
    is applied as the pipeline's loop does (no guidance rescale). Several latents per prompt are
    regenerated with ``num_images_per_prompt``.

    The grid is the one ``pipe.scheduler.config`` gives for ``num_inference_steps``; ``backend``
    defaults to that config's. ``state_dtype`` is the dtype the inversion keeps its two states in
    (float64 by default; None: the latents' dtype): the pair carries them (``pair.state``) and a
    ``BELMScheduler`` armed with the pair continues in that dtype, so that the regeneration
    evaluates the model on the very inputs the inversion saw and gives the latents back to the
    last bit. N model calls (2N UNet rows with guidance).

    Returns the :class:`LatentPair` ``(x_T, x_T2)`` in the model's dtype; regenerate with
    ``pipe.scheduler.set_latent_pair(pair)`` (a ``BELMScheduler``) and
    ``pipe(prompt, latents=pair.x_T2, num_inference_steps=..., guidance_scale=..., ...)``.
    """
    family = _family(pipe)
    if (image is None) == (latents is None):
        raise ValueError("invert needs exactly one of image or latents")
    allowed = set(inspect.signature(family.conditioning).parameters) - {
        "pipe", "latents", "per_prompt", "guidance_scale", "height", "width"}
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
        negative_prompt_embeds=negative_prompt_embeds, **pipeline_kwargs)
    options = {"state_dtype": state_dtype} | ({} if backend is None else {"backend": backend})
    inverse = family.inverse_scheduler(pipe, num_inference_steps, device, **options)
    for t in tqdm(inverse.timesteps, disable=not progress, desc="O-BELM inversion", unit="step"):
        latents = inverse.step(model(latents, t), t, latents, return_dict=False)[0]
    return inverse.latent_pair
