"""diffusers schedulers: BELMScheduler / BELMInverseScheduler, offline, with the analytic model.

Tests in the spirit of diffusers' common scheduler tests (config round trip, compatibles, step
shapes, tuple vs dataclass, the attributes and options DDIMScheduler has), exactness against the
core sampler with the analytic Gaussian-mixture model, the two-step state and its checks, and bad
input. Pipelines are in test_diffusers_pipelines.py.
"""

import logging
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

import belm_kernels as bk
from belm_kernels import coefficients
from belm_kernels.diffusers import BELMInverseScheduler, BELMScheduler, LatentPair

# Configs with DDIM's defaults (clip_sample=True) warn that it is ignored; that warning has its
# own test below.
pytestmark = pytest.mark.filterwarnings("ignore:BELM.*=.* is ignored:UserWarning")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHED = bk.Schedule.from_betas(**SD)
MODEL = bk.GaussianMixture.random(dim=16, num_components=4, seed=0)
SHAPE = (3, 4, 2, 2)  # 3 samples of the 16-dimensional mixture
EPS32 = torch.finfo(torch.float32).eps


def belm(cls=BELMScheduler, **kw):
    return cls(**{**SD, "timestep_spacing": "linspace", **kw})


def belm_set(n, cls=BELMScheduler, **kw):
    s = belm(cls, **kw)
    s.set_timesteps(n)
    return s


def noise(dtype=torch.float64, seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype)


def data(dtype=torch.float64, seed=1):
    return MODEL.sample_data(SHAPE[0], torch.Generator().manual_seed(seed)).reshape(SHAPE).to(dtype)


def model_fn(prediction_type="epsilon"):
    """The exact model in each parametrisation, at the timestep it is called with."""
    ac = SCHED.alphas_cumprod

    def fn(x, t):
        t = int(t)
        alpha, sigma = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
        eps = MODEL.eps(x, alpha, sigma)
        x0 = (x.to(torch.float64) - sigma * eps) / alpha
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}
        return out[prediction_type].to(x.dtype)

    return fn


def run(scheduler, fn, x, **step_kw):
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, t), t, x, **step_kw).prev_sample
    return x


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------ config and compatibility


def test_config_save_load_round_trip(tmp_path):
    s = belm(prediction_type="v_prediction", steps_offset=1, backend="torch")
    s.save_pretrained(tmp_path)
    t = BELMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(t.config) == public(s.config)
    assert t.config.backend == "torch" and t.config.prediction_type == "v_prediction"
    s.set_timesteps(10)
    t.set_timesteps(10)
    assert torch.equal(s.timesteps, t.timesteps)
    x, fn = noise(), model_fn("v_prediction")
    assert torch.equal(run(s, fn, x), run(t, fn, x))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # LMSDiscreteScheduler's numpy use
@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
                                 DPMSolverMultistepScheduler, LMSDiscreteScheduler,
                                 DDIMInverseScheduler])
def test_from_config_of_common_sd_schedulers(cls):
    other = cls(**SD, steps_offset=1)
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        s = BELMScheduler.from_config(other.config)
        inv = BELMInverseScheduler.from_config(other.config)
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert not [m for m in records.messages if "not expected" in m], records.messages
    assert torch.equal(s.alphas_cumprod, other.alphas_cumprod)
    assert torch.equal(inv.alphas_cumprod, other.alphas_cumprod)
    assert cls in s.compatibles and cls in inv.compatibles
    # the same integer timesteps as DDIMScheduler built from the same config
    ddim = DDIMScheduler.from_config(other.config)
    for n in (10, 20, 50):
        ddim.set_timesteps(n)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == ddim.timesteps.tolist()
    # and back: the compatible scheduler's own keys survive the trip through BELMScheduler
    back = cls.from_config(s.config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
           {k: v for k, v in other.config.items() if not k.startswith("_")}


def test_compatibles_list_the_karras_schedulers():
    names = {c.__name__ for c in BELMScheduler().compatibles}
    assert {"DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler",
            "DPMSolverMultistepScheduler", "DDIMInverseScheduler"} <= names


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_ddim(spacing, offset):
    for n in (2, 7, 25, 50):
        ddim = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        s = BELMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        ddim.set_timesteps(n)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == ddim.timesteps.tolist()
        assert s.timesteps.dtype == torch.long
        inv = BELMInverseScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        inv.set_timesteps(n)
        t = ddim.timesteps.tolist()
        assert inv.timesteps.tolist() == [t[-1]] + t[:0:-1]  # ascending, t_{N-1} twice


def test_trained_betas_and_attributes():
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    s = BELMScheduler(trained_betas=betas)
    ddim = DDIMScheduler(trained_betas=betas)
    assert torch.equal(s.alphas_cumprod, ddim.alphas_cumprod)
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000
    assert float(s.final_alpha_cumprod) == 1.0
    x = noise(torch.float32)
    assert s.scale_model_input(x, 10) is x


@pytest.mark.parametrize("config", [
    dict(SD), dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=np.linspace(1e-4, 0.02, 1000)), dict(SD, rescale_betas_zero_snr=True)])
