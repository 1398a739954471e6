"""invert -> regenerate through every supported pipeline: SD 1.x, SDXL, SD3 / SD3.5, Flux, Flux
Kontext, Chroma, Qwen-Image (and Edit), Wan 2.1 / 2.2 (text and image to video), HunyuanVideo,
LTX-Video, CogVideoX, each through its tiny random pipeline (``tiny_pipe`` in conftest.py) with
the scheduler the model ships (DDIM / Euler for SD, FlowMatchEuler, UniPC for Wan, CogVideoX's
DDIM).

Per family: the float64-state round trip (invert's default) is asserted bit for bit with N-1
model calls per guidance batch (N-2 on CogVideoX's zero-SNR grid); the float32-state figure and
the pipeline's own first-order step (Euler; DDIM for CogVideoX) inverted by hand on the same grid
through the same loop are printed. The README's table of supported pipelines is printed by

    python -m pytest tests/test_diffusers_families.py -k roundtrip -s -q
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from belm_kernels.diffusers import (
    LatentPair,
    image_latents,
    invert,
    regenerate,
    video_latents,
)
from belm_kernels.diffusers.inversion import _family
from belm_kernels.diffusers.scheduling_utils import _Step
from belm_kernels.diffusers.tiny_pipelines import QWEN_TEXT_WIDTH

STEPS = 6


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A (frames, 3, size, size) video in [0, 1]: a smooth moving pattern plus some noise."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    f = torch.arange(frames).view(-1, 1, 1, 1) / frames
    base = torch.stack([x + f[:, 0], y - f[:, 0], (x + y) / 2 + 0 * f[:, 0]], dim=1)
    base = (torch.sin(6 * base) + 1) / 2
    return (0.8 * base + 0.2 * torch.rand(base.shape, generator=gen(seed))).clamp(0, 1)


def picture(size: int, seed: int = 1) -> Image.Image:
    pixels = video(1, size, seed)[0].permute(1, 2, 0).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def qwen_prompt(seed: int, negative: bool = True) -> dict:
    """Prompt embeddings for the tiny Qwen-Image pipelines (which have no text encoder)."""
    embeds = dict(prompt_embeds=torch.randn(1, 7, QWEN_TEXT_WIDTH, generator=gen(seed)),
                  prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long))
    if negative:
        embeds.update(negative_prompt_embeds=torch.randn(1, 5, QWEN_TEXT_WIDTH,
                                                         generator=gen(seed + 1)),
                      negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long))
    return embeds


class Case(NamedTuple):
    builder: str
    options: dict
    size: int                  # pixels, square
    frames: int | None         # video frames; None: an image
    call: dict                 # the pipeline's arguments (prompts, guidance)
    guidance: str              # for the table
    condition: int | None = None  # size of the conditioning image (Kontext, Qwen edit, I2V)


TEXT = dict(prompt="a photo of a cat", max_sequence_length=32)
CASES = {
    "sd1": Case("tiny_stable_diffusion_pipeline", dict(sample_size=8), 16, None,
                dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.5),
                "CFG 7.5"),
    "sdxl": Case("tiny_stable_diffusion_xl_pipeline", dict(sample_size=8), 16, None,
                 dict(prompt="a photo of a cat", guidance_scale=5.0), "CFG 5.0"),
    "sd3": Case("tiny_stable_diffusion_3_pipeline", {}, 16, None,
                dict(TEXT, negative_prompt="blurry", guidance_scale=5.0), "CFG 5.0"),
    "flux": Case("tiny_flux_pipeline", {}, 16, None, dict(TEXT, guidance_scale=3.5),
                 "distilled 3.5"),
    "sd3.5-medium": Case("tiny_stable_diffusion_3_pipeline", dict(version="3.5-medium"), 16,
                         None, dict(TEXT, negative_prompt="blurry", guidance_scale=5.0),
                         "CFG 5.0"),
    "flux-kontext": Case("tiny_flux_kontext_pipeline", {}, 16, None,
                         dict(TEXT, guidance_scale=2.5, _auto_resize=False), "distilled 2.5",
                         condition=16),
    "chroma": Case("tiny_chroma_pipeline", {}, 16, None,
                   dict(TEXT, negative_prompt="blurry", guidance_scale=4.0), "CFG 4.0"),
    "qwen-image": Case("tiny_qwen_image_pipeline", {}, 64, None,
                       dict(qwen_prompt(3), true_cfg_scale=4.0), "true CFG 4.0"),
    "qwen-image-edit": Case("tiny_qwen_image_edit_pipeline", {}, 64, None,
                            dict(qwen_prompt(5), true_cfg_scale=4.0), "true CFG 4.0",
                            condition=32),
    "wan2.1": Case("tiny_wan_pipeline", {}, 32, 9,
                   dict(TEXT, negative_prompt="blurry", guidance_scale=5.0), "CFG 5.0"),
    "wan2.2": Case("tiny_wan_pipeline", dict(version="2.2"), 32, 9,
                   dict(TEXT, negative_prompt="blurry", guidance_scale=5.0,
                        guidance_scale_2=3.0), "CFG 5.0 / 3.0, two experts"),
    "wan2.1-i2v": Case("tiny_wan_i2v_pipeline", {}, 32, 9,
                       dict(TEXT, negative_prompt="blurry", guidance_scale=5.0), "CFG 5.0",
                       condition=32),
    "wan2.2-i2v": Case("tiny_wan_i2v_pipeline", dict(version="2.2"), 32, 9,
                       dict(TEXT, negative_prompt="blurry", guidance_scale=5.0),
                       "CFG 5.0, two experts", condition=32),
    "hunyuan-video": Case("tiny_hunyuan_video_pipeline", {}, 16, 9,
                          dict(TEXT, guidance_scale=6.0), "distilled 6.0"),
    "ltx-video": Case("tiny_ltx_pipeline", {}, 32, 9,
                      dict(TEXT, negative_prompt="blurry", guidance_scale=3.0), "CFG 3.0"),
    "cogvideox": Case("tiny_cogvideox_pipeline", {}, 16, 9,
                      dict(prompt="a photo of a cat", negative_prompt="blurry",
                           guidance_scale=6.0), "CFG 6.0"),
}


def inputs(pipe, case: Case) -> tuple[dict, torch.Tensor, dict]:
    """(invert's input, its clean latents, the call arguments of invert and regenerate:
    prompts, guidance, condition_image)."""
    call = dict(case.call)
    extra = {}
    if case.condition is not None:
        extra["condition_image"] = picture(case.condition, seed=7)
    if case.frames is None:
        image = video(1, case.size, seed=2)
        source, x0 = dict(image=image), image_latents(pipe, image)
    else:
        clip = video(case.frames, case.size, seed=2)
        source, x0 = dict(video=clip), video_latents(pipe, clip)
    return source, x0, {**call, **extra}


# ------------------------------------------------------------------ first-order baselines


def hand_schedulers(family):
    """The pipeline's first-order step (Euler; DDIM for the VP family) on the family's grid,
    forward, and run backwards by hand as DDIMInverseScheduler / reversed FlowMatchEuler do:
    x_j = (x_{j+1} - d_j eps(x_{j+1}, t_j)) / r_j, the model at the less noisy state."""

    class HandInverse(family.inverse_scheduler):
        def _exposed_timesteps(self):
            return list(self._grid_ts[::-1])

        def _exposed_states(self):
            return list(range(len(self._grid_ts), -1, -1))

        def _first_step(self, k, sample):
            return self._next_step(k)

        def _next_step(self, k):
            return _Step(False, "first_inverse", len(self._grid_ts) - 1 - k)

    class HandForward(family.scheduler):
        def _next_step(self, k):
            return _Step(False, "first", k)

    return HandInverse, HandForward


@contextlib.contextmanager
def scheduler_of(pipe, scheduler):
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = own


def latents_out(output):
    return output[0]


def hand_round_trip(pipe, x0, call, sizes, n):
    inverse_cls, forward_cls = hand_schedulers(_family(pipe))
    common = dict(num_inference_steps=n, output_type="latent", return_dict=False, **sizes, **call)
    with scheduler_of(pipe, inverse_cls.from_config(pipe.scheduler.config)):
        x_T = latents_out(pipe(latents=x0, **common))
    with scheduler_of(pipe, forward_cls.from_config(pipe.scheduler.config)):
        return latents_out(pipe(latents=x_T, **common))


# ------------------------------------------------------------------ the round trips


class Calls:
    """Counts the calls of a pipeline's denoiser(s) (both Wan 2.2 experts)."""

    def __init__(self, pipe):
        self.pipe, self.count, self.seen = pipe, 0, []

    def __enter__(self):
        self.hooks = []
        for name in ("unet", "transformer", "transformer_2"):
            model = getattr(self.pipe, name, None)
            if model is not None:
                self.hooks.append(model.register_forward_hook(
                    lambda m, args, kwargs, out, name=name: self.record(name, kwargs),
                    with_kwargs=True))
        return self

    def record(self, name, kwargs):
        self.count += 1
        t = kwargs.get("timestep")
        self.seen.append((name, None if t is None else float(t.reshape(-1)[0])))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


