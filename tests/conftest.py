import os
import shutil

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before
# triton is first imported. On a GPU machine the real kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI sets this so that a machine without nvcc fails the CUDA compile checks instead of skipping.
REQUIRE_NVCC = "BELM_KERNELS_REQUIRE_NVCC"


def _find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="session")
def nvcc() -> str:
    """Path of nvcc. Without one the test skips, or fails where BELM_KERNELS_REQUIRE_NVCC=1."""
    path = _find_nvcc()
    if path is None:
        why = "nvcc not found (looked on PATH, in $CUDA_HOME/bin and /usr/local/cuda/bin)"
        if os.environ.get(REQUIRE_NVCC, "") not in ("", "0"):
            pytest.fail(f"{why}, and {REQUIRE_NVCC} says the CUDA sources must compile here")
        pytest.skip(why)
    return path


# ---------------------------------------------------------------------------------------------
# diffusers: tiny random pipelines (belm_kernels.diffusers.tiny_pipelines) with a BELMScheduler
# built from their scheduler's config, progress bars off. Builder keyword arguments can be given
# by indirect parametrization, e.g.
#     @pytest.mark.parametrize("sd_pipe", [dict(sample_size=16)], indirect=True)


def _tiny_belm_pipeline(request, builder_name: str, scheduler: str = "BELMScheduler",
                        **defaults):
    pytest.importorskip("diffusers")
    from belm_kernels import diffusers as belm_diffusers
    from belm_kernels.diffusers import tiny_pipelines

    pipe = getattr(tiny_pipelines, builder_name)(**{**defaults, **getattr(request, "param", {})})
    pipe.scheduler = getattr(belm_diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe(request):
    """A tiny random StableDiffusionPipeline, latents (B, 4, 8, 8), with a BELMScheduler."""
    return _tiny_belm_pipeline(request, "tiny_stable_diffusion_pipeline", sample_size=8)


@pytest.fixture
def sdxl_pipe(request):
    """A tiny random StableDiffusionXLPipeline, latents (B, 4, 8, 8), with a BELMScheduler."""
    return _tiny_belm_pipeline(request, "tiny_stable_diffusion_xl_pipeline", sample_size=8)



@pytest.fixture
def sd3_pipe(request):
    """A tiny random StableDiffusion3Pipeline, latents (B, 4, 8, 8), with a
    FlowMatchBELMScheduler from its FlowMatchEulerDiscreteScheduler config (shift 3)."""
    return _tiny_belm_pipeline(request, "tiny_stable_diffusion_3_pipeline",
                               scheduler="FlowMatchBELMScheduler")


@pytest.fixture
def flux_pipe(request):
    """A tiny random FluxPipeline, packed latents (B, 16, 16) (images 16x16, the default size),
    distilled guidance, with a FlowMatchBELMScheduler from its FlowMatchEulerDiscreteScheduler
    config (dynamic shifting)."""
    return _tiny_belm_pipeline(request, "tiny_flux_pipeline", scheduler="FlowMatchBELMScheduler")


# The pipelines of the other families (tests/test_diffusers_families.py), one per session and
# kind: invert and regenerate swap their scheduler for a run only, so tests share them; a test
# that changes a pipeline builds its own. Their schedulers are the ones the models ship
# (UniPC for Wan, CogVideoX's DDIM), as invert and regenerate meet them.
_TINY = {}


@pytest.fixture(scope="session")
def tiny_pipe():
    """``tiny_pipe(builder_name, **kwargs)``: a cached tiny pipeline, progress bars off."""
    pytest.importorskip("diffusers")
    from belm_kernels.diffusers import tiny_pipelines

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in _TINY:
            pipe = getattr(tiny_pipelines, name)(**kwargs)
            pipe.set_progress_bar_config(disable=True)
            _TINY[key] = pipe
        return _TINY[key]

    return get
