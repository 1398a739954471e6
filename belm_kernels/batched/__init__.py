"""Continuous batching of sampling and inversion requests, and CUDA-graph replay of its tick.

:class:`BatchedStepper` holds many requests, each with its own sampler, number of steps and
position, and moves all of them one step per :meth:`~BatchedStepper.tick`: ONE model call on the
stacked states with a (B,) tensor of per-sample model times, then one fused op per group of
requests that share a layout, with one coefficient row per sample. Requests join
(:meth:`~BatchedStepper.add`) and leave (when done, or :meth:`~BatchedStepper.cancel`) between
ticks.

A sampler kind is a plug-in of the stepper (:mod:`.plugin`): it turns a request into a plan (the
layout of its op and its roles, a coefficient table, model times, model-input scales, noise draws,
how its result is read out); the stepper core (:mod:`.stepper`) knows nothing else about it. A
new kind is a :class:`~.plugin.Plugin` appended to ``PLUGINS`` (asked in order which one takes a
sampler).

* :mod:`.two_step`: the BELM two-step samplers -- DDIM / Euler, BDIA, O-BELM -- sampling (from
  noise or from an inverted pair) and inversion, exact (``lincomb_inverse_``) or DDIM's inexact
  one. A request takes the very steps of ``sampler.sample`` / ``sampler.invert``.
* :mod:`.schedulers`: the fused diffusers schedulers (``belm_kernels.diffusers.fuse``): DDIM,
  DPM-Solver++ (1-3, SDE), UniPC, Euler, Euler ancestral, LCM, flow-matching Euler. A request runs
  its scheduler's step table; its history lives in the stepper's rings, its noise comes from its
  own generator as its fused scheduler alone draws it.

So a request's result is bit for bit its sampler's alone on it whenever the model's output for one
sample does not depend on the rest of the batch (true of the analytic models; a UNet's kernels may
round differently at another batch size, which the result then inherits at the rounding level),
the model returns the stepper's dtype, and the fused op computes each multiply-add chain the same
way whatever the layout around it (the torch reference does; so do compiled K-term kernels).
"""

from .plugin import ROLES, Layout, Plan, Plugin
from .stepper import DIRECTIONS, PLUGINS, BatchedStepper, GraphCaptureError, Request
from .two_step import SUPPORTED, StepPlan, step_plan

__all__ = ["BatchedStepper", "GraphCaptureError", "Request", "DIRECTIONS", "SUPPORTED",
           "PLUGINS", "Plugin", "Plan", "Layout", "ROLES", "StepPlan", "step_plan"]
