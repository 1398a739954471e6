"""diffusers pipelines: invert -> regenerate through real StableDiffusion(XL)Pipeline loops.

Tiny random pipelines built offline (fixtures ``sd_pipe`` / ``sdxl_pipe`` in conftest.py), float32.
Exactness is asserted on the float64-state path that ``invert`` uses by default (the latents
come back bit for bit); the float32-state figure is printed, not asserted; diffusers' own
DDIMInverseScheduler + DDIMScheduler, run through the same pipeline loop, as the baseline. The
figures are printed by

    python -m pytest tests/test_diffusers_pipelines.py -k roundtrip -s -q
"""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from belm_kernels.diffusers import BELMScheduler, image_latents, invert

ROOT = Path(__file__).resolve().parent.parent



def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def embeds(seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g)


def vae_latents(pipe, image):
    """The image's latents, computed here independently of invert (the tiny VAEs have neither
    shift nor mean/std)."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def regenerate(pipe, pair, n, **call):
    pipe.scheduler.set_latent_pair(pair)
    return pipe(latents=pair[1], num_inference_steps=n, output_type="latent", **call).images


def ddim_round_trip(pipe, x0, n, **call):
    """diffusers' own, inexact inversion through the pipeline's loop: DDIMInverseScheduler from
    x0, then DDIMScheduler from what it gives, with the same conditioning."""
    belm = pipe.scheduler
    try:
        pipe.scheduler = DDIMInverseScheduler.from_config(belm.config)
        x_T = pipe(latents=x0, num_inference_steps=n, output_type="latent", **call).images
        pipe.scheduler = DDIMScheduler.from_config(belm.config)
        return pipe(latents=x_T, num_inference_steps=n, output_type="latent", **call).images
    finally:
        pipe.scheduler = belm


def check_round_trip(pipe, x0, n, call, label, image=None):
    """invert (float64 states, and float32 states) -> regenerate through the pipeline, and the
    DDIM baseline; prints the three relative errors. Asserts the float64-state path bit-exact
    and DDIM far off; the float32-state figure is reported, not asserted (it is float32 rounding
    amplified by the model, so it moves with the machine's arithmetic)."""
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        source = dict(image=image) if image is not None else dict(latents=x0)
        errors = {}
        for state_dtype in ("float64", None):  # invert's default, and states kept in float32
            pair = invert(pipe, **source, num_inference_steps=n, state_dtype=state_dtype,
                          progress=False, **call)
            assert (pair.state is None) == (state_dtype is None)
            calls.clear()
            out = regenerate(pipe, pair, n, **call)
            assert len(calls) == n - 1  # the pair skips the first step
            errors[state_dtype] = rel(out, x0)
            if state_dtype == "float64":
                # Exact by construction: the regeneration evaluates the model on the float32
                # roundings of the same float64 states the inversion saw, and its last state is
                # x0 up to float64 rounding (~1e-16), far inside half a float32 ulp of x0, which
                # is a float32 itself. (It could only fail if an intermediate float64 state lay
                # within ~1e-16 of a float32 rounding boundary: odds about 1e-4 per run.)
                assert torch.equal(out, x0)
    finally:
        hook.remove()
    err_ddim = rel(ddim_round_trip(pipe, x0, n, **call), x0)
    print(f"\n{label}: BELM {errors['float64']:.2e} (invert default, float64 states)  "
          f"BELM {errors[None]:.2e} (float32 states)  "
          f"DDIMInverseScheduler+DDIMScheduler {err_ddim:.2e}")
    assert err_ddim > 0.1  # DDIM inversion's truncation error: O(1), not rounding


# ------------------------------------------------------------------ Stable Diffusion


@pytest.mark.parametrize("sd_pipe", [dict(sample_size=16)], indirect=True)
@pytest.mark.parametrize("guidance_scale", [3.0, 7.5])
def test_pipeline_roundtrip_exact(sd_pipe, guidance_scale):
    """invert -> set_latent_pair -> pipe(latents=x_T2) through a StableDiffusionPipeline loop
    with classifier-free guidance, float32 latents of an image, 20 steps."""
    n = 20
    pe, ne = embeds()
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance_scale)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x0 = vae_latents(sd_pipe, image)  # about unit std, like SD latents
    label = f"SD latent round trip, float32 pipeline, {n} steps, guidance {guidance_scale}"
    check_round_trip(sd_pipe, x0, n, call, label)


