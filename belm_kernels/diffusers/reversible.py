"""Gradients through a diffusers pipeline's whole denoising loop in constant memory.

:func:`sample_reversible` runs the loop of a pipeline that :func:`~belm_kernels.diffusers.invert`
supports (SD 1.x / 2.x, SDXL, SD3, Flux) -- the very model call with guidance that ``invert`` and
the pipeline's ``__call__`` build from the same arguments, on the grid of the pipeline's BELM
scheduler -- through :func:`belm_kernels.sample_reversible`, and returns the final latents,
differentiable in constant memory: with respect to the initial latents, the prompt embeddings
(leaf or not: embeddings computed by a text encoder under autograd get their gradient through its
graph) and any parameter of the denoiser that requires grad (LoRA weights). :func:`decode` turns
latents into the image, differentiably, as the pipeline decodes them::

    from belm_kernels.diffusers import decode, sample_reversible

    noise = torch.randn(1, 4, 64, 64, requires_grad=True)
    latents = sample_reversible(pipe, noise, prompt_embeds=embeds, num_inference_steps=50)
    loss = reward(decode(pipe, latents))
    loss.backward()                       # noise.grad, embeds' graph, LoRA .grad

The model call is built by ``model_calls.py`` (the pipeline's own guided model call), with every
tensor argument that
requires grad replaced by a leaf stand-in (``t.detach().requires_grad_()``) whose gradient is
handed to the caller's tensor, so that a non-leaf's graph runs once, after the chain. Prompts
given as text are encoded as constants, as the pipeline encodes them (no gradient to the text
encoders); to differentiate through a text encoder (its LoRA weights, say), compute the
embeddings with ``pipe.encode_prompt`` under autograd and pass them.

:func:`sample_autograd` runs the same chain under plain autograd (optionally checkpointing every
model call): the baseline the reversible one is compared with.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..reversible import GradHook, run_reversible
from ..reversible import sample_autograd as _core_sample_autograd
from ..samplers import get_sampler
from ..schedule import FlowSchedule, Schedule
from .inversion import _family
from .model_calls import MODEL_CALLS, _flux_latent_size, builder, model_call, prompt_batch
from .scheduling_flow_match_belm import FlowMatchBELMScheduler, _timesteps_f32
from .scheduling_utils import check_float_tensor

__all__ = ["decode", "sample_autograd", "sample_reversible"]


class _Chain(NamedTuple):
    sampler: object
    fn: object               # fn(x, t): the guided noise / velocity prediction at sampler times
    x_T: torch.Tensor
    x_T2: torch.Tensor | None
    sources: dict            # id(stand-in) -> the caller's tensor
    modules: list
    backend: str


def _pair(latents) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(latents, torch.Tensor):
        return latents, None
    if isinstance(latents, Sequence) and len(latents) == 2:
        return latents[0], latents[1]
    raise TypeError("latents must be a tensor (the initial noise) or a pair (x_T, x_T2), e.g. "
                    f"invert's LatentPair; got {type(latents).__name__}")


def _sampler(pipe, family, latents, method, num_inference_steps, steps_kwargs, device):
    """A belm_kernels sampler on the grid the pipeline's BELM scheduler walks."""
    scheduler = family.scheduler.from_config(pipe.scheduler.config)
    steps = family.steps(pipe, latents, num_inference_steps, **steps_kwargs)
    scheduler.set_timesteps(device=device, **steps)
    if isinstance(scheduler, FlowMatchBELMScheduler):
        schedule, _ = scheduler._schedule(steps.get("mu"))
        sampler = get_sampler(method, schedule, steps.get("num_inference_steps"),
                              sigmas=steps.get("sigmas"))
        times = torch.tensor(_timesteps_f32(sampler.sigmas[:-1], schedule.num_train_timesteps))
    else:
        sampler = get_sampler(method, Schedule(scheduler.alphas_cumprod),
                              timesteps=scheduler.timesteps.cpu())
        times = sampler.timesteps
    if not torch.equal(times.to(scheduler.timesteps.dtype), scheduler.timesteps.cpu()):
        raise RuntimeError(f"internal: the {method} grid {times.tolist()} is not the "
                           f"scheduler's {scheduler.timesteps.tolist()}")
    return sampler, scheduler


