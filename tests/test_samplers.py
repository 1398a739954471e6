import pytest
import torch

import belm_kernels as bk

SCHED = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
MODEL = bk.GaussianMixture.random(dim=8, num_components=4, seed=0)
EXACT = ("obelm", "edict", "bdia")


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def data(n=16, dtype=torch.float64):
    return MODEL.sample_data(n, torch.Generator().manual_seed(3)).to(dtype)


def noise(n=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(4)
    return torch.randn(n, MODEL.dim, generator=gen, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------ against independent formulas


def test_obelm_matches_paper_equation_18():
    """Re-implement Eq. 18 in the paper's own indexing (i counts down, sampling i -> i-1)."""
    n = 10
    s = bk.get_sampler("obelm", SCHED, n)
    eps_fn = MODEL.eps_fn(SCHED)
    # paper states i = N .. 0: i = N - j
    alpha = {n - j: float(s.grid.alpha[j]) for j in range(n + 1)}
    sigma = {n - j: float(s.grid.sigma[j]) for j in range(n + 1)}
    t = {n - j: int(s.timesteps[j]) for j in range(n)}
    sbar = {i: sigma[i] / alpha[i] for i in alpha}
    h = {i: sbar[i] - sbar[i - 1] for i in range(1, n + 1)}
    x = {n: noise()}
    e = eps_fn(x[n], t[n])
    r = alpha[n - 1] / alpha[n]
    x[n - 1] = r * x[n] + (sigma[n - 1] - r * sigma[n]) * e
    for i in range(n - 1, 0, -1):
        e = eps_fn(x[i], t[i])
        x[i - 1] = (h[i] ** 2 / h[i + 1] ** 2 * alpha[i - 1] / alpha[i + 1] * x[i + 1]
                    + (h[i + 1] ** 2 - h[i] ** 2) / h[i + 1] ** 2 * alpha[i - 1] / alpha[i] * x[i]
                    - h[i] * (h[i] + h[i + 1]) / h[i + 1] * alpha[i - 1] * e)
    torch.testing.assert_close(s.sample(eps_fn, noise()), x[0], rtol=1e-13, atol=1e-13)


def test_edict_matches_its_four_lines():
    n, p = 6, 0.93
    s = bk.get_sampler("edict", SCHED, n, p=p)
    eps_fn = MODEL.eps_fn(SCHED)
    a, sg = s.grid.alpha, s.grid.sigma
    x, y = noise(), noise() * 0.9
    x_T, y_T = x.clone(), y.clone()
    for j, t in enumerate(s.timesteps.tolist()):
        aj = float(a[j + 1] / a[j])
        bj = float(sg[j + 1] - aj * sg[j])
        x = aj * x + bj * eps_fn(y, t)
        y = aj * y + bj * eps_fn(x, t)
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    torch.testing.assert_close(s.sample(eps_fn, x_T, y_T), x, rtol=1e-13, atol=1e-13)


def test_sampling_from_pair_equals_sampling_after_ddim_step():
    s = bk.get_sampler("obelm", SCHED, 10)
    eps_fn = MODEL.eps_fn(SCHED)
    x_T = noise()
    _, r, d = bk.coefficients.ddim(s.grid)[0]
    x_T2 = r * x_T + d * eps_fn(x_T, int(s.timesteps[0]))
    torch.testing.assert_close(s.sample(eps_fn, x_T, x_T2), s.sample(eps_fn, x_T),
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers_ddim_scheduler(spacing):
    # diffusers' DDIM steps from t to t - T // N, which is the next timestep for these spacings
    # (for "linspace" it is not, so diffusers' DDIM skips parts of its own grid there).
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  set_alpha_to_one=True, timestep_spacing=spacing,
                                  clip_sample=False)
    ref.set_timesteps(10)
    eps_fn = MODEL.eps_fn(SCHED)
    x = noise().float()
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(eps_fn(expected, int(t)), t, expected).prev_sample
    got = bk.get_sampler("ddim", SCHED, 10, spacing).sample(eps_fn, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ round trip and call counts


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("n", [2, 10, 20])
def test_exact_round_trip_float64(method, n):
    s = bk.get_sampler(method, SCHED, n)
    eps_fn = MODEL.eps_fn(SCHED)
    x0 = data()
    rebuilt = s.sample(eps_fn, *s.invert(eps_fn, x0))
    assert float((rebuilt - x0).norm() / x0.norm()) < 1e-12


def test_ddim_round_trip_is_not_exact():
    s = bk.get_sampler("ddim", SCHED, 20)
    eps_fn = MODEL.eps_fn(SCHED)
    x0 = data()
    rebuilt = s.sample(eps_fn, *s.invert(eps_fn, x0))
    assert float((rebuilt - x0).norm() / x0.norm()) > 1e-3


@pytest.mark.parametrize("method,sample_calls,pair_calls,invert_calls", [
    ("ddim", 10, 9, 10), ("bdia", 10, 9, 10), ("obelm", 10, 9, 10), ("edict", 20, 20, 20)])
def test_model_calls(method, sample_calls, pair_calls, invert_calls):
    s = bk.get_sampler(method, SCHED, 10)
    c = Counter(MODEL.eps_fn(SCHED))
    s.sample(c, noise())
    assert c.calls == sample_calls
    c.calls = 0
    pair = s.invert(c, data())
    assert c.calls == invert_calls
    c.calls = 0
    s.sample(c, *pair)
    assert c.calls == pair_calls


@pytest.mark.parametrize("method", ["ddim", "bdia", "edict", "obelm"])
def test_inputs_are_never_modified(method):
    s = bk.get_sampler(method, SCHED, 5)
    eps_fn = MODEL.eps_fn(SCHED)
    x_T, x_T2, x0 = noise(), noise() * 0.5, data()
    copies = [t.clone() for t in (x_T, x_T2, x0)]
    s.sample(eps_fn, x_T)
    s.sample(eps_fn, x_T, x_T2)
    s.invert(eps_fn, x0)
    for t, c in zip((x_T, x_T2, x0), copies, strict=True):
        assert torch.equal(t, c)


@pytest.mark.parametrize("backend", bk.available_backends("cpu"))
@pytest.mark.parametrize("method", ["ddim", "bdia", "edict", "obelm"])
def test_every_backend_runs_every_sampler(method, backend):
    """Same float32 sampling trajectory on every backend; the exact methods still round-trip.

    (Inverted pairs are not compared across backends: inversion amplifies the last-bit
    differences of fused vs unfused arithmetic along its growing mode, and sampling undoes it.)
    """
    s = bk.get_sampler(method, SCHED, 6)
    eps_fn = MODEL.eps_fn(SCHED)
    x_T = noise(dtype=torch.float32)
    torch.testing.assert_close(s.sample(eps_fn, x_T, backend=backend),
                               s.sample(eps_fn, x_T, backend="torch"), rtol=1e-5, atol=1e-5)
    x0 = data(dtype=torch.float32)
    rebuilt = s.sample(eps_fn, *s.invert(eps_fn, x0, backend=backend), backend=backend)
    if method != "ddim":
        assert float((rebuilt - x0).norm() / x0.norm()) < 1e-5


def test_mixed_precision_model_output():
    """An fp16 model output next to fp32 latents is read as is (z may have another dtype)."""
    s = bk.get_sampler("obelm", SCHED, 10)
    eps16 = MODEL.eps_fn(SCHED, dtype=torch.float16)
    x0 = data(dtype=torch.float32)
    rebuilt = s.sample(eps16, *s.invert(eps16, x0))
    assert rebuilt.dtype == torch.float32
    assert float((rebuilt - x0).norm() / x0.norm()) < 1e-5


def test_progress_bar(capsys):
    s = bk.get_sampler("obelm", SCHED, 4)
    s.sample(MODEL.eps_fn(SCHED), noise(), progress=True)
    assert "obelm sampling" in capsys.readouterr().err
    s.sample(MODEL.eps_fn(SCHED), noise())
    assert capsys.readouterr().err == ""


def test_timesteps_and_repr():
    s = bk.get_sampler("obelm", SCHED, 10, spacing="trailing")
    assert s.timesteps.dtype == torch.long and s.timesteps.tolist()[0] == 999
    assert "num_steps=10" in repr(s)


@pytest.mark.parametrize("method", ["ddim", *EXACT])
def test_custom_timesteps_give_that_grid(method):
    """timesteps= (a diffusers scheduler's grid, e.g. with steps_offset) replaces the spacing."""
    ts = SCHED.timesteps(10, "leading", steps_offset=1)
    s = bk.get_sampler(method, SCHED, timesteps=ts.tolist())
    assert torch.equal(s.timesteps, ts) and s.num_steps == 10
    assert torch.equal(s.grid.alpha, SCHED.grid(ts).alpha)
    same = bk.get_sampler(method, SCHED, 10, timesteps=ts)
    assert torch.equal(same.sample(eps_fn64, noise()), s.sample(eps_fn64, noise()))


def test_compiled_sampler_step_matches_eager():
    """torch.compile(fullgraph=True) of one sampler step with the fused op."""
    s = bk.get_sampler("obelm", SCHED, 10)
    coef = s.rows()[3].float()

    def step(prev, cur, eps):
        return bk.lincomb3_(prev, cur, eps, coef)

    prev, cur, eps = (torch.randn(2, 4, 8, 8) for _ in range(3))
    expected = step(prev.clone(), cur, eps)
    got = torch.compile(step, fullgraph=True)(prev.clone(), cur, eps)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_of_sampler_step_replays_new_coefficients():
    prev, cur, eps = (torch.randn(2, 4, 64, 64, device="cuda") for _ in range(3))
    coef = torch.tensor([0.5, 0.25, -0.1], device="cuda")
    start = prev.clone()
    bk.lincomb3_(prev.clone(), cur, eps, coef)  # warm up (JIT builds, autotuning) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bk.lincomb3_(prev, cur, eps, coef)
    for values in ([0.5, 0.25, -0.1], [1.5, -2.0, 0.3]):
        prev.copy_(start)
        coef.copy_(torch.tensor(values))
        graph.replay()
        a, b, c = values
        torch.testing.assert_close(prev, a * start + b * cur + c * eps, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ bad input


def eps_fn64(x, t):
    return MODEL.eps_fn(SCHED)(x, t)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: bk.get_sampler("dpm", SCHED), ValueError, "sampler name must be one of"),
    (lambda: bk.get_sampler("obelm", SCHED, 1), ValueError, "num_steps must be an int >= 2"),
    (lambda: bk.get_sampler("obelm", SCHED, 1001), ValueError, "at most num_train_timesteps"),
    (lambda: bk.get_sampler("obelm", SCHED, 10, gamma=0.5), TypeError, "unknown parameters"),
    (lambda: bk.get_sampler("edict", SCHED, 10, p=1.0), ValueError,
     r"p must be a float in \(0, 1\)"),
    (lambda: bk.get_sampler("edict", SCHED, 10, p=0), ValueError, r"p must be a float in \(0, 1\)"),
    (lambda: bk.get_sampler("bdia", SCHED, 10, gamma="x"), TypeError, "gamma must be a float"),
    (lambda: bk.get_sampler("obelm", [0.9, 0.5]), TypeError, "schedule must be"),
    (lambda: bk.get_sampler("obelm", SCHED, timesteps=[900, 901]), ValueError,
     r"timesteps must be at least two strictly decreasing integers in \[0, 999\], got "
     r"\[900, 901\]"),
    (lambda: bk.get_sampler("obelm", SCHED, timesteps=[1000, 0]), ValueError,
     "strictly decreasing integers in"),
    (lambda: bk.get_sampler("obelm", SCHED, timesteps=[900.0, 0.0]), ValueError,
     "timesteps must be a 1-D sequence of integers"),
    (lambda: bk.get_sampler("obelm", SCHED, 3, timesteps=[900, 0]), ValueError,
     "num_steps=3 but 2 timesteps"),
    (lambda: bk.get_sampler("obelm", SCHED, spacing="leading", timesteps=[900, 0]), ValueError,
     "either spacing or custom timesteps"),
    (lambda: bk.get_sampler("obelm", bk.FlowSchedule(), timesteps=[900, 0]), ValueError,
     "timesteps= is for a VP Schedule"),
    (lambda: bk.get_sampler("bdia", SCHED, 5, gamma=0.0).invert(eps_fn64, data()), ValueError,
     "gamma=0 .* cannot be inverted"),
    (lambda: bk.get_sampler("obelm", SCHED, 5).sample(eps_fn64, noise(), noise(8)), ValueError,
     "x_T2 must have x_T's shape"),
    (lambda: bk.get_sampler("obelm", SCHED, 5).sample(eps_fn64, noise(), noise().float()),
     ValueError, "x_T2 must have x_T's dtype"),
    (lambda: bk.get_sampler("edict", SCHED, 5).sample(eps_fn64, noise(), noise(8)), ValueError,
     "x_T2 must have x_T's shape"),
    (lambda: bk.get_sampler("obelm", SCHED, 5).sample(lambda x, t: x[:1], noise()), ValueError,
     "eps_fn must return a tensor of x's shape"),
    (lambda: bk.get_sampler("obelm", SCHED, 5).invert(lambda x, t: 0.0, data()), TypeError,
     "eps_fn must return a float tensor"),
])
def test_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bdia_gamma_zero_still_samples():
    s = bk.get_sampler("bdia", SCHED, 5, gamma=0.0)
    torch.testing.assert_close(s.sample(eps_fn64, noise()),
                               bk.get_sampler("ddim", SCHED, 5).sample(eps_fn64, noise()))


def test_readme_quick_start_runs_as_written(capsys):
    """The README's Quick start code blocks, run in order in one namespace."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = [float(v) for v in re.findall(r"^(\S+e-\d+)$", capsys.readouterr().out, flags=re.M)]
    assert len(printed) == 2 and max(printed) < 1e-12  # the VP and flow float64 reconstructions