ROWS = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ROWS:
        print("\n\n| pipeline | latents | scheduler it ships -> BELM | steps | guidance | "
              "BELM (invert's float64 states) | BELM, float32 states | first-order step "
              "inverted by hand |\n|---|---|---|---|---|---|---|---|")
        for row in ROWS:
            print("| " + " | ".join(row) + " |")


# Qwen-Image-Edit resizes its conditioning image to about a megapixel, which its VAE encodes in
# every call (seconds each here): deselect with -m "not slow"
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name == "qwen-image-edit" else name for name in CASES])
def test_roundtrip_exact(tiny_pipe, name):
    case = CASES[name]
    pipe = tiny_pipe(case.builder, **case.options)
    family = _family(pipe)
    source, x0, call = inputs(pipe, case)
    n = STEPS

    with Calls(pipe) as inverting:
        pair = invert(pipe, **source, num_inference_steps=n, progress=False, **call)
    assert isinstance(pair, LatentPair) and pair.pipeline == type(pipe).__name__
    assert pair.x_T.shape == x0.shape and pair.state[0].dtype == torch.float64
    # the grid the bulk jobs compute beforehand (the family's set_timesteps arguments) is the
    # one the pipeline's own call set
    expected = family.scheduler.from_config(pipe.scheduler.config)
    expected.set_timesteps(**family.steps(pipe, x0, n))
    assert pair.grid == expected._grid_record

    # the regeneration skips the first step, and the zero-SNR state's on CogVideoX's grid;
    # the inversion stops before that one
    skipped = 1 + expected._pair_start
    assert skipped == (2 if name == "cogvideox" else 1)
    per_step, rest = divmod(inverting.count, n - skipped + 1)
    assert per_step >= 1 and rest == 0
    with Calls(pipe) as calls:
        out = latents_out(regenerate(pipe, pair, output_type="latent", return_dict=False,
                                     **call))
    assert calls.count == (n - skipped) * per_step
    # The regeneration feeds the model the same float32 roundings of (within ~1e-14) the same
    # float64 states as the inversion, and ends within ~1e-14 of x0: bit for bit.
    assert torch.equal(out, x0)

    pair32 = invert(pipe, **source, num_inference_steps=n, state_dtype=None, progress=False,
                    **call)
    assert pair32.state is None
    err32 = rel(latents_out(regenerate(pipe, pair32, output_type="latent", return_dict=False,
                                       **call)), x0)
    pipe_call = {k: v for k, v in call.items() if k != "condition_image"}
    if "condition_image" in call:
        pipe_call["image"] = call["condition_image"]
    err_hand = rel(hand_round_trip(pipe, x0, pipe_call, pair.sizes, n), x0)
    own = type(pipe.scheduler).__name__
    step = "Euler" if family.flow else "DDIM"
    print(f"\n{type(pipe).__name__} ({name}): BELM 0 (float64 states)  BELM {err32:.2e} "
          f"(float32 states)  {step} inverted by hand {err_hand:.2e}")
    shape = "x".join(str(d) for d in x0.shape[1:])
    ROWS.append([f"{type(pipe).__name__} ({name})", shape,
                 f"{own} -> {family.scheduler.__name__}", str(n), case.guidance, "0",
                 f"{err32:.1e}", f"{err_hand:.1e} ({step})"])
    # the hand inversion's error is truncation (first order, the model at the wrong state)
    assert err_hand > 10 * err32


