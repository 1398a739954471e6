"""Noise schedules, timestep spacing and the state grid the samplers walk.

Conventions follow diffusers, so that the same configuration gives bit-identical alphas_cumprod
and the same integer timesteps as its schedulers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
                   beta_schedule: str = "linear", num_train_timesteps: int = 1000) -> "Schedule":
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
