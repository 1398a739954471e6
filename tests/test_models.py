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
    return torch.logsumexp(MODEL.log_weights - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * sq / var, 1)


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
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a, s = 0.07, math.sqrt(1 - 0.07**2)
    coarse, fine = MODEL.ode_solution(x_T, a, s), MODEL.ode_solution(x_T, a, s, num_steps=4000)
    assert float((coarse - fine).norm() / fine.norm()) < 1e-10


def test_samplers_converge_to_the_ode_solution():
    sched = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
    x_T = torch.randn(16, MODEL.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
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
