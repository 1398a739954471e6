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

__all__ = ["QWEN_TEXT_WIDTH", "SD3_VERSIONS", "tiny_chroma_pipeline", "tiny_cogvideox_pipeline",
           "tiny_flux_kontext_pipeline", "tiny_flux_pipeline", "tiny_hunyuan_video_pipeline",
           "tiny_ltx_pipeline", "tiny_qwen_image_edit_pipeline", "tiny_qwen_image_pipeline",
           "tiny_stable_diffusion_3_pipeline", "tiny_stable_diffusion_pipeline",
           "tiny_stable_diffusion_xl_pipeline", "tiny_wan_i2v_pipeline", "tiny_wan_pipeline"]

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


#: SD3Transformer2DModel options of the SD3 versions: 3.5 normalises queries and keys (RMS);
#: 3.5 Medium (MMDiT-X) adds self-attention to the image stream of its first blocks
SD3_VERSIONS = {"3": {}, "3.5-large": dict(qk_norm="rms_norm"),
                "3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0,))}


def tiny_stable_diffusion_3_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 8,
                                     version: str = "3", dtype: torch.dtype = torch.float32,
                                     device="cpu"):
    """A ``StableDiffusion3Pipeline`` of tiny random components.

    As SD3: an MMDiT ``SD3Transformer2DModel`` (patch size 2, one joint block), two CLIP text
    encoders with projections (their pooled outputs, concatenated, are the 64-wide pooled
    projection; their hidden states, concatenated, are zero-padded to the T5 width) and a T5
    encoder (width 64, the joint attention width), a 2x VAE with a ``shift_factor``. Latents are
    (B, 4, sample_size, sample_size), images ``2 * sample_size`` pixels square (the pipeline's
    default size). ``version`` "3.5-large" or "3.5-medium" configures the transformer as those
    (``SD3_VERSIONS``). The default scheduler is the ``FlowMatchEulerDiscreteScheduler`` SD3 and
    SD3.5 ship (``shift=3.0``).
    """
    if version not in SD3_VERSIONS:
        raise ValueError(f"version must be one of {tuple(SD3_VERSIONS)}, got {version!r}")
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
            pos_embed_max_size=sample_size, **SD3_VERSIONS[version])
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


def tiny_flux_kontext_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 8,
                               dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``FluxKontextPipeline`` of the tiny Flux components (see :func:`tiny_flux_pipeline`,
    distilled guidance). The conditioning image is encoded by the same VAE and its packed latents
    join the sequence; call it with ``_auto_resize=False`` (Kontext's preferred resolutions are
    about a megapixel) so that the conditioning image keeps its size."""
    from diffusers import FluxKontextPipeline

    flux = tiny_flux_pipeline(seed, scheduler=scheduler, sample_size=sample_size)
    pipe = FluxKontextPipeline(**flux.components)
    pipe.default_sample_size = sample_size
    return _finish(pipe, dtype, device)


def tiny_chroma_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 8,
                         dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``ChromaPipeline`` of tiny random components.

    As Chroma: a ``ChromaTransformer2DModel`` (one double and one single block, its timestep and
    guidance approximator instead of Flux's pooled text) on packed latents (16 channels), a T5
    encoder (the only text encoder), real classifier-free guidance with a negative prompt, a 2x
    VAE with a ``shift_factor``. Images are ``2 * sample_size`` pixels square, the pipeline's
    default size here. The default scheduler is the ``FlowMatchEulerDiscreteScheduler`` Chroma
    ships (dynamic shifting, as Flux).
    """
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_T5_WIDTH,
            axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32, approximator_layers=1,
            approximator_num_channels=16)
        torch.manual_seed(seed + 1)
        vae = _vae(sample_size, shift_factor=0.1)
        torch.manual_seed(seed + 2)
        text_encoder = _t5_encoder(t5_tokenizer)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                          tokenizer=t5_tokenizer, transformer=transformer)
    pipe.default_sample_size = sample_size
    return _finish(pipe, dtype, device)


# --------------------------------------------------------------------------------------------
# Qwen-Image: an MMDiT on packed latents of a 3-D (Wan-style) VAE. Its text encoder is a
# Qwen2.5-VL model; the tiny pipelines have none (text_encoder, tokenizer and processor None):
# pass ``prompt_embeds`` and ``prompt_embeds_mask`` (width ``QWEN_TEXT_WIDTH``).

QWEN_TEXT_WIDTH = 32


def _qwen_image_components(seed: int, scheduler):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    z_dim = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=QWEN_TEXT_WIDTH,
            guidance_embeds=False, axes_dims_rope=(8, 4, 4))
        torch.manual_seed(seed + 1)
        # four spatial halvings (16x): Qwen-Image-Edit encodes its conditioning image at about a
        # megapixel whatever its size, which stays cheap this way
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, False, True, True],
            latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 0.9])
    if scheduler is None:  # as Qwen-Image ships it
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                tokenizer=None)


