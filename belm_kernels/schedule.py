"""Noise schedules, timestep spacing and the state grid the samplers walk.

Conventions follow diffusers, so that the same configuration gives bit-identical alphas_cumprod
and the same integer timesteps as its schedulers (``Schedule``, variance preserving), and the
same sigmas as its FlowMatchEulerDiscreteScheduler up to float32 rounding (``FlowSchedule``,
rectified flow: SD3, Flux).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal's cosine alpha_bar, discretised as diffusers' betas_for_alpha_bar does.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
               num_train_timesteps: int = 1000) -> torch.Tensor:
    """float32 betas exactly as diffusers' DDIMScheduler builds them."""
    n = num_train_timesteps
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {n!r}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


@dataclass(frozen=True)
class StateGrid:
    """The N+1 states of an N-step sampler, noisiest first; the last one is clean (alpha=1).

    ``timesteps[j]`` is the model timestep of state j (j < N); ``alpha``/``sigma`` are float64.
    A flow grid (``FlowSchedule.grid``) has alpha = 1 and sigma = the flow's own sigmas, so that
    sbar = sigma and every coefficient function applies to it unchanged (DESIGN.md section 2b).
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def sbar(self) -> torch.Tensor:
        """sigma / alpha per state: the time variable of the probability-flow ODE."""
        return self.sigma / self.alpha


class Schedule:
    """A discrete diffusion schedule given by its cumulative alphas (one per training timestep)."""

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod)
        if not ac.is_floating_point() or ac.dim() != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D float tensor with at least 2 entries, "
                             f"got dtype {ac.dtype} and shape {tuple(ac.shape)}")
        ac = ac.detach().to("cpu", torch.float64)
        # A last entry of 0 (zero terminal SNR) is allowed; grid() refuses to visit it.
        if not (bool(((ac >= 0) & (ac <= 1)).all()) and bool((ac[:-1] > 0).all())):
            raise ValueError("alphas_cumprod must lie in (0, 1] (only the last entry may be 0)")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac

    @classmethod
    def from_betas(cls, beta_start: float = 0.0001, beta_end: float = 0.02,
                   beta_schedule: str = "linear", num_train_timesteps: int = 1000) -> Schedule:
        """Betas as diffusers builds them (in float32, so alphas_cumprod match bit for bit)."""
        betas = make_betas(beta_start, beta_end, beta_schedule, num_train_timesteps)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def __repr__(self) -> str:
        return f"Schedule(num_train_timesteps={self.num_train_timesteps})"

    def timesteps(self, num_steps: int, spacing: str = "linspace",
                  steps_offset: int = 0) -> torch.Tensor:
        """Descending integer timesteps, exactly as diffusers' DDIMScheduler.set_timesteps."""
        n, T = num_steps, self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_steps must be an int >= 2, got {n!r}")
        if n > T:
            raise ValueError(f"num_steps must be at most num_train_timesteps={T}, got {n}")
        if spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
        elif spacing == "leading":
            ts = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + steps_offset
        elif spacing == "trailing":
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        ts = ts.to(torch.long)
        if len(ts) != n or bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"spacing {spacing!r} with num_steps={n} yields repeated timesteps "
                             f"{ts.tolist()}")
        if int(ts.min()) < 0 or int(ts.max()) >= T:
            raise ValueError(f"spacing {spacing!r} with steps_offset={steps_offset} yields "
                             f"timesteps outside [0, {T - 1}]")
        return ts

    def grid(self, timesteps: torch.Tensor) -> StateGrid:
        """States at the given descending timesteps plus a final clean state (alpha=1, sigma=0)."""
        ac = self.alphas_cumprod[timesteps]
        if bool((ac == 0).any()):
            raise ValueError(
                f"the grid visits timestep {int(timesteps[ac == 0][0])}, where alphas_cumprod is 0 "
                "(zero terminal SNR): sigma/alpha is infinite there, so the grid is undefined; use "
                "timesteps that do not visit it (e.g. 'leading' spacing)")
        alpha = torch.cat([ac.sqrt(), ac.new_ones(1)])
        sigma = torch.cat([(1 - ac).sqrt(), ac.new_zeros(1)])
        return StateGrid(timesteps=timesteps, alpha=alpha, sigma=sigma)


# --------------------------------------------------------------------------------------------
# Rectified flow (DESIGN.md section 2b).


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's mu for an image of ``image_seq_len`` latent tokens: the line through
    (base_seq_len, base_shift) and (max_seq_len, max_shift), as diffusers' pipelines compute it
    (Flux: tokens = (height // 16) * (width // 16); SD3 with dynamic shifting: patches)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def _vector(values, name: str) -> torch.Tensor:
    """A float64 CPU copy of a 1-D sequence / array / tensor of reals."""
    try:
        if isinstance(values, torch.Tensor):
            v = values.detach()
        else:  # through numpy, so Python floats stay float64 (torch would make them float32)
            v = torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 1-D sequence of floats, got "
                        f"{type(values).__name__}") from None
    if v.dtype == torch.bool or v.is_complex() or v.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of real numbers, got dtype {v.dtype} "
                         f"and shape {tuple(v.shape)}")
    return v.to("cpu", torch.float64)


def _check_decreasing_in_unit(s: torch.Tensor, name: str) -> None:
    """Every entry in (0, 1] and each one below the previous; names the first bad entry."""
    values = s.tolist()
    for k, value in enumerate(values):
        if not 0 < value <= 1:  # also catches nan
            raise ValueError(f"{name}[{k}] = {value!r} is outside (0, 1]")
        if k and value >= values[k - 1]:
            raise ValueError(f"{name} must be strictly decreasing, but {name}[{k}] = {value!r} "
                             f"follows {name}[{k - 1}] = {values[k - 1]!r}")