# ------------------------------------------------------------------ what differs per family


def test_wan22_switches_experts_at_the_same_timesteps(tiny_pipe):
    """Wan 2.2: transformer above boundary_ratio * 1000, transformer_2 below, decided by the
    timestep of each model call: the inversion evaluates each grid state's timestep with the
    expert the regeneration (and plain sampling) uses there, and both experts take part."""
    case = CASES["wan2.2"]
    pipe = tiny_pipe(case.builder, **case.options)
    source, x0, call = inputs(pipe, case)
    n = 8
    with Calls(pipe) as inverting:
        pair = invert(pipe, **source, num_inference_steps=n, progress=False, **call)
    with Calls(pipe) as regenerating:
        out = latents_out(regenerate(pipe, pair, output_type="latent", return_dict=False,
                                     **call))
    assert torch.equal(out, x0)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    for calls in (inverting, regenerating):
        for expert, t in calls.seen:
            assert expert == ("transformer" if t >= boundary else "transformer_2"), (expert, t)
    used = {expert for expert, _ in inverting.seen}
    assert used == {"transformer", "transformer_2"}
    expert_at = dict((t, e) for e, t in inverting.seen)
    assert all(expert_at[t] == e for e, t in regenerating.seen)


def test_wan22_without_its_second_transformer_is_refused(tiny_pipe):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    for key, cls in (("wan2.2", WanPipeline), ("wan2.2-i2v", WanImageToVideoPipeline)):
        case = CASES[key]
        full = tiny_pipe(case.builder, **case.options)
        source, _, call = inputs(full, case)
        pair = invert(full, **source, num_inference_steps=4, progress=False, **call)
        halved = cls(**{**full.components, "transformer_2": None},
                     boundary_ratio=full.config.boundary_ratio)
        message = (rf"{cls.__name__} has boundary_ratio={full.config.boundary_ratio} .* but "
                   "no transformer_2")
        with pytest.raises(ValueError, match=message):
            invert(halved, **source, **call)
        with pytest.raises(ValueError, match=message):
            regenerate(halved, pair, **call)


