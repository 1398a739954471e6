"""Fused kernels and exact-inversion diffusion samplers of the BELM family."""

from .ops import BackendUnavailableError, available_backends, lincomb3_, lincomb3_inverse_

__all__ = ["BackendUnavailableError", "available_backends", "lincomb3_", "lincomb3_inverse_"]
__version__ = "0.1.0"