def test_betas_alphas_alphas_cumprod_are_ddims(config):
    """The attributes diffusers' DDIMScheduler has, bit for bit, from both schedulers."""
    ddim = DDIMScheduler(**config)
    for cls in (BELMScheduler, BELMInverseScheduler):
        for s in (cls(**config), cls.from_config(ddim.config)):
            for name in ("betas", "alphas", "alphas_cumprod"):
                ours, theirs = getattr(s, name), getattr(ddim, name)
                assert ours.dtype == theirs.dtype == torch.float32, name
                assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("option,value", [("clip_sample", True), ("thresholding", True)])
def test_ignored_ddim_options_warn_from_the_constructor_and_from_config(option, value):
    for cls in (BELMScheduler, BELMInverseScheduler):
        match = f"{cls.__name__}: {option}={value} is ignored"
        with pytest.warns(UserWarning, match=match):
            cls(**{option: value})
        other = DDIMScheduler(**{**SD, "clip_sample": False, option: value})
        with pytest.warns(UserWarning, match=match):
            s = cls.from_config(other.config)
        assert getattr(s.config, option) == value  # kept in the config, for the trip back
        assert getattr(DDIMScheduler.from_config(s.config).config, option) == value
    # the values that BELM follows anyway: no warning, from either path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BELMScheduler(clip_sample=False, thresholding=False, set_alpha_to_one=True)
        BELMScheduler(set_alpha_to_one=False)  # SD 1.x's value: documented, not warned about
        BELMScheduler.from_config(DDIMScheduler(**SD, clip_sample=False,
                                                set_alpha_to_one=False).config)
        BELMScheduler.from_config(DDIMScheduler(**SD, clip_sample=False).config)
        BELMScheduler.from_config(EulerDiscreteScheduler(**SD).config)  # no such keys


def test_zero_terminal_snr_where_the_grid_does_not_visit_it():
    """rescale_betas_zero_snr=True puts alpha = 0 at timestep 999 only: "leading" spacing never
    visits it and round-trips exactly; for an epsilon model a grid that does visit it is refused
    with a clear error (v_prediction: test_zero_snr_grid_of_a_v_prediction_model)."""
    config = DDIMScheduler(**SD, rescale_betas_zero_snr=True, steps_offset=1,
                           clip_sample=False).config
    s = BELMScheduler.from_config(config)
    assert float(s.alphas_cumprod[-1]) == 0.0
    inv = BELMInverseScheduler.from_config(config)
    inv.set_timesteps(20)
    x0 = data()
    fn = lambda x, t: MODEL.eps(x, *(math.sqrt(v) for v in (  # noqa: E731
        float(s.alphas_cumprod[int(t)]), 1 - float(s.alphas_cumprod[int(t)])))).to(x.dtype)
    run(inv, fn, x0)
    s.set_latent_pair(inv.latent_pair)
    s.set_timesteps(20)
    assert max(s.timesteps.tolist()) < 999
    assert rel(run(s, fn, inv.latent_pair.x_T2), x0) < 1e-12
    for spacing in ("trailing", "linspace"):
        t = BELMScheduler.from_config(config, timestep_spacing=spacing)
        with pytest.raises(ValueError, match="visits timestep 999, whose alphas_cumprod is 0 .*"
                                             "an epsilon model cannot predict the data"):
            t.set_timesteps(20)
    with pytest.raises(ValueError, match="visits timestep 999"):
        s.set_timesteps(timesteps=[999, 500, 0])


COGVIDEOX = dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)