def test_an_image_for_a_video_pipeline_and_the_reverse(tiny_pipe):
    wan = tiny_pipe("tiny_wan_pipeline")
    chroma = tiny_pipe("tiny_chroma_pipeline")
    with pytest.raises(ValueError, match=r"WanPipeline makes videos: pass video=, not image= "
                                         r"\(a list of frames"):
        invert(wan, image=picture(32), prompt="a cat")
    with pytest.raises(ValueError, match="ChromaPipeline makes images: pass image=, not video="):
        invert(chroma, video=video(9, 16), prompt="a cat")
    with pytest.raises(ValueError, match=r"WanPipeline takes latents of shape \(batch, "
                                         r"channels=16, frames, height, width\), got shape "
                                         r"\(1, 16, 4, 4\)"):
        invert(wan, latents=torch.randn(1, 16, 4, 4), prompt="a cat")
    with pytest.raises(ValueError, match=r"ChromaPipeline takes packed latents of shape "
                                         r"\(batch, tokens=16, channels=16\)"):
        invert(chroma, latents=torch.randn(1, 16, 3, 4, 4), prompt="a cat")
    with pytest.raises(ValueError, match="exactly one of image, video or latents, got "
                                         r"\['video', 'latents'\]"):
        invert(wan, video=video(9, 32), latents=torch.randn(1, 16, 3, 4, 4), prompt="a cat")


def test_a_pair_made_by_another_family_is_refused(tiny_pipe):
    """Chroma's and Flux Kontext's latents have the same shape and grid; Wan's and
    HunyuanVideo's are videos: regenerate refuses a pair of another pipeline class, and the
    scheduler refuses one made on another grid."""
    chroma, kontext = tiny_pipe("tiny_chroma_pipeline"), tiny_pipe("tiny_flux_kontext_pipeline")
    source, _, call = inputs(chroma, CASES["chroma"])
    pair = invert(chroma, **source, num_inference_steps=4, progress=False, **call)
    _, _, kontext_call = inputs(kontext, CASES["flux-kontext"])
    with pytest.raises(ValueError, match="the pair was made by ChromaPipeline, not "
                                         "FluxKontextPipeline"):
        regenerate(kontext, pair, **kontext_call)
    wan, hunyuan = tiny_pipe("tiny_wan_pipeline"), tiny_pipe("tiny_hunyuan_video_pipeline")
    source, _, call = inputs(wan, CASES["wan2.1"])
    pair = invert(wan, **source, num_inference_steps=4, progress=False, **call)
    with pytest.raises(ValueError, match="the pair was made by WanPipeline, not "
                                         "HunyuanVideoPipeline"):
        regenerate(hunyuan, pair, prompt="a cat")
    # by hand, the scheduler's grid record refuses it: UniPC's sigmas are not Hunyuan's
    from belm_kernels.diffusers import FlowMatchBELMScheduler

    scheduler = FlowMatchBELMScheduler.from_config(hunyuan.scheduler.config)
    scheduler.set_latent_pair(pair)
    with pytest.raises(ValueError, match="made on the sigmas"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 5)[:-1])


