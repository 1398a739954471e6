"""Gradients through a diffusers pipeline's denoising loop by exact inversion
(``belm_kernels.diffusers.sample_reversible``): the forward is the pipeline's own run, the
gradients (initial latents, prompt embeddings leaf or not, LoRA-like weights) equal full autograd's
in float64 with guidance, for SD, SDXL, SD3 and Flux; ``decode``; bad input."""

import pytest
import torch

pytest.importorskip("diffusers")

from belm_kernels.diffusers import decode, sample_reversible  # noqa: E402
from belm_kernels.diffusers.reversible import sample_autograd  # noqa: E402

F64 = dict(dtype=torch.float64)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def noise(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
                       ).to(dtype)


def latent_shape(pipe):
    return (1, 16, 16) if type(pipe).__name__ == "FluxPipeline" else (1, 4, 8, 8)


def embeddings(pipe):
    """The pipeline's own prompt embeddings (and negative ones, pooled ones) for a prompt,
    computed without gradient, as ``__call__`` keyword arguments."""
    kind = type(pipe).__name__
    with torch.no_grad():
        if kind == "StableDiffusionPipeline":
            pe, ne = pipe.encode_prompt("a red fox", "cpu", 1, True, negative_prompt="blurry")
            return dict(prompt_embeds=pe, negative_prompt_embeds=ne)
        if kind == "FluxPipeline":
            pe, pooled, _ = pipe.encode_prompt(prompt="a red fox", prompt_2=None)
            ne, npooled, _ = pipe.encode_prompt(prompt="blurry", prompt_2=None)
            return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt_embeds=ne,
                        negative_pooled_prompt_embeds=npooled)
        extra = dict(prompt_3=None) if kind == "StableDiffusion3Pipeline" else dict(device="cpu")
        pe, ne, pooled, npooled = pipe.encode_prompt(
            prompt="a red fox", prompt_2=None, negative_prompt="blurry",
            do_classifier_free_guidance=True, **extra)
        return dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled)


GUIDANCE = {"StableDiffusionPipeline": dict(guidance_scale=3.0),
            "StableDiffusionXLPipeline": dict(guidance_scale=5.0, original_size=(64, 48)),
            "StableDiffusion3Pipeline": dict(guidance_scale=5.0),
            "FluxPipeline": dict(guidance_scale=3.5, true_cfg_scale=2.0)}  # distilled + true CFG


class LoRA(torch.nn.Module):
    """base(x) + up(down(x)): a rank-2 adapter on a frozen linear layer."""

    def __init__(self, base: torch.nn.Linear, rank=2, seed=0):
        super().__init__()
        self.base = base
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.down = torch.nn.Linear(base.in_features, rank, bias=False)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        self.to(base.weight.dtype)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def add_lora(pipe) -> list[torch.nn.Parameter]:
    """Freeze the pipeline and put an adapter on the first attention query projection."""
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    name = next(n for n, m in denoiser.named_modules()
                if n.endswith("to_q") and isinstance(m, torch.nn.Linear))
    parent, _, leaf = name.rpartition(".")
    lora = LoRA(denoiser.get_submodule(name))
    setattr(denoiser.get_submodule(parent), leaf, lora)
    return [lora.down.weight, lora.up.weight]


TINY = {"sd": ("tiny_stable_diffusion_pipeline", "BELMScheduler"),
        "sdxl": ("tiny_stable_diffusion_xl_pipeline", "BELMScheduler"),
        "sd3": ("tiny_stable_diffusion_3_pipeline", "FlowMatchBELMScheduler"),
        "flux": ("tiny_flux_pipeline", "FlowMatchBELMScheduler")}


