"""The coefficient tables reproduce exactly the polynomials their order promises.

In xbar = x / alpha, sbar = sigma / alpha coordinates the ODE is d xbar / d sbar = eps, so a method
of order p integrates xbar(s) = s^k exactly for k <= p when eps is the exact derivative at the
evaluated state. Any wrong coefficient breaks one of these identities.
"""

import numpy as np
import pytest
import torch

from belm_kernels import FlowSchedule, Schedule, calculate_shift, coefficients


@pytest.fixture(params=["linspace", "trailing", "flow-sd3", "flow-flux"])
def grid(request):
    """VP grids, and flow grids (alpha = 1, sigma = sbar = s: DESIGN.md section 2b), on which the
    same identities check the flow's Euler / O-BELM / BDIA rows."""
    if request.param == "flow-sd3":
        fs = FlowSchedule(shift=3.0)
        return fs.grid(fs.sigmas(12))
    if request.param == "flow-flux":
        fs = FlowSchedule(use_dynamic_shifting=True, mu=calculate_shift(4096))
        return fs.grid(fs.sigmas(sigmas=np.linspace(1, 1 / 12, 12)))
    sched = Schedule.from_betas(0.00085, 0.012, "scaled_linear")
    return sched.grid(sched.timesteps(12, request.param))


def _residuals(grid, rows, degree):
    """Per step j >= 1: x_{j+1} - (a x_{j-1} + b x_j + c eps_j) for xbar = (sbar - s_j)^degree."""
    a, s = grid.alpha, grid.sbar
    out = []
    for j in range(1, grid.num_steps):
        xbar = (s - s[j]) ** degree
        eps = 1.0 if degree == 1 else 0.0  # d xbar / d sbar at sbar = s_j
        x = a * xbar  # back to x = alpha * xbar
        pred = rows[j, 0] * x[j - 1] + rows[j, 1] * x[j] + rows[j, 2] * eps
        out.append(float(x[j + 1] - pred))
    return torch.tensor(out)


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_obelm_is_exact_up_to_quadratics(grid, degree):
    res = _residuals(grid, coefficients.obelm(grid), degree)
    assert res.abs().max() < 1e-12


@pytest.mark.parametrize("rows_of", [coefficients.ddim, lambda g: coefficients.bdia(g, 0.5)])
def test_first_order_methods_exact_up_to_linear_only(grid, rows_of):
    rows = rows_of(grid)
    for degree in (0, 1):
        assert _residuals(grid, rows, degree).abs().max() < 1e-12
    assert _residuals(grid, rows, 2).abs().max() > 1e-6


def test_first_row_is_ddim(grid):
    for rows in (coefficients.obelm(grid), coefficients.bdia(grid, 0.5)):
        torch.testing.assert_close(rows[0], coefficients.ddim(grid)[0], rtol=0, atol=0)


def test_ddim_step_matches_closed_form(grid):
    # x_{j+1} = alpha_{j+1} * x0_pred + sigma_{j+1} * eps,
    # x0_pred = (x_j - sigma_j eps) / alpha_j
    a, s = grid.alpha, grid.sigma
    x, eps = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.1, dtype=torch.float64)
    for j, (_, r, d) in enumerate(coefficients.ddim(grid)):
        expected = a[j + 1] * (x - s[j] * eps) / a[j] + s[j + 1] * eps
        torch.testing.assert_close(r * x + d * eps, expected, rtol=1e-14, atol=1e-14)


def test_ddim_inverse_undoes_ddim_with_same_eps(grid):
    x, eps = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    rows = zip(coefficients.ddim(grid), coefficients.ddim_inverse(grid), strict=True)
    for (_, r, d), (_, ri, di) in rows:
        torch.testing.assert_close(ri * (r * x + d * eps) + di * eps, x, rtol=1e-14, atol=1e-14)


def test_bdia_gamma_zero_is_ddim(grid):
    torch.testing.assert_close(coefficients.bdia(grid, 0.0), coefficients.ddim(grid),
                               rtol=1e-15, atol=1e-15)