class FlowSchedule:
    """The sigma grid of a rectified-flow model, x_s = (1 - s) x_0 + s noise with s in [0, 1].

    The same floats as diffusers' FlowMatchEulerDiscreteScheduler with the same config (computed
    here in float64, so equal up to its float32 rounding):

    - static shift (SD3: ``shift=3.0``): sigma -> shift * sigma / (1 + (shift - 1) * sigma);
    - dynamic shifting (Flux: ``use_dynamic_shifting=True, mu=calculate_shift(seq_len)``):
      sigma -> e^mu / (e^mu + 1 / sigma - 1); ``shift`` is then ignored, as in diffusers;
    - ``shift_terminal`` (LTX-Video 0.1, Qwen-Image 0.02): the shifted sigmas are then stretched
      so that the last one is ``shift_terminal``, 1 - sigma scaled by
      (1 - shift_terminal) / (1 - sigma_last);
    - N sigmas: a linspace from sigma_max = 1 to sigma_min (the shifted 1 / num_train_timesteps)
      that is shifted (again), or custom ``sigmas`` (as the Flux pipeline passes them,
      ``np.linspace(1, 1 / N, N)``) that are shifted; then a final 0 is appended;
    - the model timesteps are num_train_timesteps * sigma.
    """

    def __init__(self, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 mu: float | None = None, num_train_timesteps: int = 1000,
                 shift_terminal: float | None = None):
        shift = _real(shift, "shift")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        if not isinstance(use_dynamic_shifting, bool):
            raise TypeError(f"use_dynamic_shifting must be a bool, got {use_dynamic_shifting!r}")
        if use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu (Flux: mu = "
                             "calculate_shift(image_seq_len), from the image size)")
        if not use_dynamic_shifting and mu is not None:
            raise ValueError(f"mu={mu!r} is only used with use_dynamic_shifting=True; static "
                             "shifting is set by shift")
        n = num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {n!r}")
        if shift_terminal is not None:
            shift_terminal = _real(shift_terminal, "shift_terminal")
            if not 0 < shift_terminal < 1:
                raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal!r}")
        self.shift = shift
        self.use_dynamic_shifting = use_dynamic_shifting
        self.mu = None if mu is None else _real(mu, "mu")
        self.num_train_timesteps = n
        self.shift_terminal = shift_terminal

    def __repr__(self) -> str:
        how = (f"use_dynamic_shifting=True, mu={self.mu!r}" if self.use_dynamic_shifting
               else f"shift={self.shift!r}")
        if self.shift_terminal is not None:
            how += f", shift_terminal={self.shift_terminal!r}"
        return f"FlowSchedule({how}, num_train_timesteps={self.num_train_timesteps})"

    def shifted(self, s: torch.Tensor) -> torch.Tensor:
        """The schedule's map of unshifted sigmas in (0, 1] to the sigmas the model sees."""
        if self.use_dynamic_shifting:
            e = math.exp(self.mu)
            return e / (e + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, num_steps: int | None = None, sigmas=None) -> torch.Tensor:
        """float64 (N+1,) sigmas of the N model calls, descending, then the final 0.

        As ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, sigmas=sigmas)``:
        ``sigmas`` are N unshifted values, strictly decreasing in (0, 1], without the final 0.
        """
        if sigmas is None:
            n = num_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_steps must be an int >= 1, got {n!r}")
            # diffusers' sigma_min: 1 / num_train_timesteps, already shifted by a static shift
            sigma_min = 1 / self.num_train_timesteps
            if not self.use_dynamic_shifting:
                sigma_min = float(self.shifted(torch.tensor(sigma_min, dtype=torch.float64)))
            s = torch.linspace(1.0, sigma_min, n, dtype=torch.float64)
        else:
            s = _vector(sigmas, "sigmas")
            if num_steps is not None and num_steps != len(s):
                raise ValueError(f"num_steps={num_steps!r} but {len(s)} sigmas were given; "
                                 "pass one of them, or both equal")
            if len(s) == 0:
                raise ValueError("sigmas must not be empty")
            _check_decreasing_in_unit(s, "sigmas")
        s = self.shifted(s)
        if self.shift_terminal is not None:  # as FlowMatchEulerDiscreteScheduler stretches them
            one_minus = 1 - s
            if float(one_minus[-1]) == 0:
                raise ValueError(f"shift_terminal={self.shift_terminal} stretches the sigmas to "
                                 "end there, which a last sigma of 1 cannot: use 2 or more steps")
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return torch.cat([s, s.new_zeros(1)])

    def grid(self, sigmas) -> StateGrid:
        """The state grid of the given (N+1,) sigmas (strictly decreasing in (0, 1], then 0):
        alpha = 1, sigma = sigmas, timesteps = num_train_timesteps * sigmas[:-1] (float64)."""
        s = _vector(sigmas, "sigmas")
        if len(s) < 2:
            raise ValueError(f"sigmas must have at least 2 entries (one step), got {len(s)}")
        if float(s[-1]) != 0:
            raise ValueError(f"sigmas must end in 0 (the clean state), got last entry "
                             f"{float(s[-1])!r}")
        _check_decreasing_in_unit(s[:-1], "sigmas")
        return StateGrid(timesteps=self.num_train_timesteps * s[:-1], alpha=torch.ones_like(s),
                         sigma=s)
