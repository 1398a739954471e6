"""Tiny random pipelines, built offline in memory: for trying the package without weights, for the
examples in ``python/`` and for the tests.

The components have random weights (a few MB, no download), so images are noise-like; every call
still runs the real pipeline code, which is what checking plumbing and exactness needs. Each
builder is seeded (the global RNG is untouched) and takes the usual ``scheduler`` / ``dtype`` /
``device``; text prompts work through a character-level CLIP tokenizer built in memory
(``model_max_length`` 77).
"""

from __future__ import annotations

import string

import torch

__all__ = ["tiny_stable_diffusion_pipeline", "tiny_stable_diffusion_xl_pipeline"]

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


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    # a 2x VAE: images are 2 * sample_size pixels square; scaling_factor 4 (like SD's 0.18215)
    # gives image latents of about unit std
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=2 * sample_size, scaling_factor=4.0)


def _unet(sample_size: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, **extra)


def _finish(pipe, dtype: torch.dtype, device):
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