def tiny_qwen_image_pipeline(seed: int = 0, *, scheduler=None, dtype: torch.dtype = torch.float32,
                             device="cpu"):
    """A ``QwenImagePipeline`` of tiny random components, without a text encoder (pass
    ``prompt_embeds`` / ``prompt_embeds_mask`` of width ``QWEN_TEXT_WIDTH``, and the negative
    ones for its true classifier-free guidance).

    A ``QwenImageTransformer2DModel`` (one block, patch size 2) and an ``AutoencoderKLQwenImage``
    with 16x spatial compression, its ``latents_mean`` / ``latents_std`` normalisation; images
    of 32k pixels square (pass ``height`` and ``width``: the pipeline's default is 1024 px).
    The default scheduler is Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting,
    ``shift_terminal=0.02``).
    """
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**_qwen_image_components(seed, scheduler))
    return _finish(pipe, dtype, device)


def tiny_qwen_image_edit_pipeline(seed: int = 0, *, scheduler=None,
                                  dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``QwenImageEditPipeline`` of the tiny Qwen-Image components (see
    :func:`tiny_qwen_image_pipeline`; no text encoder, no processor). The conditioning ``image``
    (a PIL image) is resized to about a megapixel and encoded by the VAE, its packed latents join
    the sequence."""
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline(processor=None, **_qwen_image_components(seed, scheduler))
    return _finish(pipe, dtype, device)


# --------------------------------------------------------------------------------------------
# Video (Wan 2.1 / 2.2, HunyuanVideo, LTX-Video, CogVideoX): 3-D transformers and VAEs with 4x
# (LTX: 8x) temporal compression. Videos have 4k + 1 (LTX: 8k + 1) frames.


def _umt5_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_kv=16, d_ff=37, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))


def _wan_transformer(in_channels: int, **extra):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=in_channels, out_channels=16, text_dim=_T5_WIDTH, freq_dim=32, ffn_dim=32,
        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        **extra)


def _wan_vae():
    from diffusers import AutoencoderKLWan

    # 8x spatial and 4x temporal compression, as Wan 2.1; z_dim 16
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.05 * (k - 8) for k in range(16)],
                            latents_std=[1.0 + 0.05 * k for k in range(16)])


def _wan_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift)


def tiny_wan_pipeline(seed: int = 0, *, version: str = "2.1", scheduler=None,
                      dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``WanPipeline`` (text to video) of tiny random components.

    As Wan: a ``WanTransformer3DModel`` (one block, patch (1, 2, 2)), a UMT5 text encoder with the
    character-level T5 tokenizer, an ``AutoencoderKLWan`` (8x spatial, 4x temporal compression,
    ``latents_mean`` / ``latents_std``); videos of 4k + 1 frames, 16k pixels square (pass
    ``height``, ``width`` and ``num_frames``: the pipeline's defaults are 480x832, 81 frames).
    ``version="2.2"`` adds the low-noise ``transformer_2`` and ``boundary_ratio=0.875``, as Wan
    2.2 A14B switches between its two experts. The default scheduler is the
    ``UniPCMultistepScheduler`` Wan ships (``use_flow_sigmas``, ``flow_shift=3.0``).
    """
    from diffusers import WanPipeline

    if version not in ("2.1", "2.2"):
        raise ValueError(f"version must be '2.1' or '2.2', got {version!r}")
    tokenizer = _t5_tokenizer()
    extra = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _wan_transformer(16)
        torch.manual_seed(seed + 1)
        vae = _wan_vae()
        torch.manual_seed(seed + 2)
        text_encoder = _umt5_encoder(tokenizer)
        if version == "2.2":
            torch.manual_seed(seed + 3)
            extra = dict(transformer_2=_wan_transformer(16), boundary_ratio=0.875)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler or _wan_scheduler(3.0), transformer=transformer,
                       **extra)
    return _finish(pipe, dtype, device)


