"""The k-diffusion-style O-BELM sampler against the core sampler, an independent reference, the
exact ODE solution of the analytic model, and k-diffusion's calling conventions."""

import inspect
import math

import pytest
import torch

import belm_kernels as bk
from belm_kernels.k_diffusion import invert_obelm, obelm_rows, sample_obelm

GM = bk.GaussianMixture.random(dim=8, num_components=4, std=0.5, seed=0)
SCHED = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


def ve_denoiser(gm=GM, calls=None):
    """k-diffusion denoiser of the analytic model: x is VE (x0 + sigma noise), sigma has shape (B,).

    The VP state is x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma alpha, and
    eps is the same in both parametrisations, so denoised = x - sigma eps*(x_vp, alpha, sigma_vp).
    """

    def model(x, sigma, **kwargs):
        if calls is not None:
            calls.append((x.clone(), sigma.clone(), kwargs))
        s = sigma.to(torch.float64)
        a = 1 / torch.sqrt(1 + s * s)
        eps = gm.eps(x * a.reshape(-1, 1), a, s * a)
        return (x.to(torch.float64) - s.reshape(-1, 1) * eps).to(x.dtype)

    return model


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0, dtype=torch.float64):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, rel):
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1.0)


# --------------------------------------------------------------------------------------------
# Agreement with the core sampler (same O-BELM, VP form) on its own grid.


@pytest.mark.parametrize("num_steps", [2, 10, 30])
def test_matches_core_sampler(num_steps):
    s = bk.get_sampler("obelm", SCHED, num_steps)
    sigmas = s.grid.sbar  # VE noise levels, ending in 0
    x_T = randn(16, 8, seed=num_steps)
    ref = s.sample(GM.eps_fn(SCHED), x_T)
    out = sample_obelm(ve_denoiser(), x_T / s.grid.alpha[0], sigmas)
    assert close(out, ref, 1e-12), (out - ref).abs().max()


def test_matches_core_sampler_from_pair():
    s = bk.get_sampler("obelm", SCHED, 20)
    a, sigmas, eps_fn = s.grid.alpha, s.grid.sbar, GM.eps_fn(SCHED)
    x_T, x_T2 = s.invert(eps_fn, GM.sample_data(16, torch.Generator().manual_seed(1)))
    ref = s.sample(eps_fn, x_T, x_T2)
    out = sample_obelm(ve_denoiser(), x_T / a[0], sigmas, x_next=x_T2 / a[1])
    assert close(out, ref, 1e-12), (out - ref).abs().max()


# --------------------------------------------------------------------------------------------
# An independent reference: paper Eq. 18 / 19 with alpha = 1, written out in eps form.


def reference(model, x, sigmas, invert):
    s = [float(v) for v in sigmas]
    n = len(s) - 1

    def eps(x, sig):
        return (x - model(x, torch.full((x.shape[0],), sig, dtype=x.dtype))) / sig

    def rows(j):  # x_{j+1} = A x_{j-1} + B x_j + C eps_j
        h, hp = s[j] - s[j + 1], s[j - 1] - s[j]
        return h * h / (hp * hp), (hp * hp - h * h) / (hp * hp), -h * (h + hp) / hp

    if not invert:
        xs = {0: x, 1: x + (s[1] - s[0]) * eps(x, s[0])}  # Euler first step
        for j in range(1, n):
            A, B, C = rows(j)
            xs[j + 1] = A * xs[j - 1] + B * xs[j] + C * eps(xs[j], s[j])
        return xs[n]
    xs = {n: x, n - 1: x + s[n - 1] * eps(x, s[n - 1])}  # DDIM inversion, eps at the clean state
    for j in range(n - 1, 0, -1):
        A, B, C = rows(j)
        xs[j - 1] = (xs[j + 1] - B * xs[j] - C * eps(xs[j], s[j])) / A
    return xs[0], xs[1]


@pytest.mark.parametrize("sigmas", [karras(12), torch.linspace(8, 0, 9, dtype=torch.float64)],
                         ids=["karras", "uniform"])
def test_matches_reference(sigmas):
    model = ve_denoiser()
    x = randn(6, 8, seed=2) * float(sigmas[0])
    assert close(sample_obelm(model, x, sigmas), reference(model, x, sigmas, False), 1e-12)
    x0 = GM.sample_data(6, torch.Generator().manual_seed(3))
    pair, ref = invert_obelm(model, x0, sigmas), reference(model, x0, sigmas, True)
    for got, want in zip(pair, ref, strict=True):
        assert close(got, want, 1e-10), (got - want).abs().max()


def test_second_order_against_exact_ode():
    gm = bk.GaussianMixture.random(dim=4, num_components=3, std=0.5, seed=1)
    model, smax = ve_denoiser(gm), 5.0
    x = randn(8, 4, seed=0) * smax
    a = 1 / math.sqrt(1 + smax**2)
    exact = gm.ode_solution(x * a, a, smax * a, num_steps=500)
    errs = [(sample_obelm(model, x, torch.linspace(smax, 0, n + 1, dtype=torch.float64))
             - exact).abs().max().item() for n in (32, 64, 128)]
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5, errs  # order 2: ratio ~4