def test_pipeline_generation_matches_a_manual_loop(sd_pipe):
    n, g = 12, 7.5
    pe, ne = embeds()
    out = sd_pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n,
                  guidance_scale=g, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    s = BELMScheduler.from_config(sd_pipe.scheduler.config)
    s.set_timesteps(n)
    x = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    emb = torch.cat([ne, pe])
    with torch.no_grad():
        for t in s.timesteps:
            pred = sd_pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=emb,
                                return_dict=False)[0]
            u, c = pred.chunk(2)
            x = s.step(u + g * (c - u), t, x).prev_sample
    assert torch.equal(out, x)  # the same operations in the same order


def test_invert_image_with_text_prompt_and_edit(sd_pipe):
    """Image in, tokenizer-encoded prompt, regeneration gives the image's latents back."""
    n, g = 8, 5.0
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # in [0, 1]
    call = dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=g)
    pair = invert(sd_pipe, image=image, num_inference_steps=n, progress=False, **call)
    x_T, x_T2 = pair
    assert x_T.dtype == torch.float32 and pair.state[0].dtype == torch.float64
    x0 = vae_latents(sd_pipe, image)
    assert torch.equal(image_latents(sd_pipe, image), x0)
    assert torch.equal(regenerate(sd_pipe, pair, n, **call), x0)
    # plain tensors work too, without the float64 states (float32 rounding: see above)
    out = regenerate(sd_pipe, (x_T, x_T2), n, **call)
    assert out.shape == x0.shape and bool(torch.isfinite(out).all())
    sd_pipe.scheduler.set_latent_pair(pair)
    edit = sd_pipe("a photo of a dog", negative_prompt="blurry", latents=x_T2,
                   num_inference_steps=n, guidance_scale=g, output_type="np").images
    assert edit.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(edit)).all())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_pipeline_roundtrip_other_prediction_types(sd_pipe, prediction_type):
    n = 8
    sd_pipe.scheduler = BELMScheduler.from_config(sd_pipe.scheduler.config,
                                                  prediction_type=prediction_type)
    pe, ne = embeds()
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(sd_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert torch.equal(regenerate(sd_pipe, pair, n, **call), x0)


def test_invert_batch_with_images_per_prompt(sd_pipe):
    """Two latents for one prompt: invert and regenerate with num_images_per_prompt=2."""
    n = 6
    pe, ne = embeds()
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(sd_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert torch.equal(regenerate(sd_pipe, pair, n, num_images_per_prompt=2, **call), x0)
    with pytest.raises(ValueError, match="not a multiple of the prompt batch 2"):
        invert(sd_pipe, latents=x0[:1], prompt_embeds=torch.cat([pe, pe]),
               negative_prompt_embeds=torch.cat([ne, ne]), num_inference_steps=n)


def test_invert_defaults_to_the_pipelines_guidance_scale(sd_pipe):
    n = 6
    pe, ne = embeds()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(sd_pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                  num_inference_steps=n, progress=False)
    sd_pipe.scheduler.set_latent_pair(pair)  # StableDiffusionPipeline's default: 7.5
    out = sd_pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=pair.x_T2,
                  num_inference_steps=n, output_type="latent").images
    assert torch.equal(out, x0)


def test_pipeline_pair_errors(sd_pipe):
    n = 6
    pe, ne = embeds()
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0,
                output_type="latent")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(sd_pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                  num_inference_steps=n, guidance_scale=3.0, progress=False)
    sd_pipe.scheduler.set_latent_pair(pair)
    with pytest.raises(ValueError, match="pass latents=x_T2"):
        sd_pipe(latents=pair.x_T, num_inference_steps=n, **call)
    with pytest.raises(ValueError, match="invert and regenerate with the same num_inference_steps"):
        sd_pipe(latents=pair.x_T2, num_inference_steps=n + 1, **call)
    with pytest.raises(ValueError, match="exactly one of image, video or latents, got none"):
        invert(sd_pipe, prompt_embeds=pe, num_inference_steps=n)


