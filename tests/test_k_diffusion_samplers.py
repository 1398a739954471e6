"""The fused ``sample_euler``, ``sample_euler_ancestral`` and ``sample_dpmpp_2m`` against the
``k-diffusion`` package (0.1.1.post1), loaded at run time.

How k-diffusion is loaded: its package ``__init__`` imports torchvision (and with it another
torch), which the tests do not install; its ``sampling`` module needs only ``utils`` (whose
torchvision import serves image helpers the samplers never call), torchsde, torchdiffeq and
scipy. So the two modules are loaded from the installed package's files under a private package
name, with a placeholder ``torchvision.transforms.functional`` present only while ``utils`` is
imported when torchvision is missing. Install as CI does: ``pip install --no-deps
k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline`` (and scipy).

Error model: as ``tests/test_fused_schedulers.py`` (``belm_kernels.roundoff``), with k-diffusion's
scalar arithmetic in the sigmas' dtype and its tensor operations in the latents'. To compare the
runs step by step the model returns a fixed denoised tensor per call, independent of x: the runs
are then linear in their inputs, and each state's bound carries the previous one's, |c_x| B_x.
A test with a real denoiser checks the calling conventions (the model's arguments, extra_args,
callback dicts).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from belm_kernels import multistep
from belm_kernels.k_diffusion import sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from belm_kernels.roundoff import Roundoff, fused_error, original_error, reference


def _load_k_diffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1 "
                    "torchsde torchdiffeq trampoline)")
    root = Path(spec.submodule_search_locations[0])
    name = "_k_diffusion_reference"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    sys.modules[name] = package
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        for mod in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stubs[mod] = types.ModuleType(mod)
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        for sub in ("utils", "sampling"):
            spec = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, sub, module)
    finally:
        for mod in stubs:
            del sys.modules[mod]
    return sys.modules[f"{name}.sampling"]


@pytest.fixture(scope="module")
def kd():
    return _load_k_diffusion_sampling()


SHAPE = (2, 4, 8, 8)
OURS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral,
        "dpmpp_2m": sample_dpmpp_2m}
BUILDERS = {
    "euler": lambda F, s, i, kw: multistep.k_euler(F, F.num(s[i]), F.num(s[i + 1])),
    "euler_ancestral": lambda F, s, i, kw: multistep.k_euler_ancestral(
        F, F.num(s[i]), F.num(s[i + 1]), **kw),
    "dpmpp_2m": lambda F, s, i, kw: multistep.k_dpmpp_2m(F, s)[i],
}


class FixedDenoiser:
    """Returns the i-th of fixed tensors at its i-th call, whatever x: the runs are linear."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.outputs = [torch.randn(SHAPE, generator=g) for _ in range(n)]
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


def recorded(run):
    """Runs ``run(callback)``; returns the states x of each step (the callback's) and the end."""
    xs = []
    end = run(lambda d: xs.append(d["x"].clone()))
    return xs + [end]


CASES = [
    ("euler", {}, torch.float32, 20),
    ("euler", {}, torch.float64, 12),
    ("euler_ancestral", {}, torch.float32, 20),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.8}, torch.float32, 15),
    ("euler_ancestral", {"eta": 0.0}, torch.float32, 8),
    ("dpmpp_2m", {}, torch.float32, 20),
    ("dpmpp_2m", {}, torch.float64, 10),
]


@pytest.mark.parametrize("name, kwargs, sigma_dtype, n", CASES,
                         ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}" for c in CASES])
