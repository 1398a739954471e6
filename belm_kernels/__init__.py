"""Fused kernels and exact-inversion diffusion samplers of the BELM family."""

import importlib

from .batched import BatchedStepper, GraphCaptureError
from .models import GaussianMixture
from .ops import (
    BackendUnavailableError,
    available_backends,
    lincomb,
    lincomb3_,
    lincomb3_inverse_,
    lincomb_,
    lincomb_inverse_,
)
from .reversible import sample_reversible
from .samplers import FLOW_SAMPLERS, SAMPLERS, Sampler, get_sampler
from .schedule import FlowSchedule, Schedule, calculate_shift

__all__ = [
    "BackendUnavailableError", "GaussianMixture", "SAMPLERS", "Sampler", "Schedule",
    "available_backends", "get_sampler", "lincomb3_", "lincomb3_inverse_", "lincomb_",
    "lincomb_inverse_", "lincomb",
    "BELMScheduler", "BELMInverseScheduler", "sample_obelm", "invert_obelm",
    "FLOW_SAMPLERS", "FlowSchedule", "calculate_shift", "BatchedStepper", "GraphCaptureError",
    "FlowMatchBELMScheduler", "FlowMatchBELMInverseScheduler", "sample_reversible",
]
__version__ = "0.1.0"

# Integrations import heavy optional packages (diffusers), so they load on first access. The
# scheduler classes are exported here so diffusers finds them when a saved pipeline names
# "belm_kernels" as its scheduler's library (its loader also looks up SchedulerMixin there).
_LAZY = {"BELMScheduler": "diffusers", "BELMInverseScheduler": "diffusers",
         "SchedulerMixin": "diffusers",
         "FlowMatchBELMScheduler": "diffusers", "FlowMatchBELMInverseScheduler": "diffusers",
         "sample_obelm": "k_diffusion", "invert_obelm": "k_diffusion"}


#: Submodules that load on first access too: ``bk.diffusers.fuse(...)``, ``bk.multistep``.
_LAZY_MODULES = ("diffusers", "k_diffusion", "multistep", "roundoff")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
