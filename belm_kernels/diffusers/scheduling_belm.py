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

CogVideoX. ``snr_shift_scale`` (a key of ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``)
switches to their recipe: betas as there ("scaled_linear" in float64), alphas_cumprod divided by
``snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod`` and, with ``rescale_betas_zero_snr``,
rescaled to zero terminal SNR on alphas_cumprod itself; so ``from_config`` of CogVideoX's config
gives its alphas_cumprod bit for bit.

Zero terminal SNR. ``rescale_betas_zero_snr=True`` puts alpha = 0 at the last training timestep:
the state there is pure noise and sigma/alpha (the O-BELM time variable) is infinite. A grid that
visits it ("trailing" spacing, as CogVideoX samples) works for "v_prediction" and "sample" models,
whose output gives the data there: the first step is DDIM's (x_1 = sigma_1 x - alpha_1 v), and the
O-BELM step after it is the limit of an infinitely long previous step, DDIM's step again (its
leading coefficient is 0). That step cannot be inverted, so an exact inversion ends one state
earlier, with the pair of the second and third states, and a regeneration from it makes N-2 model
calls (see ``scheduling_utils.BELMSchedulerMixin._set_grid``). An "epsilon" model cannot predict
the data from pure noise: such a grid is refused for it; "leading" spacing never visits alpha = 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_ddim_cogvideox import (
    rescale_zero_terminal_snr as rescale_alphas_cumprod_zero_snr,
)

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


def _zero_snr_rows(timestep: int, alpha: float, sigma: float,
                   prediction_type: str) -> dict[str, torch.Tensor]:
    """The (1, 3) rows of the step from a zero-SNR state (alpha 0, sigma 1: x is the noise) to a
    state (alpha, sigma), in the raw model output: DDIM's x_next = alpha x0 + sigma eps with
    eps = x and x0 = -v (v_prediction) or the output (sample); and its inversion, for first-order
    baselines (O-BELM never inverts it)."""
    if prediction_type == "epsilon":
        raise ValueError(
            f"the grid visits timestep {timestep}, whose alphas_cumprod is 0 (zero terminal "
            "SNR, rescale_betas_zero_snr): the state there is pure noise, from which an epsilon "
            "model cannot predict the data; use 'leading' timestep_spacing, which never visits "
            "it, or a v_prediction model's config")
    c = -alpha if prediction_type == "v_prediction" else alpha
    return {"first": torch.tensor([[0.0, sigma, c]], dtype=torch.float64),
            "first_inverse": torch.tensor([[0.0, 1 / sigma, -c / sigma]], dtype=torch.float64)}


def _cogvideox_alphas_cumprod(betas: torch.Tensor, snr_shift_scale: float,
                              rescale_zero_snr: bool) -> torch.Tensor:
    """alphas_cumprod as CogVideoXDDIMScheduler computes them from its betas."""
    ac = torch.cumprod(1.0 - betas, dim=0)
    ac = ac / (snr_shift_scale + (1 - snr_shift_scale) * ac)
    return rescale_alphas_cumprod_zero_snr(ac) if rescale_zero_snr else ac


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

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "DDIMInverseScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
    # (the text is part of the grid records stored by the bulk jobs: changing it would make
    # their folders look like another grid)
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
        snr_shift_scale: float | None = None,
    ):
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
            if betas.dim() != 1 or betas.numel() != num_train_timesteps:
                raise ValueError(f"trained_betas must hold num_train_timesteps="
                                 f"{num_train_timesteps} values, got shape {tuple(betas.shape)}")
        elif snr_shift_scale is not None and beta_schedule == "scaled_linear":  # CogVideoX's
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                   dtype=torch.float64) ** 2
        else:
            betas = make_betas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        # diffusers-style attributes, as DDIMScheduler (float32) or CogVideoX has them
        if snr_shift_scale is None:
            if rescale_betas_zero_snr:
                betas = rescale_zero_terminal_snr(betas)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            if (isinstance(snr_shift_scale, bool) or not isinstance(snr_shift_scale, (int, float))
                    or not snr_shift_scale > 0):
                raise ValueError(f"snr_shift_scale must be a positive float (CogVideoX: 3.0 or "
                                 f"1.0) or None, got {snr_shift_scale!r}")
            alphas_cumprod = _cogvideox_alphas_cumprod(betas, snr_shift_scale,
                                                       rescale_betas_zero_snr)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = alphas_cumprod
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
        pt = self.config.prediction_type
        # a first state of zero SNR: the grid of the later states, and the step into it
        zero_snr = int(self._schedule.alphas_cumprod[ts[0]] == 0)
        grid = self._schedule.grid(ts[zero_snr:])
        n = grid.num_steps
        alpha, sigma = grid.alpha[:n], grid.sigma[:n]  # of the timestep each row's model call uses
        tables = {"first": _fold(coefficients.ddim(grid), alpha, sigma, pt),
                  "first_inverse": _fold(coefficients.ddim_inverse(grid), alpha, sigma, pt),
                  "two": _fold(coefficients.obelm(grid), alpha, sigma, pt)}
        if zero_snr:
            # "two" row 1 is the later grid's row 0, DDIM's step: O-BELM's limit after an
            # infinitely long first step (leading coefficient 0)
            into = _zero_snr_rows(int(ts[0]), float(grid.alpha[0]), float(grid.sigma[0]), pt)
            into["two"] = into["first"]  # never used: a run from noise starts with "first"
            tables = {name: torch.cat([into[name], rows]) for name, rows in tables.items()}
        self._check_steps(len(ts), zero_snr)  # before anything changes
        host = tuple(ts.tolist())
        # what a latent pair must match: the timesteps and their noise levels
        record = {"timesteps": host,
                  "alphas_cumprod": tuple(self._schedule.alphas_cumprod[ts].tolist())}
        self._set_grid(host, tables, device, record, pair_start=zero_snr)


class BELMScheduler(BELMSamplingMixin, VPScheduleMixin):
    """O-BELM sampling as a diffusers scheduler: a drop-in for ``DDIMScheduler``.

    The first step of a run is a DDIM step; every later one combines the previous state, the
    current state and the model output in one fused :func:`belm_kernels.lincomb3_`.
    ``set_latent_pair(pair)`` arms the next run to regenerate exactly from an inverted pair. Config
    keys as ``DDIMScheduler`` plus ``backend`` and ``state_dtype`` (see the module docstring).
    """
