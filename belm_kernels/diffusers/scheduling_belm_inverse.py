"""``BELMInverseScheduler``: exact O-BELM inversion as a diffusers scheduler."""

from __future__ import annotations

from .scheduling_belm import SchedulerMixin, VPScheduleMixin  # noqa: F401 (see scheduling_belm)
from .scheduling_utils import BELMInversionMixin


class BELMInverseScheduler(BELMInversionMixin, VPScheduleMixin):
    """Exact O-BELM inversion: the exact counterpart of diffusers' ``DDIMInverseScheduler``.

    Built from the same config as :class:`~belm_kernels.diffusers.BELMScheduler` (``from_config``
    of either works), it walks the same grid the other way: ``timesteps`` ascend, the first step is
    a DDIM inversion step from the clean latent, every later one applies
    :func:`belm_kernels.lincomb3_inverse_` with the coefficients of the O-BELM step it undoes.
    After the last step, ``latent_pair`` is the pair ``(x_T, x_T2)`` from which
    ``BELMScheduler.set_latent_pair`` regenerates the input up to rounding (exactly, with
    ``state_dtype="float64"``). The order of the timesteps is explained in
    :class:`~belm_kernels.diffusers.scheduling_utils.BELMInversionMixin`.
    """