def test_videos_of_another_frame_count_or_size(tiny_pipe):
    wan = tiny_pipe("tiny_wan_pipeline")
    with pytest.raises(ValueError, match=r"video has 8 frames, but WanPipeline's VAE compresses "
                                         r"4 frames into one .* 4k \+ 1 frames \(1, 5, 9, 13"):
        invert(wan, video=video(8, 32), prompt="a cat")
    with pytest.raises(ValueError, match="num_frames=13 but the video has 9 frames"):
        invert(wan, video=video(9, 32), num_frames=13, prompt="a cat")
    with pytest.raises(ValueError, match="height=24 is not a multiple of 16 pixels"):
        video_latents(wan, video(9, 32), height=24, width=32)
    with pytest.raises(ValueError, match="video must be a list of frames"):
        invert(wan, video="clip.mp4", prompt="a cat")
    # a 40x40 video is inverted at 32x32 (the multiple of the VAE and the patches below it)
    latents = video_latents(wan, video(9, 40))
    assert latents.shape == (1, 16, 3, 4, 4)
    ltx = tiny_pipe("tiny_ltx_pipeline")
    packed = video_latents(ltx, video(9, 32))
    with pytest.raises(ValueError, match=r"packed latents of 32x32, 17 frames have shape "
                                         r"\(batch, tokens=320, channels=8\), got \(1, 192, 8\)"):
        invert(ltx, latents=packed, height=32, width=32, num_frames=17, prompt="a cat")
    with pytest.raises(ValueError, match=r"the latents are those of a video of .*'num_frames': "
                                         r"9.*not \{'num_frames': \(17, 9\)\}"):
        invert(wan, latents=latents, num_frames=17, prompt="a cat")