def _as_eps(pipe, sampler, model):
    """The model's output as the sampler's noise prediction: VP v- and x0-prediction models are
    converted at the state's (alpha, sigma); eps and flow velocity models pass through."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if isinstance(sampler.schedule, FlowSchedule) or kind == "epsilon":
        return model
    if kind not in ("v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {kind!r} in the pipeline's scheduler "
                         "config (supported: 'epsilon', 'v_prediction', 'sample')")
    grid = sampler.grid
    levels = {t: (float(grid.alpha[j]), float(grid.sigma[j]))
              for j, t in enumerate(sampler.model_times)}

    def eps(x, t):
        out = model(x, t)
        alpha, sigma = levels[t]
        return alpha * out + sigma * x if kind == "v_prediction" else (x - alpha * out) / sigma

    return eps


def _keywords(fn: Callable) -> set[str]:
    """The keyword-only arguments of a model-call builder or a family's steps function: the
    pipeline's own argument names."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _supported_family(pipe):
    family = _family(pipe)
    if family.pipeline not in MODEL_CALLS:
        raise TypeError(f"sample_reversible() does not support {type(pipe).__name__}; it "
                        f"supports {', '.join(MODEL_CALLS)} (and their subclasses)")
    return family


def _build(pipe, latents, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
           num_inference_steps, guidance_scale, height, width, method, backend, stand_ins,
           pipeline_kwargs) -> _Chain:
    family = _supported_family(pipe)
    conditioning, steps = _keywords(builder(pipe)), _keywords(family.steps)
    unknown = sorted(set(pipeline_kwargs) - conditioning - steps)
    if unknown:
        raise TypeError(f"got arguments that {family.pipeline} does not take: {unknown} (it "
                        f"takes {sorted(conditioning | steps)})")
    x_T, x_T2 = _pair(latents)
    check_float_tensor(x_T, "latents")
    if x_T2 is not None:
        check_float_tensor(x_T2, "latents[1]")
    device = pipe._execution_device
    batch = prompt_batch(prompt, prompt_embeds)
    if x_T.shape[0] % batch:
        raise ValueError(f"the latents' batch {x_T.shape[0]} is not a multiple of the prompt "
                         f"batch {batch}")
    kwargs = dict(prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
                  negative_prompt_embeds=negative_prompt_embeds,
                  **{k: v for k, v in pipeline_kwargs.items() if k in conditioning})
    sources = {}
    if stand_ins:  # leaves the model closes over, whose gradients go to the caller's tensors
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.requires_grad:
                kwargs[key] = value.detach().requires_grad_()
                sources[id(kwargs[key])] = value
    with torch.enable_grad(), _frozen(_text_encoders(pipe)):
        model, cast = model_call(pipe, x_T.detach(), guidance_scale, height, width, **kwargs)
    sampler, scheduler = _sampler(pipe, family, cast, method, num_inference_steps,
                                  {k: v for k, v in pipeline_kwargs.items() if k in steps},
                                  device)
    times = dict(zip(sampler.model_times, scheduler.timesteps, strict=True))
    fn = _as_eps(pipe, sampler, functools.partial(_at_pipeline_time, model, times))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if backend is None:
        backend = pipe.scheduler.config.get("backend", "auto")
    x_T, x_T2 = (None if x is None else x.to(device=device, dtype=cast.dtype) for x in (x_T, x_T2))
    return _Chain(sampler, fn, x_T, x_T2, sources, [denoiser], backend)


