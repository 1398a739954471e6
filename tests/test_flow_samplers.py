"""Flow-matching samplers (DESIGN.md section 2b) against independent float64 implementations."""

import numpy as np
import pytest
import torch

import belm_kernels as bk
from belm_kernels.accuracy import roundtrip_bound
from belm_kernels.samplers import DDIMSampler, EulerSampler

MODEL = bk.GaussianMixture.random(dim=8, num_components=4, seed=0)
V64 = MODEL.v_fn()
SD3 = bk.FlowSchedule(shift=3.0)
FLUX_MU = bk.calculate_shift(4096)  # a 1024x1024 Flux image
FLUX = bk.FlowSchedule(shift=3.0, use_dynamic_shifting=True, mu=FLUX_MU)


def flux_sigmas(n):
    return np.linspace(1.0, 1 / n, n)  # what the Flux pipeline passes to set_timesteps


def data(n=16, dtype=torch.float64):
    return MODEL.sample_data(n, torch.Generator().manual_seed(3)).to(dtype)


def noise(n=16, dtype=torch.float64):
    return torch.randn(n, MODEL.dim, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64).to(dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.times = fn, 0, []

    def __call__(self, x, sigma):
        self.calls += 1
        self.times.append(sigma)
        return self.fn(x, sigma)


# ------------------------------------------------------------------ section 2b, written out


def paper_states(sigmas):
    """Paper indexing: state i = N .. 0 at s_i, h_i = s_i - s_{i-1} > 0."""
    sig = [float(v) for v in sigmas]
    n = len(sig) - 1
    s = {n - j: sig[j] for j in range(n + 1)}
    h = {i: s[i] - s[i - 1] for i in range(1, n + 1)}
    return n, s, h


def obelm_reference(v, x_N, sigmas, x_N1=None):
    """x_{i-1} = a x_{i+1} + (1 - a) x_i + c v(x_i, s_i), a = h_i^2 / h_{i+1}^2,
    c = -h_i (h_i + h_{i+1}) / h_{i+1}; first step (no x_{i+1}) Euler: x_{i-1} = x_i - h_i v."""
    n, s, h = paper_states(sigmas)
    x = {n: x_N, n - 1: x_N1 if x_N1 is not None else x_N - h[n] * v(x_N, s[n])}
    for i in range(n - 1, 0, -1):
        a = h[i] ** 2 / h[i + 1] ** 2
        c = -h[i] * (h[i] + h[i + 1]) / h[i + 1]
        x[i - 1] = a * x[i + 1] + (1 - a) * x[i] + c * v(x[i], s[i])
    return x[0]


def obelm_inverse_reference(v, x0, sigmas):
    """One Euler inversion step x_1 = x_0 + h_1 v(x_0, s_1), then
    x_{i+1} = (x_{i-1} - (1 - a) x_i - c v(x_i, s_i)) / a with the same a, c and v(x_i, s_i)."""
    n, s, h = paper_states(sigmas)
    x = {0: x0, 1: x0 + h[1] * v(x0, s[1])}
    for i in range(1, n):
        a = h[i] ** 2 / h[i + 1] ** 2
        c = -h[i] * (h[i] + h[i + 1]) / h[i + 1]
        x[i + 1] = (x[i - 1] - (1 - a) * x[i] - c * v(x[i], s[i])) / a
    return x[n], x[n - 1]


@pytest.mark.parametrize("fs,n,custom", [(SD3, 10, None), (SD3, 28, None), (SD3, 2, None),
                                         (FLUX, 28, flux_sigmas(28)), (FLUX, 7, flux_sigmas(7))])
def test_obelm_matches_section_2b(fs, n, custom):
    s = bk.get_sampler("obelm", fs, n, sigmas=custom)
    x_T, x0 = noise(), data()
    torch.testing.assert_close(s.sample(V64, x_T), obelm_reference(V64, x_T, s.sigmas),
                               rtol=1e-12, atol=1e-12)
    pair = s.invert(V64, x0)
    ref_pair = obelm_inverse_reference(V64, x0, s.sigmas)
    for got, ref in zip(pair, ref_pair, strict=True):
        assert rel(got, ref) < 1e-12
    torch.testing.assert_close(s.sample(V64, *pair),
                               obelm_reference(V64, pair[0], s.sigmas, pair[1]),
                               rtol=1e-12, atol=1e-12)


def test_equal_steps_give_the_leapfrog():
    """On a uniform grid O-BELM is x_{i-1} = x_{i+1} - 2 h v_i (DESIGN.md section 2b)."""
    s = bk.get_sampler("obelm", bk.FlowSchedule(), sigmas=[1.0, 0.75, 0.5, 0.25])
    rows = s.rows()
    torch.testing.assert_close(rows[1:], torch.tensor([[1.0, 0.0, -0.5]] * 3, dtype=torch.float64),
                               rtol=1e-15, atol=1e-15)


def test_flow_rows_are_section_2b_coefficients():
    """The reused coefficient functions on the flow grid give the rows of section 2b exactly."""
    s = bk.get_sampler("obelm", FLUX, sigmas=flux_sigmas(12))
    sig = s.sigmas
    h = sig[:-1] - sig[1:]  # sampling order: h[j] = s_j - s_{j+1}
    a = h[1:] ** 2 / h[:-1] ** 2
    expected = torch.stack([a, 1 - a, -h[1:] * (h[1:] + h[:-1]) / h[:-1]], dim=1)
    torch.testing.assert_close(s.rows()[1:], expected, rtol=1e-14, atol=1e-15)
    euler = torch.stack([torch.zeros_like(h), torch.ones_like(h), -h], dim=1)
    torch.testing.assert_close(s.rows()[0], euler[0], rtol=0, atol=0)
    torch.testing.assert_close(bk.get_sampler("euler", FLUX, sigmas=flux_sigmas(12)).rows(),
                               euler, rtol=0, atol=0)
    gamma = 0.5
    bdia = bk.get_sampler("bdia", FLUX, sigmas=flux_sigmas(12), gamma=gamma).rows()
    # BDIA: x_{j+1} = gamma x_{j-1} + (1 - gamma) x_j + (-h_j - gamma h_{j-1}) v_j
    torch.testing.assert_close(bdia[1:], torch.stack(
        [torch.full_like(a, gamma), torch.full_like(a, 1 - gamma), -h[1:] - gamma * h[:-1]], 1),
        rtol=1e-14, atol=1e-15)


def test_euler_matches_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(12)
    x = noise(dtype=torch.float32)
    expected = x.clone()
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(V64(expected, float(ref.sigmas[i])), t, expected).prev_sample
    got = bk.get_sampler("euler", SD3, 12).sample(V64, x)
    # diffusers steps in float32 with float32 sigmas; ours are float64 sigmas, float32 states.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 6])
def test_edict_matches_its_four_lines(n):
    p = 0.93
    s = bk.get_sampler("edict", SD3, n, p=p)
    x, y = noise(), noise() * 0.9
    x_T, y_T = x.clone(), y.clone()
    sig = s.sigmas.tolist()
    for j in range(n):
        d = sig[j + 1] - sig[j]  # the Euler step x + (s_{j+1} - s_j) v
        x = x + d * V64(y, sig[j])
        y = y + d * V64(x, sig[j])
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    torch.testing.assert_close(s.sample(V64, x_T, y_T), x, rtol=1e-13, atol=1e-13)


def test_model_receives_float_sigmas():
    s = bk.get_sampler("obelm", SD3, 5)
    c = Counter(V64)
    s.sample(c, noise())
    assert c.times == s.sigmas[:-1].tolist() == s.model_times
    assert all(type(t) is float for t in c.times)
    assert s.timesteps.dtype == torch.float64
    torch.testing.assert_close(s.timesteps, 1000 * s.sigmas[:-1], rtol=0, atol=0)
    assert s.is_flow and "FlowSchedule(shift=3.0" in repr(s)


# ------------------------------------------------------------------ round trip and call counts


@pytest.mark.parametrize("method", ["obelm", "bdia"])
@pytest.mark.parametrize("fs,n,custom", [(SD3, 2, None), (SD3, 10, None), (SD3, 28, None),
                                         (FLUX, 28, flux_sigmas(28))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_round_trip_within_the_error_model(method, fs, n, custom, dtype):
    s = bk.get_sampler(method, fs, n, sigmas=custom)
    x0 = data(dtype=dtype)
    rebuilt = s.sample(V64, *s.invert(V64, x0))
    assert rel(rebuilt, x0) <= roundtrip_bound(s, dtype)


@pytest.mark.parametrize("n", [1, 10])
def test_edict_round_trip_float64(n):
    # EDICT's inversion divides by p twice per step: growth at most (1/p)^(2N), ~4 roundings a line.
    s = bk.get_sampler("edict", SD3, n)
    x0 = data()
    rebuilt = s.sample(V64, *s.invert(V64, x0))
    assert rel(rebuilt, x0) <= 4 * 4 * n * torch.finfo(torch.float64).eps / 0.93 ** (2 * n)


def test_euler_round_trip_is_not_exact():
    s = bk.get_sampler("euler", SD3, 20)
    x0 = data()
    assert rel(s.sample(V64, *s.invert(V64, x0)), x0) > 1e-3


@pytest.mark.parametrize("method,sample_calls,pair_calls,invert_calls", [
    ("euler", 10, 9, 10), ("bdia", 10, 9, 10), ("obelm", 10, 9, 10), ("edict", 20, 20, 20)])
def test_model_calls(method, sample_calls, pair_calls, invert_calls):
    s = bk.get_sampler(method, SD3, 10)
    c = Counter(V64)
    s.sample(c, noise())
    assert c.calls == sample_calls
    c.calls = 0
    pair = s.invert(c, data())
    assert c.calls == invert_calls
    c.calls = 0
    s.sample(c, *pair)
    assert c.calls == pair_calls


def test_euler_takes_a_single_step():
    s = bk.get_sampler("euler", SD3, 1)
    assert s.sigmas.tolist() == [1.0, 0.0]
    x_T = noise()
    torch.testing.assert_close(s.sample(V64, x_T), x_T - V64(x_T, 1.0), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("method", ["euler", "bdia", "edict", "obelm"])
def test_inputs_are_never_modified(method):
    s = bk.get_sampler(method, SD3, 5)
    x_T, x_T2, x0 = noise(), noise() * 0.5, data()
    copies = [t.clone() for t in (x_T, x_T2, x0)]
    s.sample(V64, x_T)
    s.sample(V64, x_T, x_T2)
    s.invert(V64, x0)
    for t, c in zip((x_T, x_T2, x0), copies, strict=True):
        assert torch.equal(t, c)


@pytest.mark.parametrize("backend", bk.available_backends("cpu"))
@pytest.mark.parametrize("method", ["euler", "bdia", "edict", "obelm"])
def test_every_backend_runs_every_flow_sampler(method, backend):
    s = bk.get_sampler(method, SD3, 6)
    x_T = noise(dtype=torch.float32)
    torch.testing.assert_close(s.sample(V64, x_T, backend=backend),
                               s.sample(V64, x_T, backend="torch"), rtol=1e-5, atol=1e-5)
    x0 = data(dtype=torch.float32)
    rebuilt = s.sample(V64, *s.invert(V64, x0, backend=backend), backend=backend)
    if method in ("bdia", "obelm"):
        assert rel(rebuilt, x0) <= roundtrip_bound(s, torch.float32)


def test_mixed_precision_velocity():
    """An fp16 model output next to fp32 latents (z may have another dtype)."""
    s = bk.get_sampler("obelm", SD3, 10)
    v16 = MODEL.v_fn(dtype=torch.float16)
    x0 = data(dtype=torch.float32)
    rebuilt = s.sample(v16, *s.invert(v16, x0))
    assert rebuilt.dtype == torch.float32
    assert rel(rebuilt, x0) <= roundtrip_bound(s, torch.float32)


def test_progress_bar_names_euler(capsys):
    bk.get_sampler("euler", SD3, 3).sample(V64, noise(), progress=True)
    assert "euler sampling" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input

VP = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")


@pytest.mark.parametrize("make,exc,match", [
    (lambda: bk.get_sampler("euler", VP, 10), ValueError,
     "sampler 'euler' needs a FlowSchedule, got a VP Schedule; on a VP Schedule the same step "
     "is 'ddim'"),
    (lambda: bk.get_sampler("ddim", SD3, 10), ValueError,
     "sampler 'ddim' needs a VP Schedule, got a FlowSchedule; on a FlowSchedule the same step "
     "is 'euler'"),
    (lambda: DDIMSampler(SD3, 10), ValueError, "on a FlowSchedule the same step is 'euler'"),
    (lambda: EulerSampler(VP, 10), ValueError, "on a VP Schedule the same step is 'ddim'"),
    (lambda: bk.get_sampler("dpm", SD3), ValueError,
     r"sampler name must be one of \('euler', 'bdia', 'edict', 'obelm'\) for a FlowSchedule"),
    (lambda: bk.get_sampler("obelm", SD3, 1), ValueError,
     "'obelm' is a two-step method and needs num_steps >= 2, got 1; 'euler' can take a single"),
    (lambda: bk.get_sampler("bdia", FLUX, sigmas=[1.0]), ValueError, "needs num_steps >= 2"),
    (lambda: bk.get_sampler("obelm", SD3, 10, "trailing"), ValueError,
     "spacing='trailing' is for a VP Schedule"),
    (lambda: bk.get_sampler("obelm", VP, 10, sigmas=[1.0, 0.5]), ValueError,
     "sigmas= is for a FlowSchedule"),
    (lambda: bk.get_sampler("obelm", FLUX, sigmas=[1.0, 0.5, 0.7]), ValueError,
     r"sigmas\[2\] = 0.7 follows sigmas\[1\] = 0.5"),
    (lambda: bk.get_sampler("obelm", FLUX, 5, sigmas=[1.0, 0.5]), ValueError,
     "num_steps=5 but 2 sigmas"),
    (lambda: bk.get_sampler("obelm", SD3, 10, gamma=0.5), TypeError, "unknown parameters"),
    (lambda: bk.get_sampler("bdia", SD3, 5, gamma=0.0).invert(V64, data()), ValueError,
     "gamma=0 is EULER .* use gamma != 0 or the 'euler' sampler"),
    (lambda: bk.get_sampler("obelm", SD3, 5).sample(lambda x, s: x[:1], noise()), ValueError,
     r"v_fn must return a tensor of x's shape \(16, 8\) on cpu, got shape \(1, 8\) on cpu at "
     r"sigma=1.0"),
    (lambda: bk.get_sampler("edict", SD3, 5).invert(lambda x, s: 0.0, data()), TypeError,
     "v_fn must return a float tensor"),
    (lambda: bk.get_sampler("obelm", SD3, 5).sample(V64, noise(), noise(8)), ValueError,
     "x_T2 must have x_T's shape"),
])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_default_is_50_steps_and_sigmas_set_the_count():
    assert bk.get_sampler("obelm", SD3).num_steps == 50
    assert bk.get_sampler("obelm", FLUX, sigmas=flux_sigmas(28)).num_steps == 28
    assert bk.get_sampler("obelm", VP).num_steps == 50
    assert bk.get_sampler("obelm", VP).spacing == "linspace"