def test_each_state_equals_k_diffusion_within_the_error_model(kd, name, kwargs, sigma_dtype, n):
    sigmas = kd.get_sigmas_karras(n, 0.0292, 14.6146).to(sigma_dtype)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 14.6146
    runs = []
    for fn in (getattr(kd, f"sample_{name}"), OURS[name]):
        torch.manual_seed(7)  # the ancestral noise: the global generator, as k-diffusion draws it
        runs.append(recorded(lambda cb, fn=fn: fn(FixedDenoiser(n), x_T, sigmas, callback=cb,
                                                   disable=True, **kwargs)))
    theirs, ours = runs
    # The exact run in float64 from the table, and the bounds of both runs against it.
    sig = sigmas.double().tolist()
    model = FixedDenoiser(n)
    torch.manual_seed(7)
    exact, b_theirs, b_ours, b_ref = x_T.double(), 0.0, 0.0, 0.0
    f32 = Roundoff(sigma_dtype, torch.float32)
    with multistep.ieee():
        for i in range(n):
            formula = BUILDERS[name](multistep.FLOAT64, sig, i, kwargs)
            step = multistep.tabulate([formula])[0]
            tracked = BUILDERS[name](f32, sig, i, kwargs)[multistep.PREV_SAMPLE]
            tracked64 = BUILDERS[name](Roundoff(torch.float64), sig, i, kwargs)[
                multistep.PREV_SAMPLE]
            values = {multistep.SAMPLE: exact, multistep.MODEL_OUTPUT: model.outputs[i].double()}
            if i:
                values[multistep.lag(multistep.MODEL_OUTPUT, 1)] = model.outputs[i - 1].double()
            if step.noise:
                values[multistep.NOISE] = torch.randn(SHAPE).double()
            exact = reference(step, 0, values)
            b_theirs = original_error(tracked, values, {multistep.SAMPLE: b_theirs})
            b_ours = fused_error(step, 0, tracked64, values, torch.float32,
                                 {multistep.SAMPLE: b_ours})
            b_ref = fused_error(step, 0, tracked64, values, torch.float64,
                                {multistep.SAMPLE: b_ref}, compute_dtype=torch.float64)
            mine, other = ours[i + 1].double(), theirs[i + 1].double()
            assert bool(((mine - other).abs() <= b_ours + b_theirs).all()), i
            assert bool(((other - exact).abs() <= b_theirs + b_ref).all()), i
            assert bool(((mine - exact).abs() <= b_ours + b_ref).all()), i
    assert ours[-1].dtype == theirs[-1].dtype


def test_calling_conventions_are_k_diffusions(kd):
    """With a real (x-dependent) denoiser: the model gets k-diffusion's x, sigma * s_in and
    extra_args at the first call, the callback k-diffusion's keys, i and sigmas; x is not
    modified; one sigma gives x back."""
    sigmas = kd.get_sigmas_karras(6, 0.03, 10.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 10.0
    x_before = x.clone()
    for name in OURS:
        seen = {}
        for who, fn in (("theirs", getattr(kd, f"sample_{name}")), ("ours", OURS[name])):
            calls, dicts = [], []

            def model(x, sigma, cond=None, calls=calls):
                calls.append((x.clone(), sigma.clone(), cond))
                return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0.1 * cond

            torch.manual_seed(0)
            fn(model, x, sigmas, extra_args={"cond": 0.5}, callback=dicts.append, disable=True)
            seen[who] = calls, dicts
        (c_t, d_t), (c_o, d_o) = seen["theirs"], seen["ours"]
        assert len(c_t) == len(c_o) == 6
        assert torch.equal(c_t[0][0], c_o[0][0]) and c_o[0][2] == 0.5
        for (_, s_t, _), (_, s_o, _) in zip(c_t, c_o, strict=True):
            assert torch.equal(s_t, s_o) and s_o.dtype == s_t.dtype
        assert [sorted(d) for d in d_t] == [sorted(d) for d in d_o]
        assert [d["i"] for d in d_o] == list(range(6))
        assert all(torch.equal(a["sigma"], b["sigma"]) for a, b in zip(d_t, d_o, strict=True))
    assert torch.equal(x, x_before)
    assert sample_dpmpp_2m(lambda x, s: x, x, sigmas[:1]) is x


def test_bad_arguments_are_refused_before_the_model_runs():
    x = torch.randn(SHAPE)

    def model(*args, **kwargs):
        raise AssertionError("the model must not be called")

    with pytest.raises(ValueError, match="s_churn=1.0.*not implemented"):
        sample_euler(model, x, torch.tensor([2.0, 1.0, 0.0]), s_churn=1.0)
    for bad, match in (([2.0, 0.0, 1.0], "> 0"), ([[1.0]], "1-D"), ([1.0, float("nan")],
                                                                      "finite")):
        with pytest.raises(ValueError, match=match):
            sample_dpmpp_2m(model, x, torch.tensor(bad))
    with pytest.raises(TypeError, match="sigmas must be a float tensor"):
        sample_euler(model, x, torch.tensor([2, 1, 0]))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sample_euler_ancestral(model, x.tolist(), torch.tensor([2.0, 0.0]))