@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0])  # CogVideoX-2b, -5b
def test_cogvideox_configs_give_their_alphas_cumprod_bit_for_bit(snr_shift_scale):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler):
        theirs = cls(**COGVIDEOX, snr_shift_scale=snr_shift_scale)
        ours = BELMScheduler.from_config(theirs.config)
        assert ours.config.snr_shift_scale == snr_shift_scale
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        assert float(ours.alphas_cumprod[-1]) == 0.0  # zero terminal SNR
        ours.set_timesteps(50)
        theirs.set_timesteps(50)
        assert torch.equal(ours.timesteps, theirs.timesteps) and int(ours.timesteps[0]) == 999
    for bad in (0.0, -1.0, True, "3"):
        with pytest.raises(ValueError, match="snr_shift_scale must be a positive float"):
            BELMScheduler(**COGVIDEOX, snr_shift_scale=bad)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_zero_snr_grid_of_a_v_prediction_model(prediction_type):
    """CogVideoX's grid starts at alphas_cumprod = 0 (pure noise). The first step is DDIM's
    x_1 = sigma_1 x - alpha_1 v (x0 = the output for "sample"); O-BELM's next step has leading
    coefficient 0 (DDIM's step again), so the inversion ends with the pair of the second and
    third states, and the regeneration from it makes N-2 model calls, exactly."""
    config = dict(COGVIDEOX, prediction_type=prediction_type, snr_shift_scale=3.0)
    n = 8
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def fn(x, t):  # any model will do: exactness does not depend on it
        flat = x.reshape(x.shape[0], -1).double()
        return torch.tanh(flat @ w + int(t) / 1000).reshape(x.shape).to(x.dtype)

    s = BELMScheduler(**config)
    s.set_timesteps(n)
    ac = s.alphas_cumprod.double()
    ts = s.timesteps.tolist()
    assert ts[0] == 999 and float(ac[999]) == 0.0
    alpha1, sigma1 = float(ac[ts[1]].sqrt()), float((1 - ac[ts[1]]).sqrt())
    x = noise(torch.float64)
    first = s.step(fn(x, ts[0]), ts[0], x).prev_sample
    x0 = -fn(x, ts[0]) if prediction_type == "v_prediction" else fn(x, ts[0])
    assert rel(first, alpha1 * x0 + sigma1 * x) <= 4 * torch.finfo(torch.float64).eps
    two = s._tables64["two"]
    assert float(two[1, 0]) == 0.0 and torch.equal(two[1], s._tables64["first"][1])

    x0 = data(torch.float64)
    inv = BELMInverseScheduler(**config)
    inv.set_timesteps(n)
    assert inv.timesteps.tolist() == [ts[-1]] + ts[2:][::-1]  # ends at t_2: N-1 steps
    run(inv, fn, x0)
    pair = inv.latent_pair
    s.set_latent_pair(pair)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == ts[2:]  # N-2 model calls from the pair
    assert rel(run(s, fn, pair.x_T2), x0) < 1e-13
    # float32 latents through float64 states: bit for bit
    x0 = data(torch.float32)
    inv = BELMInverseScheduler(**config, state_dtype="float64")
    inv.set_timesteps(n)
    run(inv, fn, x0)
    s.set_latent_pair(inv.latent_pair)
    s.set_timesteps(n)
    assert torch.equal(run(s, fn, inv.latent_pair.x_T2), x0)
    with pytest.raises(ValueError, match="BELMInverseScheduler needs at least 3 steps .* after "
                                         "the zero-SNR state"):
        BELMInverseScheduler(**config).set_timesteps(2)


# ------------------------------------------------------------------ step outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_step_shapes_dtypes_and_output_forms(dtype):
    for cls in (BELMScheduler, BELMInverseScheduler):
        a, b = belm(cls), belm(cls)
        a.set_timesteps(6)
        b.set_timesteps(6)
        x = noise(dtype, shape=(2, 4, 8, 8))
        xa, xb = x, x.clone()
        for t in a.timesteps:
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t))).to(dtype)
            out = a.step(eps, t, xa)
            tup = b.step(eps, t, xb, return_dict=False)
            assert isinstance(out, SchedulerOutput) and isinstance(tup, tuple) and len(tup) == 1
            assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
            assert torch.equal(out.prev_sample, tup[0])
            xa, xb = out.prev_sample, tup[0]
        assert a.step_index == len(a.timesteps)


def test_model_output_in_another_dtype():
    """An fp16 model output next to an fp32 state, as the fused op allows."""
    s, r = belm(), belm()
    s.set_timesteps(8)
    r.set_timesteps(8)
    fn = model_fn()
    x = y = noise(torch.float32)
    for t in s.timesteps:
        eps = fn(x, t).half()
        x = s.step(eps, t, x).prev_sample
        y = r.step(eps.float(), t, y).prev_sample
    assert torch.equal(x, y)


