"""Per-step coefficients of the BELM-family samplers, in float64 (DESIGN.md section 2).

Index states in sampling order: state 0 is the noisiest, state N the clean one. Step j (0 <= j < N)
goes from state j to state j+1 with one model call eps_j = eps(x_j, t_j), and every two-step
method has the form

    x_{j+1} = a_j x_{j-1} + b_j x_j + c_j eps_j

A DDIM step is the row (0, alpha_{j+1}/alpha_j, sigma_{j+1} - alpha_{j+1} sigma_j / alpha_j): it
does not look at x_{j-1}. The paper's index i is N - j; its h_i is our
h_j = sbar_j - sbar_{j+1} > 0.
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


def ddim_inverse_op_rows(grid: StateGrid) -> torch.Tensor:
    """(N, 3) rows (r_j, 0, d_j): the same DDIM inversion x_j ~= (x_{j+1} - d_j eps) / r_j as an
    inverse update (``lincomb3_inverse_``) of a buffer holding a copy of x_{j+1}, so that the first
    step of an exact inversion is the same op as every later one."""
    _, r, d = ddim(grid).unbind(1)
    return torch.stack([r, torch.zeros_like(r), d], dim=1)


def bdia(grid: StateGrid, gamma: float) -> torch.Tensor:
    """(N, 3) BDIA rows; row 0 is a DDIM step (there is no x_{-1})."""
    a, s = grid.alpha, grid.sigma
    rows = ddim(grid)
    # row j (j >= 1) uses states j-1, j, j+1: slices [:-2], [1:-1], [2:]
    am, a0, ap = a[:-2], a[1:-1], a[2:]
    sm, s0, sp = s[:-2], s[1:-1], s[2:]
    rows[1:, 0] = gamma
    rows[1:, 1] = ap / a0 - gamma * am / a0
    rows[1:, 2] = sp - ap * s0 / a0 - gamma * (sm - am * s0 / a0)
    return rows


def obelm(grid: StateGrid) -> torch.Tensor:
    """(N, 3) O-BELM rows (paper Eq. 18); row 0 is a DDIM step."""
    a, sbar = grid.alpha, grid.sbar
    h = sbar[:-1] - sbar[1:]  # h[j] = sbar_j - sbar_{j+1}
    rows = ddim(grid)
    hj, hp = h[1:], h[:-1]  # row j (j >= 1) uses h_j and h_{j-1}
    rows[1:, 0] = hj**2 / hp**2 * a[2:] / a[:-2]
    rows[1:, 1] = (hp**2 - hj**2) / hp**2 * a[2:] / a[1:-1]
    rows[1:, 2] = -hj * (hj + hp) / hp * a[2:]
    return rows