def tiny(kind, dtype=torch.float32):
    """A tiny random pipeline (latents (1, 4, 8, 8); Flux packed (1, 16, 16)) with its BELM
    scheduler, progress bars off."""
    from belm_kernels import diffusers as belm_diffusers

    builder, scheduler = TINY[kind]
    size = dict(sample_size=8) if kind in ("sd", "sdxl") else {}
    pipe = getattr(belm_diffusers, builder)(dtype=dtype, **size)
    pipe.scheduler = getattr(belm_diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", TINY)
def test_forward_is_the_pipelines_own_run_and_decode_its_image(kind):
    """With the latents' dtype as the state dtype the latents are the pipeline's own (its BELM
    scheduler, guidance), bit for bit; decode gives its output_type="pt" image."""
    pipe = tiny(kind)
    call = dict(prompt="a red fox", negative_prompt="blurry", **GUIDANCE[type(pipe).__name__])
    x_T = noise(latent_shape(pipe))
    want = pipe(latents=x_T, num_inference_steps=5, output_type="latent", **call).images
    image = pipe(latents=x_T, num_inference_steps=5, output_type="pt", **call).images
    got = sample_reversible(pipe, x_T.clone().requires_grad_(), num_inference_steps=5,
                            state_dtype=None, progress=False, **call)
    assert torch.equal(got.detach(), want)
    assert torch.equal(decode(pipe, got).detach(), image)
    # text prompts are constants: the text encoders got no graph and keep requires_grad
    assert all(p.requires_grad for name, m in pipe.components.items()
               if name.startswith("text_encoder") and m is not None for p in m.parameters())


@pytest.mark.parametrize("kind", TINY)
def test_gradients_equal_full_autograd_float64(kind):
    """float64 tiny pipeline with guidance: gradients to the initial latents, to the prompt
    embeddings (a non-leaf, and the leaf behind it), to the other conditioning tensors and to
    LoRA weights on the denoiser, through decode, equal to full autograd's to 1e-10."""
    pipe = tiny(kind, torch.float64)
    lora = add_lora(pipe)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in embeddings(pipe).items()}
    call = dict(leaves, **GUIDANCE[type(pipe).__name__], num_inference_steps=4, progress=False)
    call["prompt_embeds"] = leaves["prompt_embeds"] * 1.5   # a non-leaf
    x_T = noise(latent_shape(pipe), torch.float64).requires_grad_()
    wrt = [x_T, call["prompt_embeds"], *leaves.values(), *lora]
    grads = []
    for fn in (sample_reversible, sample_autograd):
        image = decode(pipe, fn(pipe, x_T, **call))
        grads.append(torch.autograd.grad(image.square().mean(), wrt, retain_graph=True))
    for k, (got, want) in enumerate(zip(*grads, strict=True)):
        assert rel(got, want) <= 1e-10, f"gradient {k}: {rel(got, want):.2e}"


def test_text_encoder_weights_through_embeddings_from_encode_prompt():
    """Embeddings computed by pipe.encode_prompt under autograd are a non-leaf: their graph
    carries the gradient on into the text encoder (a LoRA on its last layer norm, here)."""
    pipe = tiny("sd", torch.float64)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    weight = pipe.text_encoder.get_parameter("final_layer_norm.weight").requires_grad_()
    pe, ne = pipe.encode_prompt("a red fox", "cpu", 1, True, negative_prompt="blurry")
    assert pe.grad_fn is not None
    x_T = noise((1, 4, 8, 8), torch.float64)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0,
                num_inference_steps=4, progress=False)
    grads = [torch.autograd.grad(fn(pipe, x_T, **call).square().sum(), [weight, pe],
                                 retain_graph=True)
             for fn in (sample_reversible, sample_autograd)]
    for got, want in zip(*grads, strict=True):
        assert rel(got, want) <= 1e-10


def test_last_k_and_an_inverted_pair():
    pipe = tiny("sd3", torch.float64)
    lora = add_lora(pipe)
    call = dict(prompt="a red fox", guidance_scale=5.0, num_inference_steps=5, progress=False)
    x_T, x_T2 = noise((1, 4, 8, 8), torch.float64), noise((1, 4, 8, 8), torch.float64, seed=1)
    for latents, k in (((x_T, x_T2), None), (x_T, 2)):
        grads = [torch.autograd.grad(fn(pipe, latents, last_k=k, **call).square().sum(), lora)
                 for fn in (sample_reversible, sample_autograd)]
        for got, want in zip(*grads, strict=True):
            assert rel(got, want) <= 1e-10