def test_int_and_standalone_tensor_timesteps():
    s, r = belm(), belm()
    s.set_timesteps(8)
    r.set_timesteps(8)
    fn = model_fn()
    x = y = noise()
    for t in s.timesteps.tolist():
        x = s.step(fn(x, t), t, x).prev_sample               # python int
        y = r.step(fn(y, t), torch.tensor(t), y).prev_sample  # not a view of r.timesteps
    assert torch.equal(x, y)


@pytest.mark.parametrize("as_type", [
    int, np.int64, np.int32, float, np.float64, torch.tensor,
    lambda t: torch.tensor([t]), lambda t: torch.tensor(float(t)),
    lambda t: torch.tensor(t, dtype=torch.int32)])
def test_timestep_types_that_name_a_timestep(as_type):
    s, r = belm_set(6), belm_set(6)
    fn = model_fn()
    x = y = noise()
    for t in s.timesteps:
        x = s.step(fn(x, t), t, x).prev_sample
        y = r.step(fn(y, t), as_type(int(t)), y).prev_sample
    assert torch.equal(x, y)


@pytest.mark.parametrize("timestep,name", [("901", "str"), (b"901", "bytes"), (None, "NoneType"),
                                           (True, "bool"), (torch.tensor(True), "bool"),
                                           (901 + 0j, "complex"), ([901], "list")])
def test_non_numeric_timestep_is_a_type_error(timestep, name):
    s = belm()
    s.set_timesteps(timesteps=[901, 500, 0])
    x = noise()
    with pytest.raises(TypeError, match=f"timestep must be a number .* got {name}"):
        s.step(x, timestep, x)
    assert s.step_index is None  # nothing happened: the run can start
    s.step(model_fn()(x, 901), 901, x)


def test_add_noise_equals_ddim():
    s, ddim = BELMScheduler(**SD), DDIMScheduler(**SD)
    for dtype in (torch.float32, torch.float16, torch.float64):
        x0, eps = noise(dtype, 1, (4, 4, 8, 8)), noise(dtype, 2, (4, 4, 8, 8))
        t = torch.tensor([0, 17, 500, 999])
        assert torch.equal(s.add_noise(x0, eps, t), ddim.add_noise(x0, eps, t))
        t1 = torch.tensor([321])
        assert torch.equal(s.add_noise(x0, eps, t1), ddim.add_noise(x0, eps, t1))


# ------------------------------------------------------------------ exactness against the core


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matches_core_obelm_sampler_float64(backend):
    core = bk.get_sampler("obelm", SCHED, 20, "linspace")
    eps_fn = MODEL.eps_fn(SCHED)
    x = noise()
    ref = core.sample(eps_fn, x, backend="torch")
    s = belm(backend=backend)
    s.set_timesteps(20)
    assert s.timesteps.tolist() == core.timesteps.tolist()
    out = run(s, lambda x, t: eps_fn(x, int(t)), x)
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_give_the_eps_trajectory(prediction_type):
    core = bk.get_sampler("obelm", SCHED, 15, "linspace")
    x = noise()
    ref = core.sample(MODEL.eps_fn(SCHED), x)
    s = belm(prediction_type=prediction_type)
    s.set_timesteps(15)
    out = run(s, model_fn(prediction_type), x)
    assert rel(out, ref) < 1e-12
    # exact round trip in that parametrisation too
    inv = belm(BELMInverseScheduler, prediction_type=prediction_type)
    inv.set_timesteps(15)
    run(inv, model_fn(prediction_type), ref)
    s.set_latent_pair(inv.latent_pair)
    s.set_timesteps(15)
    assert rel(run(s, model_fn(prediction_type), inv.latent_pair.x_T2), ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_one_pass_step_equals_the_public_ops_step_bit_for_bit(dtype):
    """On the compiled kernels a step is one pass of the kernel op over the previous state, the
    sample and the model output into a new tensor; with a model output that requires grad it is
    the public op (a copy of the previous state updated in place, autograd recording): the same
    bits, sampling and inverting, the inversion's steps being inverse updates."""
    fn = model_fn()
    for cls, x in ((BELMScheduler, noise(dtype)), (BELMInverseScheduler, data(dtype))):
        plain, recorded = belm_set(12, cls), belm_set(12, cls)
        a = b = x
        for t in plain.timesteps:
            eps = fn(a, t)
            a = plain.step(eps, t, a).prev_sample
            b = recorded.step(eps.clone().requires_grad_(), t, b).prev_sample
            assert b.requires_grad and a.dtype == b.dtype == dtype and a.is_contiguous()
            assert torch.equal(a, b.detach()), (cls.__name__, int(t))
            b = b.detach()


def test_inverse_matches_core_invert_float64():
    core = bk.get_sampler("obelm", SCHED, 20, "linspace")
    x0 = data()
    ref_T, ref_T2 = core.invert(MODEL.eps_fn(SCHED), x0)
    inv = belm(BELMInverseScheduler)
    inv.set_timesteps(20)
    last = run(inv, model_fn(), x0)
    pair = inv.latent_pair
    assert isinstance(pair, LatentPair) and pair.x_T is last
    assert (pair.x_T - ref_T).abs().max() <= 1e-12 * ref_T.abs().max()
    assert (pair.x_T2 - ref_T2).abs().max() <= 1e-12 * ref_T2.abs().max()


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float64, None), (torch.float32, "float64")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_inverse_then_sample_round_trip(dtype, state_dtype, spacing):
    n = 20
    x0 = data(dtype)
    inv = BELMInverseScheduler(**SD, timestep_spacing=spacing, steps_offset=1,
                               state_dtype=state_dtype)
    inv.set_timesteps(n)
    run(inv, model_fn(), x0)
    pair = inv.latent_pair
    s = BELMScheduler.from_config(inv.config)
    s.set_latent_pair(pair)
    s.set_timesteps(n)
    assert len(s.timesteps) == n - 1  # the first (DDIM) step is skipped: N-1 model calls
    calls = []

    def fn(x, t):
        calls.append(int(t))
        return model_fn()(x, t)

    out = run(s, fn, pair.x_T2)
    assert len(calls) == n - 1
    # float64: rounding (~1e-16 per step), amply. float32 latents with float64 states: the
    # model sees the same float32 inputs both ways, so only the final rounding remains.
    tol = 1e-12 if dtype == torch.float64 else EPS32
    assert rel(out, x0) <= tol, rel(out, x0)
    # the pair was consumed: the next run samples normally from x_T with N calls
    s.set_timesteps(n)
    assert len(s.timesteps) == n


