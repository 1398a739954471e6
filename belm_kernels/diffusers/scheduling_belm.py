"""``BELMScheduler``: O-BELM sampling as a diffusers scheduler, and the VP schedule it shares with
``BELMInverseScheduler``.

Config. The keys of ``DDIMScheduler`` (``from_config`` of the usual Stable Diffusion schedulers'
configs works; their other keys are kept in the config but unused), plus ``backend`` for the fused
op ("auto", "torch", "triton", "cuda", "cpu") and ``state_dtype`` (None, "float32", "float64": keep
the two states in that dtype when it is wider than the latents'). ``betas``, ``alphas`` and
``alphas_cumprod`` are DDIMScheduler's, bit for bit (``trained_betas`` and
``rescale_betas_zero_snr`` included); timesteps are DDIMScheduler's for the same
``timestep_spacing`` and ``steps_offset``, or given to ``set_timesteps(timesteps=...)``.
``prediction_type`` "epsilon", "v_prediction" and "sample" are supported: the conversion to eps at
the timestep the model was called with is folded into the float64 coefficient rows, so it costs
nothing per step.

Differences from DDIM:

* ``set_alpha_to_one``: the last state is always the clean one (alpha_cumprod = 1, DDIM's
  ``set_alpha_to_one=True``). With False DDIM's last step stops at the noise level of timestep 0
  instead (sigma about 0.03 for SD); O-BELM's exactness does not depend on the choice. No warning:
  every SD 1.x config sets False, and a warning on every standard pipeline would only teach users
  to ignore warnings.
* ``clip_sample=True`` / ``thresholding=True`` warn: the predicted x0 is never clipped or
  thresholded (that would break exact inversion; latent-diffusion configs turn both off anyway).

``rescale_betas_zero_snr=True`` puts alpha = 0 at the last training timestep, where sigma/alpha
(the O-BELM time variable) is infinite: a grid that visits that timestep (e.g. "trailing" or
"linspace" spacing) is refused by ``set_timesteps``; "leading" spacing never visits it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

# SchedulerMixin: diffusers' pipeline loader looks the base class up in the namespace of the
# module that model_index.json names (this one, for a saved pipeline with a BELMScheduler).
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from .. import coefficients
from ..schedule import SPACINGS, Schedule, make_betas
from .scheduling_utils import BELMSamplingMixin, BELMSchedulerMixin

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# DDIM options that the BELM schedulers accept but do not follow:
# option -> (the value that asks for DDIM's behaviour, what happens instead)
IGNORED_DDIM_OPTIONS = {
    "clip_sample": (True, "the predicted x0 is never clipped (that would break exact inversion)"),
    "thresholding": (True, "the predicted x0 is never thresholded (that would break exact "
                           "inversion)"),
}


def _fold(rows: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """Rows (a, b, c) of ``a prev + b x + c eps`` rewritten for the raw model output.

    eps = p * model_output + q * x at the timestep the model was called with (alpha, sigma):
    v_prediction p = alpha, q = sigma; sample p = -alpha / sigma, q = 1 / sigma. Epsilon rows are
    returned unchanged (bit for bit the core tables).
    """
    if prediction_type == "epsilon":
        return rows
    a, b, c = rows.unbind(1)
    if prediction_type == "v_prediction":
        p, q = alpha, sigma
    else:  # "sample"
        p, q = -alpha / sigma, 1 / sigma
    return torch.stack([a, b + c * q, c * p], dim=1)


def _custom_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.dim() != 1 or ts.numel() < 1 or ts.is_floating_point() or ts.is_complex():
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got "
                         f"{timesteps!r}")
    ts = ts.to(torch.long)
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"custom timesteps must be strictly decreasing, got {ts.tolist()}")
    if int(ts.min()) < 0 or int(ts.max()) >= num_train_timesteps:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}], "
                         f"got {ts.tolist()}")
    return ts


class VPScheduleMixin(BELMSchedulerMixin, ConfigMixin):
    """The variance-preserving (DDPM/DDIM) schedule of :class:`BELMScheduler` and
    ``BELMInverseScheduler``: config, ``set_timesteps``, coefficient tables, ``add_noise``."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["DDIMInverseScheduler"]
    _grid_kind = "variance-preserving (DDPM/DDIM noise schedule: SD 1.x/2.x, SDXL)"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
        clip_sample: bool = False,
        thresholding: bool = False,
    ):
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
            if betas.dim() != 1 or betas.numel() != num_train_timesteps:
                raise ValueError(f"trained_betas must hold num_train_timesteps="
                                 f"{num_train_timesteps} values, got shape {tuple(betas.shape)}")
        else:
            betas = make_betas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        # diffusers-style attributes, float32 as DDIMScheduler has them
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._schedule = Schedule(self.alphas_cumprod)
        self.final_alpha_cumprod = torch.tensor(1.0)  # the last state is always clean
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._check_options()
        for option, (value, instead) in IGNORED_DDIM_OPTIONS.items():
            if getattr(self.config, option) == value:
                warnings.warn(f"{type(self).__name__}: {option}={value} is ignored: {instead}",
                              UserWarning, stacklevel=2)
        self._init_run_state()

    def _check_options(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}: "
                             f"{type(self).__name__} supports {PREDICTION_TYPES}")
        if cfg.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got "
                             f"{cfg.timestep_spacing!r}")
        self._check_common_options()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise, as DDIMScheduler computes it."""
        if self.alphas_cumprod.device != original_samples.device:
            self.alphas_cumprod = self.alphas_cumprod.to(original_samples.device)
        ac = self.alphas_cumprod.to(original_samples.dtype)[timesteps.to(original_samples.device)]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        scale = (ac**0.5).flatten().reshape(shape)
        noise_scale = ((1 - ac) ** 0.5).flatten().reshape(shape)
        return scale * original_samples + noise_scale * noise

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: Sequence[int] | torch.Tensor | None = None) -> None:
        """Build the grid of ``num_inference_steps`` model timesteps (or the given descending
        ``timesteps``) plus the clean state, move the coefficient tables to ``device`` once, and
        start a new run."""
        self._check_options()
        T = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            ts = _custom_timesteps(timesteps, T)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (or custom timesteps)")
        else:
            ts = self._schedule.timesteps(num_inference_steps, self.config.timestep_spacing,
                                          self.config.steps_offset)
        grid = self._schedule.grid(ts)
        n = grid.num_steps
        alpha, sigma = grid.alpha[:n], grid.sigma[:n]  # of the timestep each row's model call uses
        pt = self.config.prediction_type
        tables = {"first": _fold(coefficients.ddim(grid), alpha, sigma, pt),
                  "first_inverse": _fold(coefficients.ddim_inverse(grid), alpha, sigma, pt),
                  "two": _fold(coefficients.obelm(grid), alpha, sigma, pt)}
        host = tuple(ts.tolist())
        # what a latent pair must match: the timesteps and their noise levels
        record = {"timesteps": host,
                  "alphas_cumprod": tuple(self._schedule.alphas_cumprod[ts].tolist())}
        self._set_grid(host, tables, device, record)


class BELMScheduler(BELMSamplingMixin, VPScheduleMixin):
    """O-BELM sampling as a diffusers scheduler: a drop-in for ``DDIMScheduler``.

    The first step of a run is a DDIM step; every later one combines the previous state, the
    current state and the model output in one fused :func:`belm_kernels.lincomb3_`.
    ``set_latent_pair(pair)`` arms the next run to regenerate exactly from an inverted pair. Config
    keys as ``DDIMScheduler`` plus ``backend`` and ``state_dtype`` (see the module docstring).
    """
