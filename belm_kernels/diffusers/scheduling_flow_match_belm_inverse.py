"""``FlowMatchBELMInverseScheduler``: exact O-BELM inversion on a rectified-flow grid."""

from __future__ import annotations

# SchedulerMixin: see scheduling_flow_match_belm
from .scheduling_flow_match_belm import FlowScheduleMixin, SchedulerMixin  # noqa: F401
from .scheduling_utils import BELMInversionMixin


class FlowMatchBELMInverseScheduler(BELMInversionMixin, FlowScheduleMixin):
    """Exact O-BELM inversion for SD3 and Flux: what running FlowMatchEulerDiscreteScheduler
    backwards does approximately, exactly.

    Built from the same config as :class:`~belm_kernels.diffusers.FlowMatchBELMScheduler`
    (``from_config`` of either, or of the pipeline's ``FlowMatchEulerDiscreteScheduler``) and
    ``set_timesteps`` with the same arguments (the same ``sigmas`` and ``mu``), it walks the same
    grid the other way: the first step is an inverted Euler step from the clean latent (the model
    evaluated there at the last timestep), every later one applies
    :func:`belm_kernels.lincomb3_inverse_` with the coefficients of the O-BELM step it undoes.
    After the last step ``latent_pair`` is the pair ``(x_T, x_T2)`` from which
    ``FlowMatchBELMScheduler.set_latent_pair`` regenerates the input up to rounding (exactly, with
    ``state_dtype="float64"``). ``timesteps`` ascend as in
    :class:`~belm_kernels.diffusers.scheduling_utils.BELMInversionMixin`; ``sigmas`` ascend from
    0 (the clean sample of the first step) to the noisiest state. N >= 2 steps.
    """
