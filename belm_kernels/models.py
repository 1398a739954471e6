"""Analytic diffusion models: exact noise / velocity prediction and exact ODE solutions, no weights.

For data from an isotropic Gaussian mixture, sum_k w_k N(mu_k, s_k^2 I), the noised marginal at
(alpha, sigma) is sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so the optimal noise
prediction eps*(x) = -sigma grad log p(x) is known in closed form. The probability-flow ODE in
xbar = x / alpha and sbar = sigma / alpha is d xbar / d sbar = eps*(x), which we integrate in
float64 with classical RK4 on a grid uniform in log(sbar + s_min) (the solution varies on the
scale s_min near the data and on the scale sbar far from it).

Rectified flow (DESIGN.md section 2b) noises as x_s = (1 - s) x_0 + s eps, i.e. (alpha, sigma) =
(1 - s, s), and its exact velocity is v*(x, s) = E[eps - x_0 | x] = (x - E[x_0 | x]) / s. Per
component k, with d = x - alpha mu_k and var_k = alpha^2 s_k^2 + sigma^2, the posterior means are
E[x_0 | x, k] = mu_k + alpha s_k^2 d / var_k and E[eps | x, k] = sigma d / var_k, so

    v*(x, s) = sum_k r_k(x) [ (sigma - alpha s_k^2) d / var_k - mu_k ]

with the responsibilities r_k: no division by s or by 1 - s, finite on all of [0, 1] (at s = 1,
where SD3/Flux grids start, it is x - E[x_0]). The flow ODE dx/ds = v* is integrated the same
way, with RK4 on a grid uniform in log(s + s_min).
"""

from __future__ import annotations

import math

import torch

from .schedule import Schedule