def test_one_step_is_euler():
    model, sigmas = ve_denoiser(), torch.tensor([3.0, 0.0], dtype=torch.float64)
    x = randn(4, 8) * 3
    out = sample_obelm(model, x, sigmas)
    assert torch.allclose(out, model(x, torch.full((4,), 3.0, dtype=torch.float64)),
                          rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Exact round trip invert -> sample.


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("sigmas", [karras(20), bk.get_sampler("obelm", SCHED, 20).grid.sbar],
                         ids=["karras", "core-grid"])
def test_round_trip_float64(sigmas, backend):
    model = ve_denoiser()
    x0 = GM.sample_data(32, torch.Generator().manual_seed(4))
    x, x_next = invert_obelm(model, x0, sigmas, backend=backend)
    assert x.shape == x_next.shape == x0.shape and x.dtype == x_next.dtype == torch.float64
    rec = sample_obelm(model, x, sigmas, x_next=x_next, backend=backend)
    assert close(rec, x0, 1e-12), (rec - x0).abs().max()
    # Without the pair the first step is first order: far from x0.
    assert (sample_obelm(model, x, sigmas) - x0).abs().max() > 1e-4


@pytest.mark.parametrize("sigmas", [karras(20), bk.get_sampler("obelm", SCHED, 20).grid.sbar],
                         ids=["karras", "core-grid"])
def test_round_trip_float32(sigmas):
    model = ve_denoiser()
    x0 = GM.sample_data(32, torch.Generator().manual_seed(5)).float()
    sig32 = sigmas.float()  # k-diffusion and ComfyUI pass float32 sigmas
    x, x_next = invert_obelm(model, x0, sig32)
    assert x.dtype == torch.float32
    rec = sample_obelm(model, x, sig32, x_next=x_next)
    rel = ((rec - x0).abs().max() / x0.abs().max()).item()
    assert rel < 2e-5, rel


def test_fp16_model_output_next_to_fp32_state():
    base = ve_denoiser()

    def model(x, sigma):
        return base(x, sigma).half()

    sigmas = karras(8, dtype=torch.float32)
    x0 = GM.sample_data(8, torch.Generator().manual_seed(6)).float()
    x, x_next = invert_obelm(model, x0, sigmas)
    rec = sample_obelm(model, x, sigmas, x_next=x_next)
    assert rec.dtype == torch.float32
    assert ((rec - x0).abs().max() / x0.abs().max()).item() < 2e-5


# --------------------------------------------------------------------------------------------
# k-diffusion / ComfyUI conventions.


def test_signature_is_k_diffusion_style():
    params = list(inspect.signature(sample_obelm).parameters.values())
    assert [p.name for p in params[:6]] == ["model", "x", "sigmas", "extra_args", "callback",
                                            "disable"]
    assert all(p.default is None for p in params[3:6])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[6:])


def test_model_calls_sigma_and_extra_args():
    calls = []
    model = ve_denoiser(calls=calls)
    sigmas = karras(5, dtype=torch.float32)
    x = randn(3, 8, dtype=torch.float32) * float(sigmas[0])
    x_in = x.clone()
    # ComfyUI's KSAMPLER calls it like this.
    sample_obelm(model, x, sigmas, extra_args={"cond": "c", "seed": 7}, callback=None,
                 disable=True)
    assert torch.equal(x, x_in), "x must not be modified"
    assert len(calls) == 5
    assert torch.equal(calls[0][0], x_in)
    for i, (_, sigma, kwargs) in enumerate(calls):
        assert sigma.shape == (3,) and sigma.dtype == torch.float32
        assert torch.equal(sigma, sigmas[i].expand(3)), "model is called at sigmas[i], never 0"
        assert kwargs == {"cond": "c", "seed": 7}

    calls.clear()
    x0 = x_in / float(sigmas[0])
    x0_in = x0.clone()
    pair = invert_obelm(model, x0, sigmas, extra_args={"cond": "c"})
    assert torch.equal(x0, x0_in)
    assert [float(c[1][0]) for c in calls] == [float(sigmas[j]) for j in (4, 4, 3, 2, 1)]
    assert all(c[2] == {"cond": "c"} for c in calls)
    calls.clear()
    sample_obelm(model, *pair[:1], sigmas, x_next=pair[1], extra_args={"cond": "c"})
    assert [float(c[1][0]) for c in calls] == [float(sigmas[j]) for j in (1, 2, 3, 4)]