def _text_encoders(pipe) -> list[torch.nn.Module]:
    return [m for name, m in pipe.components.items()
            if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def _frozen(modules):
    """Prompts given as text are encoded as constants: the text encoders' weights do not require
    grad meanwhile (so no graph, and the very kernels the pipeline's no-grad call runs)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _at_pipeline_time(model, times, x, t):
    return model(x, times[t])  # the timestep tensor the pipeline's loop passes


def sample_reversible(pipe, latents, prompt=None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt=None, negative_prompt_embeds: torch.Tensor | None = None,
                      num_inference_steps: int = 50, guidance_scale: float | None = None,
                      height: int | None = None, width: int | None = None,
                      method: str = "obelm", last_k: int | None = None,
                      grad_hook: GradHook | None = None,
                      state_dtype: torch.dtype | None = torch.float64,
                      backend: str | None = None, progress: bool = True,
                      **pipeline_kwargs) -> torch.Tensor:
    """The pipeline's denoising loop from ``latents``, differentiable in constant memory.

    Arguments as :func:`~belm_kernels.diffusers.invert` (and the pipeline's own ``__call__``):
    ``prompt`` / ``prompt_embeds``, negative prompts, ``guidance_scale`` (default: the
    pipeline's), ``height`` / ``width`` and ``pipeline_kwargs`` (SDXL's pooled embeddings and
    size conditioning, SD3's and Flux's ``sigmas`` / ``mu``, Flux's ``true_cfg_scale``, ...).
    ``latents``: the initial noise as the pipeline's ``latents`` argument takes it (Flux:
    packed), or a pair (x_T, x_T2) such as :func:`invert` returns (then N-1 model calls).

    Returns the final latents (the pipeline's ``output_type="latent"``; :func:`decode` makes the
    image), equal to those of the pipeline run with its BELM scheduler up to the states' dtype
    (bit for bit with ``state_dtype=None``). Backward: gradients to ``latents``, to every prompt
    tensor that requires grad (through its own graph if it is not a leaf: embeddings from
    ``pipe.encode_prompt`` under autograd reach the text encoders' weights) and to every denoiser
    parameter that requires grad (freeze what you do not optimise, as with plain autograd:
    ``pipe.unet.requires_grad_(False)``), in constant memory (see
    :func:`belm_kernels.sample_reversible`, whose ``last_k``, ``grad_hook`` and ``state_dtype``
    these are). ``method``: "obelm" (the pipelines' BELM schedulers' step), "bdia" or "edict" on
    the same grid. ``state_dtype`` defaults to float64 (as :func:`invert`), so that the backward
    pass rebuilds the very latents the model saw.
    """
    chain = _build(pipe, latents, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                   num_inference_steps, guidance_scale, height, width, method, backend, True,
                   pipeline_kwargs)
    return run_reversible(chain.sampler, chain.fn, chain.x_T, chain.x_T2, sources=chain.sources,
                          modules=chain.modules, last_k=last_k, grad_hook=grad_hook,
                          state_dtype=state_dtype, backend=chain.backend, progress=progress)


def sample_autograd(pipe, latents, prompt=None, prompt_embeds: torch.Tensor | None = None,
                    negative_prompt=None, negative_prompt_embeds: torch.Tensor | None = None,
                    num_inference_steps: int = 50, guidance_scale: float | None = None,
                    height: int | None = None, width: int | None = None,
                    method: str = "obelm", last_k: int | None = None, checkpoint: bool = False,
                    state_dtype: torch.dtype | None = torch.float64, backend: str | None = None,
                    progress: bool = True, **pipeline_kwargs) -> torch.Tensor:
    """:func:`sample_reversible`'s chain under plain autograd (memory grows with the number of
    steps; ``checkpoint=True`` checkpoints every model call): the baseline to compare with."""
    chain = _build(pipe, latents, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                   num_inference_steps, guidance_scale, height, width, method, backend, False,
                   pipeline_kwargs)
    return _core_sample_autograd(chain.sampler, chain.fn, chain.x_T, chain.x_T2,
                                 checkpoint=checkpoint, last_k=last_k, state_dtype=state_dtype,
                                 backend=chain.backend, progress=progress)


def decode(pipe, latents: torch.Tensor, height: int | None = None,
           width: int | None = None) -> torch.Tensor:
    """Images in [0, 1], (batch, 3, H, W), from latents as the pipeline decodes them (its
    ``output_type="pt"``), differentiably: the VAE config's scaling / shift (SDXL's latents
    mean and std), Flux's unpacking (``height`` / ``width`` as given to the pipeline), the VAE
    decoder, and ``image_processor``'s denormalisation (x / 2 + 0.5, clamped)."""
    family = _supported_family(pipe)
    check_float_tensor(latents, "latents")
    vae = pipe.vae
    cfg = vae.config
    if family.pipeline == "FluxPipeline":
        height, width, _, _ = _flux_latent_size(pipe, height, width)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        view = dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(**view)
        std = torch.tensor(std).view(1, -1, 1, 1).to(**view)
        latents = latents * std / cfg.scaling_factor + mean
    else:
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)