class GaussianMixture:
    """Isotropic Gaussian mixture data with exact eps*(x, t) and exact ODE solutions."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = self.means.shape[0]
        if self.means.dim() != 2 or self.stds.shape != (k,):
            raise ValueError(f"means must be (K, D) and stds (K,), got {tuple(self.means.shape)} "
                             f"and {tuple(self.stds.shape)}")
        if not bool((self.stds > 0).all()):
            raise ValueError("stds must be positive (a zero std makes eps* singular at sigma=0)")
        weights = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {k} positive numbers")
        self.log_weights = (weights / weights.sum()).log()

    @classmethod
    def random(cls, dim: int = 8, num_components: int = 4, std: float = 0.5,
               seed: int = 0) -> GaussianMixture:
        """Means spread like unit-variance data, every component with standard deviation ``std``."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=g, dtype=torch.float64)
        means /= means.norm(dim=1, keepdim=True) / math.sqrt(dim) * math.sqrt(1 + std**2)
        return cls(means, torch.full((num_components,), std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n float64 samples of the data distribution, shape (n, D)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def _components(self, x: torch.Tensor, alpha, sigma):
        """Per-component terms at noise level (alpha, sigma), float64: alpha and sigma (n or 1,
        1), the log-responsibilities up to a constant (n, K), d = x - alpha mu_k (n, K, D) and
        var_k (n or 1, K)."""
        dev = x.device
        xf = x.to(torch.float64).reshape(-1, self.dim)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=dev).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=dev).reshape(-1, 1)
        var = alpha**2 * self.stds.to(dev) ** 2 + sigma**2  # (n or 1, K)
        diff = xf[:, None, :] - alpha[:, :, None] * self.means.to(dev)  # (n, K, D)
        logp = (self.log_weights.to(dev) - 0.5 * self.dim * var.log()
                - 0.5 * diff.pow(2).sum(-1) / var)
        return alpha, sigma, logp, diff, var

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact eps*(x) at noise level (alpha, sigma), computed in float64, shape of x."""
        alpha, sigma, logp, diff, var = self._components(x, alpha, sigma)
        resp = logp.softmax(dim=1)
        eps = sigma * (resp[..., None] * diff / var[..., None]).sum(1)
        return eps.reshape(x.shape)

    def velocity(self, x: torch.Tensor, s) -> torch.Tensor:
        """Exact rectified-flow velocity v*(x, s) = E[noise - x_0 | x_s = x], float64, shape of
        x; ``s`` in [0, 1] is a float or one value per sample."""
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device)
        alpha, sigma, logp, diff, var = self._components(x, 1 - s, s)
        # Normalised by hand: softmax's parallel kernel costs milliseconds per call on a busy
        # CPU, and the flow ODE makes thousands of these small calls. (eps keeps softmax so the
        # published VP figures stay bit for bit.)
        w = (logp - logp.amax(dim=1, keepdim=True)).exp()
        resp = w / w.sum(dim=1, keepdim=True)
        scale = resp * (sigma - alpha * self.stds.to(x.device) ** 2) / var  # (n, K)
        v = (scale[..., None] * diff).sum(1) - resp @ self.means.to(x.device)
        return v.reshape(x.shape)

    def eps_fn(self, schedule: Schedule, dtype: torch.dtype | None = None):
        """eps_fn(x, t) for integer training timesteps t; returns x's dtype unless ``dtype``."""
        ac = schedule.alphas_cumprod

        def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
            a = float(ac[t])
            return self.eps(x, math.sqrt(a), math.sqrt(1 - a)).to(dtype or x.dtype)

        return eps_fn

    def v_fn(self, dtype: torch.dtype | None = None):
        """v_fn(x, sigma) for a flow sampler; returns x's dtype unless ``dtype``."""

        def v_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return self.velocity(x, sigma).to(dtype or x.dtype)

        return v_fn

    def ode_solution(self, x_T: torch.Tensor, alpha_T: float, sigma_T: float,
                     num_steps: int = 2000) -> torch.Tensor:
        """x_0 of the probability-flow ODE started at x_T with noise level (alpha_T, sigma_T).

        RK4 in float64; with the default 2000 steps it agrees with 4000 steps to about 1e-11.
        """
        s_min = float(self.stds.min())
        sbar_T = sigma_T / alpha_T
        v = torch.linspace(math.log(sbar_T + s_min), math.log(s_min), num_steps + 1,
                           dtype=torch.float64)

        # d xbar / d v = (sbar + s_min) * eps*(alpha xbar) with alpha = 1/sqrt(1+sbar^2)
        def f(vk, xb):
            sbar = math.exp(vk) - s_min
            alpha = 1 / math.sqrt(1 + sbar * sbar)
            return (sbar + s_min) * self.eps(alpha * xb, alpha, sbar * alpha)

        return _rk4(f, x_T.to(torch.float64) / alpha_T, v)

    def flow_ode_solution(self, x_s: torch.Tensor, sigma: float = 1.0,
                          num_steps: int = 2000) -> torch.Tensor:
        """x_0 of the rectified-flow ODE dx/ds = v*(x, s) started at x_s at noise level ``sigma``
        (1: pure noise, where SD3/Flux start). RK4 in float64 on a grid uniform in
        u = log(s + s_min); the default 2000 steps are accurate to about 4e-12 relative on the
        default model (Richardson estimate from 1000 and 2000 steps; tested < 1e-10).
        """
        if not 0 < sigma <= 1:
            raise ValueError(f"sigma must lie in (0, 1], got {sigma!r}")
        s_min = float(self.stds.min())
        u = torch.linspace(math.log(sigma + s_min), math.log(s_min), num_steps + 1,
                           dtype=torch.float64)

        def f(uk, x):  # dx/du = (s + s_min) v*(x, s) with s = e^u - s_min
            s = math.exp(uk) - s_min
            return (s + s_min) * self.velocity(x, s)

        return _rk4(f, x_s.to(torch.float64), u)


def _rk4(f, y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Classical RK4 for dy/du = f(u, y) over the points of ``grid`` (float64)."""
    for k in range(len(grid) - 1):
        u0, h = float(grid[k]), float(grid[k + 1] - grid[k])
        k1 = f(u0, y)
        k2 = f(u0 + h / 2, y + h / 2 * k1)
        k3 = f(u0 + h / 2, y + h / 2 * k2)
        k4 = f(u0 + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y
