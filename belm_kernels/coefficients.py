"""Per-step coefficients of the BELM-family samplers, in float64 (DESIGN.md section 2).

Index states in sampling order: state 0 is the noisiest, state N the clean one. Step j (0 <= j < N)
goes from state j to state j+1 with one model call eps_j = eps(x_j, t_j), and every two-step
method has the form

    x_{j+1} = a_j x_{j-1} + b_j x_j + c_j eps_j

A DDIM step is the row (0, alpha_{j+1}/alpha_j, sigma_{j+1} - alpha_{j+1} sigma_j / alpha_j): it does
not look at x_{j-1}. The paper's index i is N - j; its h_i is our h_j = sbar_j - sbar_{j+1} > 0.
"""

from __future__ import annotations

import torch

from .schedule import StateGrid


def ddim(grid: StateGrid) -> torch.Tensor:
    """(N, 3) rows (0, r_j, d_j): x_{j+1} = r_j x_j + d_j eps_j."""
    a, s = grid.alpha, grid.sigma
    r = a[1:] / a[:-1]
    d = s[1:] - r * s[:-1]
    return torch.stack([torch.zeros_like(r), r, d], dim=1)


def ddim_inverse(grid: StateGrid) -> torch.Tensor:
    """(N, 3) rows (0, 1/r_j, -d_j/r_j): DDIM inversion x_j ~= (x_{j+1} - d_j eps) / r_j.

    Written as a forward update (zero leading coefficient) so it fits the same two-buffer loop;
    eps is evaluated at the less noisy state x_{j+1}, which is why DDIM inversion is not exact.
    """
    _, r, d = ddim(grid).unbind(1)
    return torch.stack([torch.zeros_like(r), 1 / r, -d / r], dim=1)


def bdia(grid: StateGrid, gamma: float) -> torch.Tensor:
    """(N, 3) BDIA rows; row 0 is a DDIM step (there is no x_{-1})."""
    a, s = grid.alpha, grid.sigma
    rows = ddim(grid)
    for j in range(1, grid.num_steps):
        rows[j, 0] = gamma
        rows[j, 1] = a[j + 1] / a[j] - gamma * a[j - 1] / a[j]
        rows[j, 2] = (s[j + 1] - a[j + 1] * s[j] / a[j]
                      - gamma * (s[j - 1] - a[j - 1] * s[j] / a[j]))
    return rows


def obelm(grid: StateGrid) -> torch.Tensor:
    """(N, 3) O-BELM rows (paper Eq. 18); row 0 is a DDIM step."""
    a, sbar = grid.alpha, grid.sbar
    h = sbar[:-1] - sbar[1:]  # h[j] = sbar_j - sbar_{j+1}
    rows = ddim(grid)
    for j in range(1, grid.num_steps):
        hj, hp = h[j], h[j - 1]
        rows[j, 0] = hj**2 / hp**2 * a[j + 1] / a[j - 1]
        rows[j, 1] = (hp**2 - hj**2) / hp**2 * a[j + 1] / a[j]
        rows[j, 2] = -hj * (hj + hp) / hp * a[j + 1]
    return rows