def test_video_as_frames_tensor_or_batch(tiny_pipe):
    """A list of PIL frames and the (frames, channels, height, width) tensor of their pixels
    give the same latents; a batch of two videos inverts and regenerates with two prompts."""
    wan = tiny_pipe("tiny_wan_pipeline")
    clip = (video(9, 32) * 255).round() / 255  # uint8-exact, as PIL frames hold it
    frames = [Image.fromarray((f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
              for f in clip]
    assert torch.equal(video_latents(wan, frames), video_latents(wan, clip))
    both = torch.stack([clip, video(9, 32, seed=5)])
    x0 = video_latents(wan, both)
    call = dict(prompt=["a cat", "a dog"], negative_prompt=["blurry"] * 2, guidance_scale=4.0,
                max_sequence_length=32)
    pair = invert(wan, video=both, num_inference_steps=4, progress=False, **call)
    assert pair.x_T.shape == (2, 16, 3, 4, 4)
    assert torch.equal(latents_out(regenerate(wan, pair, output_type="latent",
                                              return_dict=False, **call)), x0)


def test_conditioning_image_and_refused_arguments(tiny_pipe):
    kontext, wan = tiny_pipe("tiny_flux_kontext_pipeline"), tiny_pipe("tiny_wan_pipeline")
    with pytest.raises(ValueError, match=r"FluxKontextPipeline is conditioned on an image .* "
                                         r"pass it as condition_image="):
        invert(kontext, image=picture(16), prompt="a cat")
    with pytest.raises(ValueError, match="condition_image: WanPipeline takes no conditioning"):
        invert(wan, video=video(9, 32), condition_image=picture(32), prompt="a cat")
    with pytest.raises(TypeError, match=r"invert\(\) sets or cannot pass \['callback_on_step_end'"):
        invert(wan, video=video(9, 32), prompt="a cat", callback_on_step_end=print)
    with pytest.raises(TypeError, match=r"arguments that WanPipeline does not take: "
                                        r"\['true_cfg_scale'\]"):
        invert(wan, video=video(9, 32), prompt="a cat", true_cfg_scale=2.0)
    sd35 = tiny_pipe("tiny_stable_diffusion_3_pipeline", version="3.5-medium")
    with pytest.raises(ValueError, match="skip_guidance_layers: StableDiffusion3Pipeline switches "
                                         "skip-layer guidance .* by the loop's step index"):
        invert(sd35, image=picture(16), prompt="a cat", skip_guidance_layers=[0])


def test_edits_and_pickled_pairs(tiny_pipe, tmp_path):
    """Another prompt regenerates another video from the pair; a pair saved with torch.save
    keeps its grid, state, pipeline and sizes (regenerate needs them)."""
    hunyuan = tiny_pipe("tiny_hunyuan_video_pipeline")
    source, x0, call = inputs(hunyuan, CASES["hunyuan-video"])
    pair = invert(hunyuan, **source, num_inference_steps=5, progress=False, **call)
    torch.save(pair, tmp_path / "pair.pt")
    loaded = torch.load(tmp_path / "pair.pt", weights_only=False)
    assert (loaded.pipeline, loaded.sizes, loaded.grid) == (pair.pipeline, pair.sizes, pair.grid)
    assert loaded.sizes == {"height": 16, "width": 16, "num_frames": 9}
    same = latents_out(regenerate(hunyuan, loaded, output_type="latent", return_dict=False,
                                  **call))
    assert torch.equal(same, x0)
    edit = latents_out(regenerate(hunyuan, pair, output_type="latent", return_dict=False,
                                  **dict(call, prompt="a photo of a dog")))
    assert edit.shape == x0.shape and rel(edit, x0) > 1e-3


def test_model_calls_give_inverts_pair(sd_pipe, sdxl_pipe, sd3_pipe, flux_pipe):
    """The model-call builders of model_calls.py (for code outside the pipeline's loop) compute
    the loop's model output bit for bit: inverting with them gives invert's pair."""
    from belm_kernels.diffusers.model_calls import model_call

    for pipe, call in [(sd_pipe, dict(prompt="a cat", negative_prompt="blurry",
                                      guidance_scale=5.0)),
                       (sdxl_pipe, dict(prompt="a cat", guidance_scale=5.0)),
                       (sd3_pipe, dict(prompt="a cat", guidance_scale=5.0,
                                       max_sequence_length=32)),
                       (flux_pipe, dict(prompt="a cat", guidance_scale=3.5,
                                        max_sequence_length=32))]:
        image = picture(16)
        x0 = image_latents(pipe, image)
        n = 5
        pair = invert(pipe, latents=x0, num_inference_steps=n, progress=False, **call)
        family = _family(pipe)
        inverse = family.inverse_scheduler.from_config(pipe.scheduler.config,
                                                       state_dtype="float64")
        with torch.no_grad():  # as the pipeline's loop (attention may round otherwise)
            model, latents = model_call(pipe, x0, **call)
            inverse.set_timesteps(**family.steps(pipe, latents, n))
            for t in inverse.timesteps:
                latents = inverse.step(model(latents, t), t, latents).prev_sample
        mine = inverse.latent_pair
        assert torch.equal(mine.x_T, pair.x_T) and torch.equal(mine.x_T2, pair.x_T2)
        assert torch.equal(mine.state[0], pair.state[0])


@pytest.mark.parametrize("args", [["--steps", "6"], ["--tiny", "wan2.2", "--steps", "6"]])
def test_video_example_runs_as_written(args, tmp_path, monkeypatch, capsys):
    """python/video_invert_and_edit.py, offline on its tiny Wan pipelines (in this process)."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    script = "video_invert_and_edit.py"
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "python" / script),
                   run_name="__main__")
    out = capsys.readouterr().out
    assert "O-BELM 0.00e+00" in out, out  # the latents come back exactly
    assert [p.name for p in tmp_path.glob("*.png")] == ["belm_video_edit_frame0.png"], out