def test_invert_names_the_pipelines_and_arguments_it_supports(sd_pipe):
    pe, ne = embeds()
    x0 = torch.randn(1, 4, 8, 8)
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    with pytest.raises(TypeError, match=r"invert\(\) does not support "
                                        r"StableDiffusionImg2ImgPipeline; it supports "
                                        r"StableDiffusionPipeline, StableDiffusionXLPipeline"):
        invert(img2img, latents=x0, prompt_embeds=pe)
    with pytest.raises(TypeError, match=r"arguments that StableDiffusionPipeline does not take: "
                                        r"\['original_size', 'pooled_prompt_embeds'\]"):
        invert(sd_pipe, latents=x0, prompt_embeds=pe, pooled_prompt_embeds=pe[:, 0],
               original_size=(16, 16))


@pytest.mark.filterwarnings("ignore:`callback")  # the legacy callback is deprecated
def test_pipeline_callbacks(sd_pipe):
    n, g = 6, 4.0
    pe, ne = embeds()
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n, guidance_scale=g,
              output_type="latent")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = sd_pipe(**kw, generator=gen()).images

    # a callback that looks at (and keeps references to) the latents: no false alarm, same result,
    # and the kept tensors are not overwritten by later steps
    kept = []

    def keep(p, i, t, cb):
        kept.append((cb["latents"], cb["latents"].clone()))
        return cb

    out = sd_pipe(**kw, generator=gen(), callback_on_step_end=keep).images
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in kept)

    # a callback returning a value-identical copy is fine
    out = sd_pipe(**kw, generator=gen(),
                  callback_on_step_end=lambda p, i, t, cb: {"latents": cb["latents"].clone()}
                  ).images
    assert torch.equal(out, ref)

    # a callback that replaces the latents: detected at the next step
    def replace(p, i, t, cb):
        return {"latents": cb["latents"] * 1.01} if i == 2 else cb

    with pytest.raises(ValueError, match=r"not the prev_sample returned by the previous step .*"
                                         r"modified or replaced by a callback"):
        sd_pipe(**kw, generator=gen(), callback_on_step_end=replace)

    # the legacy callback editing the latents in place: detected too
    def edit(i, t, latents):
        if i == 1:
            latents.mul_(1.01)

    with pytest.raises(ValueError, match="modified in place"):
        sd_pipe(**kw, generator=gen(), callback=edit, callback_steps=1)

    # and the scheduler works again on the next run
    assert torch.equal(sd_pipe(**kw, generator=gen()).images, ref)


def test_img2img_pipeline_uses_set_begin_index(sd_pipe):
    n, strength = 10, 0.5
    img2img = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    pe, ne = embeds()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = []

    def record(p, i, t, cb):
        seen.append(int(t))
        return cb

    out = img2img(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, strength=strength,
                  num_inference_steps=n, guidance_scale=3.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=record).images
    s = img2img.scheduler
    assert s.begin_index == n - int(n * strength)
    assert seen == s.timesteps.tolist()[s.begin_index:]
    assert s.step_index == n
    assert bool(torch.isfinite(out).all())