def test_v_prediction_is_converted_to_the_noise_prediction():
    """SD 2.x-style v-prediction: the same latents as the pipeline with a BELMScheduler (which
    folds the conversion into its rows, so equal to float64 rounding, not bit for bit)."""
    from belm_kernels.diffusers import BELMScheduler

    pipe = tiny("sd", torch.float64)
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config,
                                               prediction_type="v_prediction")
    x_T = noise((1, 4, 8, 8), torch.float64)
    call = dict(prompt="a red fox", guidance_scale=3.0, num_inference_steps=6)
    want = pipe(latents=x_T, output_type="latent", **call).images
    got = sample_reversible(pipe, x_T.clone().requires_grad_(), progress=False, **call)
    assert rel(got.detach(), want) <= 1e-12


def test_bad_input():
    import diffusers

    pipe = tiny("sd")
    x_T = noise((1, 4, 8, 8)).requires_grad_()
    call = dict(prompt="a red fox", num_inference_steps=3, progress=False)
    with pytest.raises(ValueError, match="'obelm', 'bdia', 'edict'"):
        sample_reversible(pipe, x_T, method="ddim", **call)
    with pytest.raises(TypeError, match="does not take: \\['prompt_3'\\]"):
        sample_reversible(pipe, x_T, prompt_3="x", **call)
    with pytest.raises(TypeError, match="latents must be a tensor .* or a pair"):
        sample_reversible(pipe, [x_T], **call)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(TypeError, match="does not support StableDiffusionImg2ImgPipeline"):
        sample_reversible(img2img, x_T, **call)
    pipe.unet.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing requires grad"):
        sample_reversible(pipe, x_T.detach(), **call)
    dropout = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout))
    dropout.p = 0.1
    pipe.unet.train()
    with pytest.raises(ValueError, match="dropout in training mode"):
        sample_reversible(pipe, x_T, **call)


@pytest.mark.parametrize("args", [["--steps", "4", "--iters", "2"],
                                  ["--tiny", "flux", "--steps", "3", "--iters", "1"]])
def test_example_runs_as_written(args, tmp_path, monkeypatch, capsys):
    """python/optimize_through_sampling.py, offline on a tiny pipeline: it prints the three peak
    memories (at a few steps the tiny Flux's peak is its VAE decoder's, the same for all three)
    and the optimisation lowers the loss."""
    import re
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "python" / "optimize_through_sampling.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script.name, *args])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    peaks = {label: float(mb) for label, mb in re.findall(r"  (\S.*?)\s+([\d.]+) MB", out)}
    assert set(peaks) == {"reversible (exact inversion)", "full autograd",
                          "checkpoint every model call"}, out
    assert peaks["reversible (exact inversion)"] <= peaks["full autograd"], out
    if "--tiny" not in args:  # SD's UNet activations outgrow its VAE decoder's even at 4 steps
        assert peaks["reversible (exact inversion)"] < peaks["full autograd"] / 2, out
    before, after = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before, out
    assert len(list(tmp_path.glob("belm_optimize_*.png"))) == 3


def test_readme_pipeline_snippet_runs_as_written():
    from test_reversible import readme_blocks

    namespace = {}
    core, pipeline = readme_blocks()
    exec(compile(core, "README.md", "exec"), namespace)
    exec(compile(pipeline, "README.md", "exec"), namespace)
    assert namespace["noise"].grad is not None and namespace["image"].shape == (1, 3, 32, 32)
    weights = namespace["pipe"].text_encoder.parameters()
    assert any(w.grad is not None and bool(w.grad.abs().sum() > 0) for w in weights)