def test_sigmas_as_list():
    model, x = ve_denoiser(), randn(2, 8) * 4
    ref = sample_obelm(model, x, torch.tensor([4.0, 2.0, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(sample_obelm(model, x, [4.0, 2.0, 0.5, 0.0]), ref)


def test_callback_once_per_step():
    model, sigmas = ve_denoiser(), karras(6)
    x = randn(2, 8) * float(sigmas[0])
    seen = []

    def callback(d):
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert torch.equal(d["sigma"], sigmas[d["i"]]) and torch.equal(d["sigma_hat"], d["sigma"])
        want = model(d["x"], d["sigma"].expand(2))
        assert torch.equal(d["denoised"], want)
        seen.append(d["i"])

    out = sample_obelm(model, x, sigmas, callback=callback)
    assert seen == list(range(6))
    seen.clear()
    pair = invert_obelm(model, out, sigmas, callback=lambda d: seen.append(
        (d["i"], float(d["sigma"]), set(d))))
    keys = {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert seen == [(k, float(sigmas[j]), keys) for k, j in enumerate((5, 5, 4, 3, 2, 1))]
    seen.clear()
    sample_obelm(model, pair[0], sigmas, x_next=pair[1], callback=callback)
    assert seen == list(range(1, 6))  # the pair skips step 0


def test_progress_bar(capsys):
    model, sigmas = ve_denoiser(), karras(3)
    x = randn(2, 8) * float(sigmas[0])
    sample_obelm(model, x, sigmas, disable=True)
    invert_obelm(model, x, sigmas, disable=True)
    assert capsys.readouterr().err == ""
    sample_obelm(model, x, sigmas, disable=False)
    assert "3/3" in capsys.readouterr().err
    invert_obelm(model, x, sigmas, disable=False)
    assert "3/3" in capsys.readouterr().err


def test_rows_are_core_obelm_in_denoised_form():
    sigmas = karras(7)
    grid = bk.schedule.StateGrid(timesteps=sigmas[:-1], alpha=torch.ones_like(sigmas),
                                 sigma=sigmas)
    a, b, c = bk.coefficients.obelm(grid).unbind(1)
    rows = obelm_rows(sigmas)
    s = sigmas[:-1]
    torch.testing.assert_close(rows, torch.stack([a, b + c / s, -c / s], 1), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("sigmas, match", [
    (torch.tensor([[2.0, 1.0, 0.0]]), "sigmas must be 1-D"),
    (torch.tensor([2.0, 3.0, 0.0]), "strictly decreasing"),
    (torch.tensor([2.0, 2.0, 0.0]), "strictly decreasing"),
    (torch.tensor([2.0, 1.0, 0.1]), "must end in exactly 0"),
    (torch.tensor([2.0, float("nan"), 0.0]), "must be finite"),
    (torch.tensor([0.0]), r"at least 2 entries \(1 step\), got 1"),
    (torch.tensor([True, False]), "real noise levels"),
    ("abc", "sigmas must be a 1-D tensor"),
])
def test_bad_sigmas(sigmas, match):
    x = randn(2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        sample_obelm(ve_denoiser(), x, sigmas)


def test_too_few_steps_for_pair_and_inversion():
    model, x, sigmas = ve_denoiser(), randn(2, 8), torch.tensor([2.0, 0.0])
    with pytest.raises(ValueError, match=r"at least 3 entries \(2 steps\) for an inversion"):
        invert_obelm(model, x, sigmas)
    with pytest.raises(ValueError, match=r"at least 3 entries \(2 steps\) when x_next is given"):
        sample_obelm(model, x, sigmas, x_next=x.clone())


def test_bad_states():
    model, sigmas = ve_denoiser(), karras(4)
    x = randn(2, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sample_obelm(model, x.tolist(), sigmas)
    with pytest.raises(TypeError, match="x must have a float dtype"):
        sample_obelm(model, x.long(), sigmas)
    with pytest.raises(TypeError, match="x0 must have a float dtype"):
        invert_obelm(model, x.long(), sigmas)
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        sample_obelm(model, torch.tensor(1.0), sigmas)
    with pytest.raises(TypeError, match="x_next must be a torch.Tensor or None"):
        sample_obelm(model, x, sigmas, x_next=x.tolist())
    with pytest.raises(ValueError, match=r"x_next must have x's shape torch.Size\(\[2, 8\]\)"):
        sample_obelm(model, x, sigmas, x_next=randn(3, 8))
    with pytest.raises(ValueError, match="x_next must have x's dtype torch.float64"):
        sample_obelm(model, x, sigmas, x_next=x.float())
    with pytest.raises(ValueError, match="x_next must have x's device cpu"):
        sample_obelm(model, x, sigmas, x_next=torch.empty(2, 8, dtype=torch.float64,
                                                          device="meta"))


def test_bad_model_output():
    sigmas, x = karras(4), randn(2, 8)
    with pytest.raises(ValueError, match=r"model must return a tensor of x's shape \(2, 8\)"):
        sample_obelm(lambda x, s: x[:1], x, sigmas)
    with pytest.raises(ValueError, match=r"model must return a tensor of x's shape \(2, 8\)"):
        invert_obelm(lambda x, s: x.reshape(16), x, sigmas)
    with pytest.raises(TypeError, match="model must return a float tensor"):
        sample_obelm(lambda x, s: None, x, sigmas)
    with pytest.raises(TypeError, match="model must return a float tensor"):
        sample_obelm(lambda x, s: x.long(), x, sigmas)


def test_bad_backend():
    sigmas, x = karras(4), randn(2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        sample_obelm(ve_denoiser(), x, sigmas, backend="nope")