def test_pipeline_custom_timesteps(sd_pipe):
    pe, ne = embeds()
    ts = [999, 800, 600, 400, 200, 1]
    out = sd_pipe(prompt_embeds=pe, negative_prompt_embeds=ne, timesteps=ts, guidance_scale=2.0,
                  output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert sd_pipe.scheduler.timesteps.tolist() == ts and bool(torch.isfinite(out).all())


def test_saved_pipeline_loads_with_its_belm_scheduler(sd_pipe, tmp_path):
    """save_pretrained names the scheduler's module; diffusers finds the class there, through
    belm_kernels' top-level export, and at belm_kernels.diffusers (where 0.1.0 saved it)."""
    sd_pipe.scheduler = BELMScheduler.from_config(sd_pipe.scheduler.config, state_dtype="float64")
    sd_pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    saved = index["scheduler"]
    assert saved == ["belm_kernels.diffusers.scheduling_belm", "BELMScheduler"]
    pe, ne = embeds()
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=5,
              output_type="latent")
    ref = sd_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    for library in (saved[0], "belm_kernels", "belm_kernels.diffusers"):
        index["scheduler"] = [library, "BELMScheduler"]
        index_path.write_text(json.dumps(index))
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded.scheduler) is BELMScheduler
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.scheduler.config) == public(sd_pipe.scheduler.config)
        assert loaded.scheduler.config.state_dtype == "float64"
        out = loaded(**kw, generator=torch.Generator().manual_seed(0)).images
        assert torch.equal(out, ref)


# ------------------------------------------------------------------ Stable Diffusion XL

SDXL_CALL = dict(prompt="a photo of a cat", prompt_2="an oil painting", guidance_scale=5.0,
                 original_size=(64, 48), crops_coords_top_left=(4, 0), target_size=(24, 24))


def test_sdxl_roundtrip_exact(sdxl_pipe):
    """Both text encoders, the pooled embedding and the size conditioning, the zero negative
    conditioning of force_zeros_for_empty_prompt (no negative prompt), classifier-free guidance:
    invert an image -> regenerate through StableDiffusionXLPipeline, float32, 12 steps."""
    n = 12
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    x0 = vae_latents(sdxl_pipe, image)
    assert sdxl_pipe.config.force_zeros_for_empty_prompt
    label = f"SDXL latent round trip, float32 pipeline, {n} steps, guidance 5.0"
    check_round_trip(sdxl_pipe, x0, n, SDXL_CALL, label, image=image)
    # the conditioning really reaches the UNet: another size conditioning regenerates another
    # image, and so does the pipeline's default one
    pair = invert(sdxl_pipe, image=image, num_inference_steps=n, progress=False, **SDXL_CALL)
    for change in (dict(crops_coords_top_left=(0, 0)), dict(original_size=None, target_size=None)):
        assert rel(regenerate(sdxl_pipe, pair, n, **{**SDXL_CALL, **change}), x0) > 1e-3


@pytest.mark.parametrize("sdxl_pipe", [dict(force_zeros_for_empty_prompt=False)], indirect=True)
def test_sdxl_negative_prompts_and_precomputed_embeddings(sdxl_pipe):
    """Negative prompts through both encoders (force_zeros_for_empty_prompt=False), then the
    same conditioning as precomputed embeddings, and a default negative prompt ("")."""
    n = 8
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    call = dict(SDXL_CALL, negative_prompt="blurry", negative_prompt_2="dark")
    pair = invert(sdxl_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert torch.equal(regenerate(sdxl_pipe, pair, n, **call), x0)

    pe, npe, pooled, npooled = sdxl_pipe.encode_prompt(
        prompt=call["prompt"], prompt_2=call["prompt_2"], negative_prompt=call["negative_prompt"],
        negative_prompt_2=call["negative_prompt_2"])
    embedded = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled, guidance_scale=5.0,
                    original_size=call["original_size"], target_size=call["target_size"],
                    crops_coords_top_left=call["crops_coords_top_left"])
    pair2 = invert(sdxl_pipe, latents=x0, num_inference_steps=n, progress=False, **embedded)
    assert torch.equal(pair2.x_T, pair.x_T)  # the same conditioning, however it is given
    assert torch.equal(regenerate(sdxl_pipe, pair2, n, **embedded), x0)

    no_negative = {k: v for k, v in SDXL_CALL.items()}  # the pipeline encodes "" then
    pair3 = invert(sdxl_pipe, latents=x0, num_inference_steps=n, progress=False, **no_negative)
    assert not torch.equal(pair3.x_T, pair.x_T)
    assert torch.equal(regenerate(sdxl_pipe, pair3, n, **no_negative), x0)