def test_set_begin_index_img2img_path():
    """Start in the middle (img2img): a DDIM step from state k, then O-BELM rows k+1..N-1."""
    n, k = 20, 8
    s = belm()
    s.set_timesteps(n)
    s.set_begin_index(k)
    x0 = data()
    ts = s.timesteps[k:]
    x = s.add_noise(x0, noise(), ts[:1])
    out = x
    for t in ts:
        out = s.step(model_fn()(out, t), t, out).prev_sample
    assert s.step_index == n and s.begin_index == k
    # reference from the coefficient tables with plain float64 arithmetic
    grid = SCHED.grid(SCHED.timesteps(n, "linspace"))
    ddim, ob = coefficients.ddim(grid), coefficients.obelm(grid)
    tl = grid.timesteps.tolist()
    eps = MODEL.eps_fn(SCHED)
    prev, cur = x, ddim[k, 1] * x + ddim[k, 2] * eps(x, tl[k])
    for j in range(k + 1, n):
        prev, cur = cur, ob[j, 0] * prev + ob[j, 1] * cur + ob[j, 2] * eps(cur, tl[j])
    assert rel(out, cur) < 1e-12
    # without set_begin_index the first timestep passed decides where the run starts
    r = belm()
    r.set_timesteps(n)
    y = x
    for t in ts:
        y = r.step(model_fn()(y, t), t, y).prev_sample
    assert torch.equal(y, out)


def test_custom_timesteps():
    ts = [901, 700, 455, 300, 120, 33, 0]
    s = belm()
    s.set_timesteps(timesteps=ts)
    assert s.timesteps.tolist() == ts and s.num_inference_steps == len(ts)
    x = noise()
    grid = SCHED.grid(torch.tensor(ts))
    ddim, ob = coefficients.ddim(grid), coefficients.obelm(grid)
    eps = MODEL.eps_fn(SCHED)
    prev, cur = x, ddim[0, 1] * x + ddim[0, 2] * eps(x, ts[0])
    for j in range(1, len(ts)):
        prev, cur = cur, ob[j, 0] * prev + ob[j, 1] * cur + ob[j, 2] * eps(cur, ts[j])
    assert rel(run(s, model_fn(), x), cur) < 1e-12


def test_inference_mode_and_no_grad():
    for ctx in (torch.inference_mode, torch.no_grad):
        s = belm()
        s.set_timesteps(10)
        with ctx():
            out = run(s, model_fn(), noise())
        ref = belm()
        ref.set_timesteps(10)
        assert torch.equal(out, run(ref, model_fn(), noise()))


