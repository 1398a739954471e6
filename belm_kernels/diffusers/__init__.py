"""O-BELM in diffusers: drop-in schedulers, and exact invert -> regenerate through pipelines; and
``fuse(scheduler)``, which makes diffusers' own schedulers (DDIM, DPM-Solver++, UniPC, Euler,
Euler ancestral, LCM, flow Euler) step with one fused op (``fused.py``).

``BELMScheduler`` is a diffusers scheduler that samples with O-BELM, the second-order
exact-inversion sampler (DESIGN.md section 2): a DDIM step, then one fused
:func:`belm_kernels.lincomb3_` per step. ``BELMInverseScheduler`` walks the same grid the other way,
exactly. Swap it into any pipeline whose loop calls ``scheduler.step``::

    from belm_kernels.diffusers import BELMScheduler, invert
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a cat", num_inference_steps=50).images[0]

Rectified-flow models take ``FlowMatchBELMScheduler`` (O-BELM on the sigmas of their
``FlowMatchEulerDiscreteScheduler`` config, or of Wan's UniPC flow-sigma config) and
``FlowMatchBELMInverseScheduler`` the same way; ``invert`` picks the right one for the pipeline.

Exact inversion and regeneration (or editing: regenerate the same pair with another prompt), for
every pipeline of ``SUPPORTED_PIPELINES`` (images or, for the video pipelines, ``video=``)::

    pair = invert(pipe, image=photo, prompt="a cat", num_inference_steps=50)
    same = regenerate(pipe, pair, prompt="a cat").images[0]
    edit = regenerate(pipe, pair, prompt="a dog").images[0]
    # by hand, what regenerate does:
    pipe.scheduler.set_latent_pair(pair)           # a pair is used by one run only
    same = pipe("a cat", latents=pair.x_T2, num_inference_steps=50, **pair.sizes).images[0]

:func:`invert` runs the pipeline's own loop with the inverse scheduler in place of its own, so
both directions evaluate the model exactly as the pipeline samples (``inversion.py`` explains
it, and what differs per pipeline family).

How the pair reaches the scheduler. Exact reconstruction needs the two noisiest states
(x_T, x_T2), and sampling from them skips the first (DDIM) step. ``set_latent_pair`` arms the
scheduler for its next run: ``set_timesteps(N)`` (which the pipeline calls) then exposes only the
N-1 timesteps after the first one, so the pipeline's loop makes N-1 model calls and starts at
x_T2 -- which is why the pipeline gets ``latents=x_T2``; the scheduler keeps x_T itself, as the
previous state of its first step. The first step checks that the pipeline's latents equal the
armed x_T2, and ``set_timesteps`` checks that the grid is the one the pair was made on (the
:class:`LatentPair` records it). The pair is consumed by that run (the pipeline's progress bar
shows N-1 of N steps). The conditioning must be the same in :func:`invert` and in the pipeline
call (prompts, negative prompts, guidance scale, the size arguments), so that both evaluate
the same model.

Precision (``state_dtype``). With states in the latents' own dtype each regenerated state differs
from the inverted one by rounding, which the model (times the guidance scale) amplifies from step
to step: a float32 round trip through a tiny random UNet at 20 steps lands around 1e-5 relative.
:func:`invert` therefore keeps its two states in float64 and hands them over in the pair
(``pair.state``); a scheduler armed with it keeps float64 states for that run and gives the
pipeline float32 roundings of them, so inversion and regeneration evaluate the model on the same
float32 inputs and the latents come back bit for bit. The config key ``state_dtype`` does the same
for every run (e.g. float32 states for a float16 pipeline). Rectified flow needs this even more:
its inversion multiplies perturbations by (h_next / h)^2 per step.

Layout, as in diffusers: ``fused.py`` (``fuse`` and the fused schedulers), ``scheduling_belm.py``
(``BELMScheduler`` and the VP schedule config), ``scheduling_belm_inverse.py``,
``scheduling_flow_match_belm.py`` (``FlowMatchBELMScheduler`` and the flow schedule config),
``scheduling_flow_match_belm_inverse.py``, ``scheduling_utils.py``
(what every BELM scheduler shares: the two-step state, its checks, :class:`LatentPair`),
``inversion.py`` (:func:`invert`, :func:`regenerate`, what differs per pipeline family),
``model_calls.py`` (the model call of the SD, SDXL, SD3 and Flux loops as a function, for code
outside the loop) and ``tiny_pipelines.py`` (tiny random pipelines of every supported family,
built offline, for trying the package without weights).
"""

from .fused import FUSED_SCHEDULERS, UnsupportedOptionError, fuse
from .inversion import (
    SUPPORTED_PIPELINES,
    image_latents,
    invert,
    regenerate,
    video_latents,
)
from .reversible import decode, sample_reversible

# SchedulerMixin is here (not in __all__) for diffusers' loader, which looks a component's base
# class up in the module model_index.json names: this one in pipelines saved by version 0.1.0.
from .scheduling_belm import BELMScheduler, SchedulerMixin  # noqa: F401
from .scheduling_belm_inverse import BELMInverseScheduler
from .scheduling_flow_match_belm import FlowMatchBELMScheduler
from .scheduling_flow_match_belm_inverse import FlowMatchBELMInverseScheduler
from .scheduling_utils import LatentPair
from .tiny_pipelines import (
    tiny_chroma_pipeline,
    tiny_cogvideox_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_hunyuan_video_pipeline,
    tiny_ltx_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_pipeline,
    tiny_stable_diffusion_3_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
    tiny_wan_i2v_pipeline,
    tiny_wan_pipeline,
)

__all__ = ["fuse", "FUSED_SCHEDULERS", "UnsupportedOptionError",
           "BELMScheduler", "BELMInverseScheduler", "FlowMatchBELMScheduler",
           "FlowMatchBELMInverseScheduler", "LatentPair", "SUPPORTED_PIPELINES", "decode",
           "image_latents", "invert", "regenerate", "sample_reversible", "video_latents",
           "tiny_chroma_pipeline", "tiny_cogvideox_pipeline", "tiny_flux_kontext_pipeline",
           "tiny_flux_pipeline", "tiny_hunyuan_video_pipeline", "tiny_ltx_pipeline",
           "tiny_qwen_image_edit_pipeline", "tiny_qwen_image_pipeline",
           "tiny_stable_diffusion_3_pipeline", "tiny_stable_diffusion_pipeline",
           "tiny_stable_diffusion_xl_pipeline", "tiny_wan_i2v_pipeline", "tiny_wan_pipeline"]
