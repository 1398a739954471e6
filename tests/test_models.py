import math

import pytest
import torch

import belm_kernels as bk

MODEL = bk.GaussianMixture.random(dim=6, num_components=3, seed=1)


def log_density(x, alpha, sigma):
    """log p_t(x) of the noised mixture, written out independently of the model code."""
    var = alpha**2 * MODEL.stds**2 + sigma**2
    d = MODEL.dim
    sq = ((x[:, None, :] - alpha * MODEL.means) ** 2).sum(-1)
    log_norm = 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(MODEL.log_weights - log_norm - 0.5 * sq / var, 1)


@pytest.mark.parametrize("alpha,sigma", [(0.999, 0.04), (0.7, 0.714), (0.07, 0.9975)])
def test_eps_is_minus_sigma_times_score(alpha, sigma):
    x = torch.randn(32, MODEL.dim, dtype=torch.float64, requires_grad=True)
    score, = torch.autograd.grad(log_density(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(MODEL.eps(x.detach(), alpha, sigma), -sigma * score,
                               rtol=1e-12, atol=1e-12)


def test_eps_fn_uses_the_schedule_and_dtype():
    sched = bk.Schedule.from_betas()
    x = torch.randn(4, MODEL.dim)
    a = float(sched.alphas_cumprod[500])
    expected = MODEL.eps(x, math.sqrt(a), math.sqrt(1 - a))
    got = MODEL.eps_fn(sched)(x, 500)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float())
    assert MODEL.eps_fn(sched, dtype=torch.float16)(x, 500).dtype == torch.float16


def test_sample_data_statistics():
    x = MODEL.sample_data(20000, torch.Generator().manual_seed(0))
    assert x.shape == (20000, MODEL.dim) and x.dtype == torch.float64
    mean = (MODEL.log_weights.exp()[:, None] * MODEL.means).sum(0)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.05)


def test_ode_solution_is_accurate_to_1e10():
    gen = torch.Generator().manual_seed(5)
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64, generator=gen)
    a, s = 0.07, math.sqrt(1 - 0.07**2)
    coarse, fine = MODEL.ode_solution(x_T, a, s), MODEL.ode_solution(x_T, a, s, num_steps=4000)
    assert float((coarse - fine).norm() / fine.norm()) < 1e-10


def test_samplers_converge_to_the_ode_solution():
    sched = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
    gen = torch.Generator().manual_seed(6)
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64, generator=gen)
    ac = float(sched.alphas_cumprod[999])
    exact = MODEL.ode_solution(x_T, math.sqrt(ac), math.sqrt(1 - ac))
    x0 = bk.get_sampler("obelm", sched, 500).sample(MODEL.eps_fn(sched), x_T)
    assert float((x0 - exact).norm() / exact.norm()) < 1e-4


def test_ode_solution_of_a_single_gaussian_is_known_in_closed_form():
    # Data N(0, s^2 I): xbar(sbar) = xbar_T * sqrt(s^2 + sbar^2) / sqrt(s^2 + sbar_T^2).
    s = 0.5
    gauss = bk.GaussianMixture(torch.zeros(1, 4), torch.tensor([s]))
    x_T = torch.randn(8, 4, dtype=torch.float64)
    a = 0.3
    sig = math.sqrt(1 - a * a)
    expected = x_T / a * s / math.sqrt(s * s + (sig / a) ** 2)
    torch.testing.assert_close(gauss.ode_solution(x_T, a, sig), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kwargs,match", [
    (dict(means=torch.zeros(2, 3), stds=torch.ones(3)), "means must be"),
    (dict(means=torch.zeros(2, 3), stds=torch.tensor([1.0, 0.0])), "stds must be positive"),
    (dict(means=torch.zeros(2, 3), stds=torch.ones(2), weights=[1.0, -1.0]), "weights must be"),
])
def test_bad_model_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bk.GaussianMixture(**kwargs)


# ------------------------------------------------------------------ rectified flow (section 2b)