def test_sdxl_batch_with_negative_size_conditioning(sdxl_pipe):
    """Two latents per prompt and a negative size conditioning: the time ids are repeated per
    latent in the pipeline's own (negative, positive) row order."""
    n = 6
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    call = dict(SDXL_CALL, negative_original_size=(32, 32), negative_target_size=(16, 16),
                negative_crops_coords_top_left=(2, 2))
    pair = invert(sdxl_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert torch.equal(regenerate(sdxl_pipe, pair, n, num_images_per_prompt=2, **call), x0)


def test_sdxl_defaults_invert_and_edit(sdxl_pipe):
    """Only a prompt: invert and the pipeline default the same way (guidance 5.0, the size
    conditioning from the UNet's sample size); then an edit from the same pair."""
    n = 6
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    pair = invert(sdxl_pipe, image=image, prompt="a cat", num_inference_steps=n, progress=False)
    sdxl_pipe.scheduler.set_latent_pair(pair)
    out = sdxl_pipe("a cat", latents=pair.x_T2, num_inference_steps=n, output_type="latent").images
    assert torch.equal(out, vae_latents(sdxl_pipe, image))
    sdxl_pipe.scheduler.set_latent_pair(pair)
    edit = sdxl_pipe("a dog", latents=pair.x_T2, num_inference_steps=n, output_type="np").images
    assert edit.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(edit)).all())


@pytest.mark.parametrize("sdxl_pipe", [dict(dtype=torch.float16)], indirect=True)
@pytest.mark.filterwarnings("ignore:.*float16")  # diffusers: float16 on a CPU is unusual
def test_sdxl_float16_upcasts_its_vae_to_encode(sdxl_pipe):
    """A float16 VAE with force_upcast (SDXL's) encodes in float32, as the SDXL img2img pipeline
    does, and is float16 again afterwards; float16 latents come back exactly."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pixels = sdxl_pipe.image_processor.preprocess(image)
        expected = (sdxl_pipe.vae.float().encode(pixels).latent_dist.mean
                    * sdxl_pipe.vae.config.scaling_factor)
    sdxl_pipe.vae.half()
    x0 = image_latents(sdxl_pipe, image)
    assert sdxl_pipe.vae.dtype == torch.float16 and x0.dtype == torch.float16
    assert torch.equal(x0, expected.half())
    pair = invert(sdxl_pipe, image=image, prompt="a cat", num_inference_steps=6, progress=False)
    assert sdxl_pipe.vae.dtype == torch.float16
    sdxl_pipe.scheduler.set_latent_pair(pair)
    out = sdxl_pipe("a cat", latents=pair.x_T2, num_inference_steps=6, output_type="latent").images
    assert out.dtype == torch.float16 and torch.equal(out, x0)


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize("script,args", [
    ("generate_diffusers.py", []),
    ("generate_diffusers.py", ["--tiny", "sdxl", "--steps", "4"]),
    ("invert_and_edit.py", []),
    ("invert_and_edit.py", ["--tiny", "sdxl", "--steps", "8"]),
])
def test_examples_run_as_written(script, args, tmp_path, monkeypatch, capsys):
    """The examples, offline on their tiny pipelines (in this process: diffusers is imported)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "python" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert list(tmp_path.glob("*.png")), out
    if script == "invert_and_edit.py":
        assert "O-BELM 0.00e+00" in out, out  # the latents come back exactly
