"""Tiny random pipelines, built offline in memory: for trying the package without weights, for the
examples in ``python/`` and for the tests.

The components have random weights (a few MB, no download), so images are noise-like; every call
still runs the real pipeline code, which is what checking plumbing and exactness needs. Each
builder is seeded (the global RNG is untouched) and takes the usual ``scheduler`` / ``dtype`` /
``device``; text prompts work through a character-level CLIP tokenizer built in memory
(``model_max_length`` 77), and for the T5 encoders of SD3 and Flux a character-level
T5 tokenizer (a unigram vocabulary, also in memory).
"""

from __future__ import annotations

import string

import torch

__all__ = ["tiny_flux_pipeline", "tiny_stable_diffusion_3_pipeline",
           "tiny_stable_diffusion_pipeline", "tiny_stable_diffusion_xl_pipeline"]

_TEXT_WIDTH = 32  # hidden size of each tiny CLIP text encoder


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "!?.,'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, layer_norm_eps=1e-5, **extra)


def _vae(sample_size: int, **extra):
    from diffusers import AutoencoderKL

    # a 2x VAE: images are 2 * sample_size pixels square; scaling_factor 4 (like SD's 0.18215)
    # gives image latents of about unit std
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=2 * sample_size,
        **{"scaling_factor": 4.0, **extra})


def _unet(sample_size: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, **extra)


def _finish(pipe, dtype: torch.dtype, device):
    for component in pipe.components.values():  # eval mode, as from_pretrained leaves a pipeline
        if isinstance(component, torch.nn.Module):
            component.eval()
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def tiny_stable_diffusion_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 16,
                                   dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``StableDiffusionPipeline`` of tiny random components.

    UNet (block_out_channels (32, 64), cross_attention_dim 32), a 2x VAE (images are
    ``2 * sample_size`` pixels square), a 2-layer CLIP text encoder and the in-memory tokenizer.
    The default scheduler is a ``DDIMScheduler`` with SD 1.x's betas, ``steps_offset`` and
    ``set_alpha_to_one=False``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(sample_size, cross_attention_dim=_TEXT_WIDTH)
        torch.manual_seed(seed + 1)
        vae = _vae(sample_size)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe, dtype, device)


def tiny_stable_diffusion_xl_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 16,
                                      force_zeros_for_empty_prompt: bool = True,
                                      dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``StableDiffusionXLPipeline`` of tiny random components.

    As SDXL: two CLIP text encoders (the second with a projection, whose pooled output and the
    six size/crop numbers condition the UNet through ``addition_embed_type="text_time"``), their
    hidden states concatenated for cross-attention (width 64). The UNet's ``sample_size`` sets the
    pipeline's default image size (``2 * sample_size`` pixels, also the default size
    conditioning). The default scheduler is an ``EulerDiscreteScheduler`` configured as SDXL base
    ships it (SD's betas, "leading" spacing, ``steps_offset=1``).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(sample_size, cross_attention_dim=2 * _TEXT_WIDTH, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
                     # 6 size numbers (original size, crop corner, target size) + the pooled text
                     projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_WIDTH)
        torch.manual_seed(seed + 1)
        vae = _vae(sample_size)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer,
                                                                  projection_dim=_TEXT_WIDTH))
    if scheduler is None:
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1,
                                           timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    return _finish(pipe, dtype, device)


# --------------------------------------------------------------------------------------------
# Rectified flow (SD3, Flux): MMDiT transformers, CLIP and T5 text encoders.

_T5_WIDTH = 64  # d_model of the tiny T5 encoders


def _t5_tokenizer():
    """A character-level T5 (unigram) tokenizer: <pad> 0, </s> 1, <unk> 2, then "▁" and each
    character alone and after "▁" (the word-start marker)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_lowercase + string.digits + "!?.,'-":
        pieces += [(ch, -3.0), ("\u2581" + ch, -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_kv=16, d_ff=37, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))


def tiny_stable_diffusion_3_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 8,
                                     dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``StableDiffusion3Pipeline`` of tiny random components.

    As SD3: an MMDiT ``SD3Transformer2DModel`` (patch size 2, one joint block), two CLIP text
    encoders with projections (their pooled outputs, concatenated, are the 64-wide pooled
    projection; their hidden states, concatenated, are zero-padded to the T5 width) and a T5
    encoder (width 64, the joint attention width), a 2x VAE with a ``shift_factor``. Latents are
    (B, 4, sample_size, sample_size), images ``2 * sample_size`` pixels square (the pipeline's
    default size). The default scheduler is the ``FlowMatchEulerDiscreteScheduler`` SD3 ships
    (``shift=3.0``).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_T5_WIDTH,
            caption_projection_dim=32, pooled_projection_dim=2 * _TEXT_WIDTH,
            pos_embed_max_size=sample_size)
        torch.manual_seed(seed + 1)
        vae = _vae(sample_size, shift_factor=0.1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer,
                                                                projection_dim=_TEXT_WIDTH))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer,
                                                                  projection_dim=_TEXT_WIDTH))
        torch.manual_seed(seed + 4)
        text_encoder_3 = _t5_encoder(t5_tokenizer)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)
    return _finish(pipe, dtype, device)


def tiny_flux_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 8,
                       guidance_embeds: bool = True, dtype: torch.dtype = torch.float32,
                       device="cpu"):
    """A ``FluxPipeline`` of tiny random components.

    As Flux: a ``FluxTransformer2DModel`` (one double and one single block) on packed latents (2x2
    patches of 4 channels: ``in_channels=16``), with distilled guidance through its ``guidance``
    input when ``guidance_embeds`` (FLUX.1-dev; False: FLUX.1-schnell), a CLIP text encoder (its
    pooled output) and a T5 encoder (the text tokens), a 2x VAE with a ``shift_factor``. Unpacked
    latents are (B, 4, sample_size, sample_size), packed (B, sample_size**2 / 4, 16); images are
    ``2 * sample_size`` pixels square, which is also the pipeline's default size here (the
    pipeline's ``default_sample_size`` is set to ``sample_size``; a real Flux has 128). The default
    scheduler is the ``FlowMatchEulerDiscreteScheduler`` FLUX.1-dev ships (dynamic shifting).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_T5_WIDTH,
            pooled_projection_dim=_TEXT_WIDTH, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8))
        torch.manual_seed(seed + 1)
        vae = _vae(sample_size, shift_factor=0.1)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        text_encoder_2 = _t5_encoder(t5_tokenizer)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.default_sample_size = sample_size
    return _finish(pipe, dtype, device)
