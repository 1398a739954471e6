"""The model call of a pipeline's denoising loop as a function ``model(x, t)``, for code that
needs the model outside the pipeline's (no-grad) loop: reversible gradients, custom samplers.

:func:`~belm_kernels.diffusers.invert` does not use these (it runs the pipeline's own loop); the
tests check that inverting with them gives the very pair ``invert`` gives, bit for bit. Each
builder takes the pipeline, the clean latents (on the device), the number of latents per prompt,
the guidance scale, the height/width, and the pipeline's own prompt arguments (its keyword names
and defaults), and returns the model function and the latents in the model's dtype:

* ``StableDiffusionPipeline`` (SD 1.x / 2.x): ``encode_prompt``, CFG;
* ``StableDiffusionXLPipeline``: both text encoders, the pooled text embedding and the size
  conditioning (``added_cond_kwargs``), CFG with the negative conditioning the pipeline builds;
* ``StableDiffusion3Pipeline``: the three text encoders, the pooled projections, CFG;
* ``FluxPipeline``: packed latents with the latent image ids and text ids, distilled guidance,
  true CFG (``true_cfg_scale`` with a negative prompt).

:func:`model_call` picks the builder for a pipeline and fills in the pipeline's defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

__all__ = ["MODEL_CALLS", "builder", "model_call", "prompt_batch"]


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


def _flux_latent_size(pipe, height, width) -> tuple[int, int, int, int]:
    """(height, width) in pixels, defaulted as FluxPipeline does, and the unpacked latents'
    (height, width) as its prepare_latents computes them (even, for the 2x2 packing)."""
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    step = pipe.vae_scale_factor * 2
    return height, width, 2 * (int(height) // step), 2 * (int(width) // step)


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



#: pipeline class name -> its model-call builder (subclasses are found by model_call)
MODEL_CALLS = {"StableDiffusionPipeline": _stable_diffusion,
               "StableDiffusionXLPipeline": _stable_diffusion_xl,
               "StableDiffusion3Pipeline": _stable_diffusion_3,
               "FluxPipeline": _flux}


def builder(pipe) -> Callable:
    """The model-call builder of ``pipe``'s class (``MODEL_CALLS``, subclasses included); its
    keyword-only arguments are the pipeline arguments it takes."""
    import diffusers

    for name, fn in MODEL_CALLS.items():
        if isinstance(pipe, getattr(diffusers, name)):
            return fn
    raise TypeError(f"the model call of {type(pipe).__name__} is not built here; supported: "
                    f"{', '.join(MODEL_CALLS)} (and their subclasses)")


def prompt_batch(prompt, prompt_embeds) -> int:
    """The number of prompts: 1 for a string, the length of a list, else prompt_embeds' rows."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    if prompt_embeds is None:
        raise ValueError("the model call needs prompt or prompt_embeds")
    return prompt_embeds.shape[0]


def model_call(pipe, latents: torch.Tensor, guidance_scale: float | None = None,
               height: int | None = None, width: int | None = None, **call
               ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(model, latents)``: the guided model output at ``(x, t)`` as ``pipe``'s loop computes it
    from the pipeline arguments ``call`` (``prompt``, ``prompt_embeds``, ...; ``guidance_scale``
    defaults to the pipeline's), and ``latents`` on the pipeline's device in the model's dtype.
    Supported: the pipelines of ``MODEL_CALLS`` and their subclasses."""
    build = builder(pipe)
    if guidance_scale is None:
        guidance_scale = inspect.signature(type(pipe).__call__).parameters[
            "guidance_scale"].default
    batch = prompt_batch(call.get("prompt"), call.get("prompt_embeds"))
    return build(pipe, latents.to(pipe._execution_device), latents.shape[0] // batch,
                 guidance_scale, height, width, **call)