@pytest.mark.parametrize("s", [0.02, 0.3, 0.7, 0.98])
def test_velocity_from_the_log_density(s):
    """v = E[eps - x0 | x] with Tweedie: eps* = -s score, x0* = (x + s^2 score) / (1 - s), so
    v = -(x + s score) / (1 - s) at (alpha, sigma) = (1 - s, s)."""
    x = torch.randn(32, MODEL.dim, dtype=torch.float64, requires_grad=True)
    score, = torch.autograd.grad(log_density(x, 1 - s, s).sum(), x)
    expected = -(x.detach() + s * score) / (1 - s)
    torch.testing.assert_close(MODEL.velocity(x.detach(), s), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("s", [1e-3, 0.5, 0.999])
def test_velocity_is_eps_minus_x0(s):
    x = torch.randn(32, MODEL.dim, dtype=torch.float64)
    eps = MODEL.eps(x, 1 - s, s)
    x0 = (x - s * eps) / (1 - s)
    torch.testing.assert_close(MODEL.velocity(x, s), eps - x0, rtol=0, atol=1e-12 / (1 - s))


def test_velocity_is_finite_at_the_ends():
    x = torch.randn(32, MODEL.dim, dtype=torch.float64)
    # s = 1 (pure noise, where SD3/Flux start): E[x0 | x] is the data mean.
    mean = (MODEL.log_weights.exp()[:, None] * MODEL.means).sum(0)
    torch.testing.assert_close(MODEL.velocity(x, 1.0), x - mean, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(MODEL.velocity(x, 1 - 1e-9), x - mean, rtol=0, atol=1e-7)
    # s = 0 (data): E[eps | x0] = 0, so v = -x.
    torch.testing.assert_close(MODEL.velocity(x, 0.0), -x, rtol=1e-15, atol=1e-15)


def test_velocity_per_sample_sigmas_and_v_fn():
    x = torch.randn(3, MODEL.dim, dtype=torch.float64)
    s = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    per_sample = MODEL.velocity(x, s)
    for k in range(3):
        torch.testing.assert_close(per_sample[k:k + 1], MODEL.velocity(x[k:k + 1], float(s[k])),
                                   rtol=0, atol=0)
    v_fn = MODEL.v_fn()
    assert v_fn(x.float(), 0.5).dtype == torch.float32
    assert MODEL.v_fn(dtype=torch.bfloat16)(x, 0.5).dtype == torch.bfloat16
    torch.testing.assert_close(v_fn(x, 0.5), MODEL.velocity(x, 0.5), rtol=0, atol=0)


def test_flow_ode_solution_is_converged():
    """RK4 is fourth order: halving the step divides the error by ~16, so with 500, 1000 and the
    default 2000 steps the error of the default is about |y_1000 - y_2000| / 15 (Richardson).
    It must be below 1e-10, six orders of magnitude under the smallest error the study reports."""
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(5))
    y500, y1000, y2000 = (MODEL.flow_ode_solution(x_T, num_steps=n) for n in (500, 1000, 2000))
    d1, d2 = float((y500 - y1000).norm()), float((y1000 - y2000).norm())
    assert 12 < d1 / d2 < 20  # the fourth order is visible, so the extrapolation holds
    assert d2 / 15 / float(y2000.norm()) < 1e-10


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_flow_ode_solution_of_a_single_gaussian_is_known_in_closed_form(sigma):
    # Data N(mu, c^2 I): x_s - (1 - s) mu scales with the marginal std sqrt((1-s)^2 c^2 + s^2).
    c = 0.5
    mu = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    gauss = bk.GaussianMixture(mu[None], torch.tensor([c]))
    x_s = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    std = math.sqrt((1 - sigma) ** 2 * c * c + sigma * sigma)
    expected = mu + (x_s - (1 - sigma) * mu) * c / std
    torch.testing.assert_close(gauss.flow_ode_solution(x_s, sigma, num_steps=500), expected,
                               rtol=1e-11, atol=1e-11)


def test_flow_samplers_converge_to_the_flow_ode_solution():
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(7))
    exact = MODEL.flow_ode_solution(x_T, num_steps=500)
    x0 = bk.get_sampler("obelm", bk.FlowSchedule(shift=3.0), 500).sample(MODEL.v_fn(), x_T)
    assert float((x0 - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("sigma", [0.0, 1.5, -0.1])
def test_flow_ode_solution_rejects_sigma_outside_unit_interval(sigma):
    with pytest.raises(ValueError, match=r"sigma must lie in \(0, 1\]"):
        MODEL.flow_ode_solution(torch.zeros(1, MODEL.dim), sigma)