@pytest.mark.parametrize("state_dtype", [None, "float64"])
def test_tensors_returned_or_given_are_never_written(state_dtype):
    """Each step writes a fresh tensor: what the scheduler returned earlier (kept by a caller,
    or a view of it), the samples it was given, and a latent pair's tensors stay as they were."""
    fn = model_fn()
    s = belm_set(12, state_dtype=state_dtype)
    x, kept, views = noise(torch.float32), [], []
    given = [(x, x.clone())]
    for t in s.timesteps:
        out = s.step(fn(x, t), t, x).prev_sample
        assert out is not x and out.data_ptr() != x.data_ptr()
        x = out
        kept.append((x, x.clone()))
        views.append((x[0], x[0].clone()))
        given.append((x, x.clone()))
    assert all(torch.equal(a, b) for a, b in kept + views + given)
    assert torch.equal(x, run(belm_set(12, state_dtype=state_dtype), fn, noise(torch.float32)))
    # the pair given to set_latent_pair, and its wide states, are unchanged by the run
    inv = belm_set(12, BELMInverseScheduler, state_dtype="float64")
    run(inv, fn, data(torch.float32))
    pair = inv.latent_pair
    copies = [t.clone() for t in (*pair, *pair.state)]
    s.set_latent_pair(pair)
    s.set_timesteps(12)
    run(s, fn, pair.x_T2)
    assert all(torch.equal(a, b) for a, b in zip((*pair, *pair.state), copies, strict=True))


@pytest.mark.parametrize("sample_dtype,state_dtype", [(torch.float16, "float32"),
                                                       (torch.float32, "float64")])
def test_wide_state_dtype_round_trip(sample_dtype, state_dtype):
    """The model sees the narrow samples; the states stay wide, so inversion and regeneration
    evaluate the model on the same inputs and only the final rounding remains."""
    x0 = data(sample_dtype)
    errors = {}
    for wide in (None, state_dtype):
        inv = belm(BELMInverseScheduler, state_dtype=wide)
        inv.set_timesteps(20)
        kept = []
        x = x0
        for t in inv.timesteps:
            x = inv.step(model_fn()(x, t), t, x).prev_sample
            kept.append((x, x.clone()))
        assert all(torch.equal(a, b) for a, b in kept)  # returned tensors are never rewritten
        pair = inv.latent_pair
        assert pair.x_T.dtype == sample_dtype
        assert (pair.state is None) == (wide is None)
        s = belm()  # no state_dtype in its config: a pair's wide state is continued anyway
        s.set_latent_pair(pair)
        s.set_timesteps(20)
        errors[wide] = rel(run(s, model_fn(), pair.x_T2), x0)
    final_rounding = torch.finfo(sample_dtype).eps
    assert errors[state_dtype] <= final_rounding
    assert errors[None] > errors[state_dtype]


@pytest.mark.parametrize("state_dtype", [None, "float64"])
def test_states_are_contiguous_so_a_stored_pair_regenerates_exactly(state_dtype):
    """A model's output bits can depend on its input's memory layout (convolutions pick other
    kernels for channels-last), and a pair stored with safetensors comes back contiguous. The
    scheduler keeps every state contiguous, so the regeneration from such a copy feeds the model
    what the inversion fed it. The model here is off by 1e-3 on any other layout."""
    def layout_sensitive(x, t):
        eps = model_fn()(x, t)
        return eps if x.is_contiguous() else eps + 1e-3

    x0 = data(torch.float32).contiguous(memory_format=torch.channels_last)  # as a VAE may give
    inv = belm(BELMInverseScheduler, state_dtype=state_dtype)
    inv.set_timesteps(10)
    run(inv, layout_sensitive, x0)
    pair = inv.latent_pair
    assert all(t.is_contiguous() for t in (*pair, *(pair.state or ())))
    stored = LatentPair(*(t.contiguous() for t in pair), pair.timesteps,
                        None if pair.state is None else tuple(t.contiguous() for t in pair.state))
    s = belm(state_dtype=state_dtype)
    s.set_latent_pair(stored)
    s.set_timesteps(10)
    out = run(s, layout_sensitive, stored.x_T2)
    # the float32-state round trip's rounding (as test_inverse_then_sample_round_trip bounds it);
    # a layout mismatch would give ~1e-3
    assert rel(out, x0) <= (EPS32 if state_dtype else 1e3 * EPS32)


# ------------------------------------------------------------------ bad input: clear errors


def test_unsupported_prediction_type():
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        BELMScheduler(prediction_type="flow")
    s = BELMScheduler()
    s.register_to_config(prediction_type="x0")  # e.g. edited after construction
    with pytest.raises(ValueError, match="unsupported prediction_type 'x0'"):
        s.set_timesteps(10)


