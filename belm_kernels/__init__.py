"""Fused kernels and exact-inversion diffusion samplers of the BELM family."""

from .models import GaussianMixture
from .ops import BackendUnavailableError, available_backends, lincomb3_, lincomb3_inverse_
from .samplers import SAMPLERS, Sampler, get_sampler
from .schedule import Schedule

__all__ = [
    "BackendUnavailableError", "GaussianMixture", "SAMPLERS", "Sampler", "Schedule",
    "available_backends", "get_sampler", "lincomb3_", "lincomb3_inverse_",
]
__version__ = "0.1.0"