def tiny_wan_i2v_pipeline(seed: int = 0, *, version: str = "2.1", scheduler=None,
                          dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``WanImageToVideoPipeline`` of tiny random components (see :func:`tiny_wan_pipeline`).

    The transformer takes the noisy latents, the first-frame mask (4 channels) and the latents
    of the conditioning video (the image, then blank frames): 36 input channels. Wan 2.1 adds a
    CLIP vision encoder (a tiny ``CLIPVisionModelWithProjection`` and its image processor at 32
    pixels) whose image embedding conditions the transformer; ``version="2.2"`` has none, and two
    transformers with ``boundary_ratio=0.9``, as Wan 2.2 I2V A14B.
    """
    from diffusers import WanImageToVideoPipeline

    if version not in ("2.1", "2.2"):
        raise ValueError(f"version must be '2.1' or '2.2', got {version!r}")
    tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = _wan_vae()
        torch.manual_seed(seed + 2)
        text_encoder = _umt5_encoder(tokenizer)
        torch.manual_seed(seed)
        if version == "2.1":
            from transformers import (
                CLIPImageProcessor,
                CLIPVisionConfig,
                CLIPVisionModelWithProjection,
            )

            transformer = _wan_transformer(36, image_dim=8)
            torch.manual_seed(seed + 3)
            extra = dict(
                image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
                    hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, intermediate_size=16, patch_size=4)),
                image_processor=CLIPImageProcessor(crop_size=32, size=32))
        else:
            transformer = _wan_transformer(36)
            torch.manual_seed(seed + 3)
            extra = dict(transformer_2=_wan_transformer(36), boundary_ratio=0.9)
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   scheduler=scheduler or _wan_scheduler(5.0),
                                   transformer=transformer, **extra)
    return _finish(pipe, dtype, device)


def tiny_hunyuan_video_pipeline(seed: int = 0, *, scheduler=None,
                                dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``HunyuanVideoPipeline`` of tiny random components.

    As HunyuanVideo: a ``HunyuanVideoTransformer3DModel`` (one double, one single, one refiner
    block) with distilled guidance through its ``guidance`` input, a Llama text encoder (the
    character-level CLIP tokenizer stands in for Llama's; the pipeline's prompt template works
    with it) and a CLIP text encoder (its pooled output), an ``AutoencoderKLHunyuanVideo`` (8x
    spatial, 4x temporal, ``scaling_factor`` 0.476986). Videos of 4k + 1 frames, 8k pixels
    square. The default scheduler is HunyuanVideo's ``FlowMatchEulerDiscreteScheduler``
    (``shift=7.0``).
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = _tokenizer()
    llama_width = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
            patch_size_t=1, guidance_embeds=True, text_embed_dim=llama_width,
            pooled_projection_dim=_TEXT_WIDTH, rope_axes_dim=(2, 4, 4))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
            spatial_compression_ratio=8, temporal_compression_ratio=4,
            mid_block_add_attention=True)
        torch.manual_seed(seed + 2)
        text_encoder = LlamaModel(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=llama_width, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, max_position_embeddings=512))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModel(_text_config(tokenizer))
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer())
    return _finish(pipe, dtype, device)


def tiny_ltx_pipeline(seed: int = 0, *, scheduler=None, dtype: torch.dtype = torch.float32,
                      device="cpu"):
    """An ``LTXPipeline`` of tiny random components.

    As LTX-Video: an ``LTXVideoTransformer3DModel`` (one block) on packed latents (patch size 1: one
    token per latent voxel), a T5 encoder, an ``AutoencoderKLLTXVideo`` whose latents are
    normalised by its ``latents_mean`` / ``latents_std``. Videos of 8k + 1 frames, 8k pixels
    square (pass ``height``, ``width`` and ``num_frames``). The default scheduler is LTX-Video's
    ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting from the video's token count,
    ``shift_terminal=0.1``).
    """
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=1,
            caption_channels=_T5_WIDTH)
        torch.manual_seed(seed + 1)
        # 4x spatial and temporal compression, the decoder mirroring the encoder
        vae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8),
            spatio_temporal_scaling=(True, True, False, False),
            layers_per_block=(1, 1, 1, 1, 1), decoder_block_out_channels=(8, 8, 8),
            decoder_spatio_temporal_scaling=(False, True, True),
            decoder_layers_per_block=(1, 1, 1, 1), decoder_inject_noise=(False,) * 4,
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        torch.manual_seed(seed + 2)
        text_encoder = _t5_encoder(t5_tokenizer)
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                       tokenizer=t5_tokenizer, transformer=transformer)
    return _finish(pipe, dtype, device)


def tiny_cogvideox_pipeline(seed: int = 0, *, scheduler=None, dtype: torch.dtype = torch.float32,
                            device="cpu"):
    """A ``CogVideoXPipeline`` of tiny random components.

    As CogVideoX-2b: a ``CogVideoXTransformer3DModel`` (one block, patch size 2, 3-D sincos
    positions for 9 frames of 16x16 pixels, its default size), a T5 encoder, an
    ``AutoencoderKLCogVideoX`` (8x spatial, 4x temporal); latents are (batch, frames, channels,
    height, width). The default scheduler is CogVideoX-2b's ``CogVideoXDDIMScheduler``:
    variance preserving, ``v_prediction``, zero terminal SNR, ``snr_shift_scale=3.0``,
    "trailing" timesteps.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    t5_tokenizer = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=_T5_WIDTH, num_layers=1, sample_width=2,
            sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
            max_text_seq_length=226)  # the pipeline's max_sequence_length
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=4)
        torch.manual_seed(seed + 2)
        text_encoder = _t5_encoder(t5_tokenizer)
    if scheduler is None:
        scheduler = CogVideoXDDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
            timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
            steps_offset=0)
    pipe = CogVideoXPipeline(tokenizer=t5_tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=scheduler)
    return _finish(pipe, dtype, device)