def test_bad_config_values():
    with pytest.raises(ValueError, match="backend must be one of"):
        BELMScheduler(backend="fast")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        BELMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        BELMScheduler(state_dtype="float16")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        BELMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas must hold num_train_timesteps=1000"):
        BELMScheduler(trained_betas=[0.1, 0.2])


def test_unavailable_backend_fails_early_and_a_failed_step_can_be_retried():
    s = belm(backend="cuda")
    with pytest.raises(bk.BackendUnavailableError, match="backend 'cuda' is not available on cpu"):
        s.set_timesteps(10)
    # a step whose op fails (here: a backend switched after set_timesteps) keeps the state
    s, ref = belm_set(10), belm_set(10)
    fn = model_fn()
    x = y = noise(torch.float32)
    for i, t in enumerate(s.timesteps):
        if i == 3:
            s.register_to_config(backend="cuda")
            with pytest.raises(bk.BackendUnavailableError):
                s.step(fn(x, t), t, x)
            s.register_to_config(backend="auto")
        x = s.step(fn(x, t), t, x).prev_sample
        y = ref.step(fn(y, t), t, y).prev_sample
    assert torch.equal(x, y)


def test_step_before_set_timesteps():
    for cls in (BELMScheduler, BELMInverseScheduler):
        s = cls()
        x = noise()
        with pytest.raises(ValueError, match=r"before set_timesteps\(\)"):
            s.step(x, 999, x)


def test_timestep_not_in_schedule_or_out_of_order():
    s = belm_set(10)
    x = noise()
    with pytest.raises(ValueError, match="timestep 998 is not in the schedule"):
        s.step(x, 998, x)
    with pytest.raises(ValueError, match="timestep 12.5 is not in the schedule"):
        s.step(x, 12.5, x)
    ts = s.timesteps
    y = s.step(model_fn()(x, ts[0]), ts[0], x).prev_sample
    with pytest.raises(ValueError, match=r"not the next one of the schedule: step 1 of 10 "
                                         r"expects timestep 888"):
        s.step(model_fn()(y, ts[2]), ts[2], y)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(y, torch.tensor(5), y)
    for t in ts[1:]:
        y = s.step(model_fn()(y, t), t, y).prev_sample
    with pytest.raises(ValueError, match="all 10 steps of this schedule are done"):
        s.step(y, ts[-1], y)


def test_second_latent_must_match():
    s = belm()
    x = noise(torch.float32)
    with pytest.raises(ValueError, match="x_T2 must have x_T's shape"):
        s.set_latent_pair(x, x[:1])
    with pytest.raises(ValueError, match="x_T2 must have x_T's dtype"):
        s.set_latent_pair(x, x.half())
    with pytest.raises(ValueError, match="x_T2 must have x_T's device"):
        s.set_latent_pair(x, torch.empty_like(x, device="meta"))
    with pytest.raises(TypeError, match="x_T2 must be a torch.Tensor"):
        s.set_latent_pair(x, [1.0])


def test_pair_run_must_start_from_x_T2_on_the_same_grid():
    inv = belm(BELMInverseScheduler)
    inv.set_timesteps(10)
    x0 = data()
    run(inv, model_fn(), x0)
    pair = inv.latent_pair
    s = belm()
    s.set_latent_pair(pair)
    with pytest.raises(ValueError, match=r"made on the timesteps .* \(10 values\) but the "
                                         r"scheduler is set to .* \(12 values\)"):
        s.set_timesteps(12)
    s.set_timesteps(10)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="not the x_T2 given to set_latent_pair: pass latents="):
        s.step(model_fn()(pair.x_T, t), t, pair.x_T)
    with pytest.raises(ValueError, match="its dtype is torch.float32"):
        s.step(pair.x_T2.float(), t, pair.x_T2.float())
    # still armed after the failed attempts
    assert rel(run(s, model_fn(), pair.x_T2), x0) < 1e-12


def test_latent_pair_records_its_grid_and_survives_pickling():
    inv = belm_set(8, BELMInverseScheduler, state_dtype="float64")
    x0 = data(torch.float32)
    run(inv, model_fn(), x0)
    pair = inv.latent_pair
    ts = belm_set(8).timesteps.tolist()
    assert pair.grid == {"kind": BELMScheduler._grid_kind, "timesteps": tuple(ts),
                         "alphas_cumprod": tuple(SCHED.alphas_cumprod[ts].tolist())}
    assert pair.timesteps == pair.grid["timesteps"]
    back = pickle.loads(pickle.dumps(pair))
    assert isinstance(back, LatentPair) and back.grid == pair.grid
    assert all(torch.equal(a, b)
               for a, b in zip((*back, *back.state), (*pair, *pair.state), strict=True))
    s = belm()
    s.set_latent_pair(back)
    s.set_timesteps(8)
    assert rel(run(s, model_fn(), back.x_T2), x0) <= EPS32  # float64 states: final rounding
    # the same timesteps with other noise levels (another beta schedule) are another grid
    t = BELMScheduler(beta_schedule="linear", timestep_spacing="linspace")
    t.set_latent_pair(pair)
    with pytest.raises(ValueError, match="made on the alphas_cumprod"):
        t.set_timesteps(8)
    # the record is generic: a key this scheduler's grid does not have is a mismatch
    other = LatentPair(*pair, state=pair.state, grid={**pair.grid, "sigmas": (1.0, 0.5, 0.0)})
    s.set_latent_pair(other)
    with pytest.raises(ValueError, match=r"made on a grid with sigmas \[1.0, 0.5, 0.0\] \(3 "
                                         r"values\), which BELMScheduler's grid does not have"):
        s.set_timesteps(8)


def test_set_latent_pair_after_a_run_on_another_grid():
    """A scheduler that last ran 12 steps can be armed with a pair made on 8: the pair's run
    needs set_timesteps(8) (a pipeline calls it); stepping on the stale grid is refused."""
    inv = belm_set(8, BELMInverseScheduler)
    x0 = data()
    run(inv, model_fn(), x0)
    s = belm_set(12)
    run(s, model_fn(), noise())
    s.set_latent_pair(inv.latent_pair)
    with pytest.raises(ValueError, match=r"before set_timesteps\(\)"):
        s.step(x0, 999, x0)
    s.set_timesteps(8)
    assert rel(run(s, model_fn(), inv.latent_pair.x_T2), x0) < 1e-12
    # armed after set_timesteps on the pair's own grid: the N-1 timesteps are published at once
    s.set_timesteps(8)
    s.set_latent_pair(inv.latent_pair)
    assert len(s.timesteps) == 7
    assert rel(run(s, model_fn(), inv.latent_pair.x_T2), x0) < 1e-12


def test_inverse_must_start_at_the_clean_state():
    inv = belm_set(5, cls=BELMInverseScheduler)
    inv.set_begin_index(2)
    x = data()
    t = inv.timesteps[2]
    with pytest.raises(ValueError, match=r"must start at the clean state \(step 0\), got step 2"):
        inv.step(x, t, x)


def test_latent_pair_before_the_end():
    inv = belm(BELMInverseScheduler)
    inv.set_timesteps(5)
    x = data()
    t = inv.timesteps[0]
    inv.step(model_fn()(x, t), t, x)
    with pytest.raises(ValueError, match=r"not finished \(1 of 5 steps done\)"):
        _ = inv.latent_pair


def test_replaced_sample_is_detected():
    fn = model_fn()
    s = belm_set(10)
    ts = s.timesteps
    x = noise(torch.float32)
    x = s.step(fn(x, ts[0]), ts[0], x).prev_sample
    x = s.step(fn(x, ts[1]), ts[1], x).prev_sample
    with pytest.raises(ValueError, match="the sample passed to step\\(\\) is not the prev_sample "
                                         "returned by the previous step \\(different values; was "
                                         "it modified or replaced by a callback\\?\\)"):
        s.step(fn(x, ts[2]), ts[2], x * 1.001)
    with pytest.raises(ValueError, match="shape \\(2, 4, 2, 2\\)"):
        s.step(fn(x[:2], ts[2]), ts[2], x[:2].clone())
    # a value-identical copy is fine (the state still belongs to it)
    y = s.step(fn(x, ts[2]), ts[2], x.clone()).prev_sample
    # an in-place edit of the returned tensor is detected by its version counter
    y.mul_(1.001)
    with pytest.raises(ValueError, match="was modified in place"):
        s.step(fn(y, ts[3]), ts[3], y)


def test_replaced_sample_is_detected_in_inference_mode():
    fn = model_fn()
    with torch.inference_mode():
        s = belm_set(10)
        ts = s.timesteps
        x = noise(torch.float32)
        x = s.step(fn(x, ts[0]), ts[0], x).prev_sample
        x = s.step(fn(x, ts[1]), ts[1], x).prev_sample
        x.add_(1e-3)  # no version counter here: the fingerprint sees it
        with pytest.raises(ValueError, match="was modified in place"):
            s.step(fn(x, ts[2]), ts[2], x)
