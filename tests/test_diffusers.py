"""diffusers integration: BELMScheduler / BELMInverseScheduler / invert, offline.

Scheduler tests in the spirit of diffusers' common scheduler tests (config round trip,
compatibles, step shapes, tuple vs dataclass), exactness against the core sampler with the
analytic Gaussian-mixture model, bad inputs, and pipeline tests with a tiny random
StableDiffusionPipeline (no downloads). The round-trip numbers are printed with
``python -m pytest tests/test_diffusers.py -k pipeline_roundtrip -s -q``.
"""

import logging
import math

import pytest
import torch
from diffusers import (DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       StableDiffusionImg2ImgPipeline)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

import belm_kernels as bk
from belm_kernels import coefficients
from belm_kernels.diffusers import (BELMInverseScheduler, BELMScheduler, LatentPair, invert,
                                    tiny_stable_diffusion_pipeline)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHED = bk.Schedule.from_betas(**SD)
MODEL = bk.GaussianMixture.random(dim=16, num_components=4, seed=0)
SHAPE = (3, 4, 2, 2)  # 3 samples of the 16-dimensional mixture


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


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_inverse_then_sample_round_trip(dtype, tol, spacing):
    x0 = data(dtype)
    inv = BELMInverseScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    inv.set_timesteps(20)
    run(inv, model_fn(), x0)
    x_T, x_T2 = inv.latent_pair
    s = BELMScheduler.from_config(inv.config)
    s.set_latent_pair(x_T, x_T2)
    s.set_timesteps(20)
    assert len(s.timesteps) == 19  # the first (DDIM) step is skipped: N-1 model calls
    calls = []

    def fn(x, t):
        calls.append(int(t))
        return model_fn()(x, t)

    out = run(s, fn, x_T2)
    assert len(calls) == 19
    assert rel(out, x0) < tol, rel(out, x0)
    # the pair was consumed: the next run samples normally from x_T with N calls
    s.set_timesteps(20)
    assert len(s.timesteps) == 20


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


def test_steady_state_writes_in_place_and_keeps_held_tensors_intact():
    s = belm()
    s.set_timesteps(12)
    fn = model_fn()
    x = noise()
    for t in s.timesteps:
        x = s.step(fn(x, t), t, x).prev_sample
    assert s._num_copies == 2  # the two buffers of the run; every later step reuses them

    s.set_timesteps(12)
    x, kept, copies, views = noise(), [], [], []
    for i, t in enumerate(s.timesteps):
        x = s.step(fn(x, t), t, x).prev_sample
        if i % 3 == 0:
            kept.append(x)           # the same tensor object
            copies.append(x.clone())
        if i % 3 == 1:
            views.append((x[0], x[0].clone()))  # a view only
    assert all(torch.equal(k, c) for k, c in zip(kept, copies))
    assert all(torch.equal(v, c) for v, c in views)
    assert torch.equal(x, run(belm_set(12), fn, noise()))


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
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        BELMScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)


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
    with pytest.raises(ValueError, match=r"made on the timesteps .* \(10 steps\) but the "
                                         r"scheduler is set to .* \(12 steps\)"):
        s.set_timesteps(12)
    s.set_timesteps(10)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="not the x_T2 given to set_latent_pair: pass latents="):
        s.step(model_fn()(pair.x_T, t), t, pair.x_T)
    with pytest.raises(ValueError, match="its dtype is torch.float32"):
        s.step(pair.x_T2.float(), t, pair.x_T2.float())
    # still armed after the failed attempts
    assert rel(run(s, model_fn(), pair.x_T2), x0) < 1e-12


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
        inv.latent_pair


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


# ------------------------------------------------------------------ pipelines (tiny, random)


def tiny_pipe(sample_size=16, seed=0):
    pipe = tiny_stable_diffusion_pipeline(seed, sample_size=sample_size)
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g)


def ddim_roundtrip(pipe, x0, pe, ne, n, g):
    """diffusers' DDIMInverseScheduler loop (guidance as the pipeline applies it), then
    DDIMScheduler through the pipeline: the usual, inexact inversion."""
    inv = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(n)
    emb, lat = torch.cat([ne, pe]), x0.clone()
    with torch.no_grad():
        for t in inv.timesteps:
            pred = pipe.unet(torch.cat([lat] * 2), t, encoder_hidden_states=emb,
                             return_dict=False)[0]
            u, c = pred.chunk(2)
            lat = inv.step(u + g * (c - u), t, lat).prev_sample
    belm_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(belm_scheduler.config)
    try:
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=n,
                    guidance_scale=g, output_type="latent").images
    finally:
        pipe.scheduler = belm_scheduler


def image_latents(pipe, image):
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("guidance_scale", [3.0, 7.5])
def test_pipeline_roundtrip_exact(guidance_scale):
    """invert -> set_latent_pair -> pipe(latents=x_T2) through a real StableDiffusionPipeline loop
    with classifier-free guidance, float32, 20 steps; diffusers' DDIM inversion beside it."""
    n, g = 20, guidance_scale
    pipe = tiny_pipe()
    pe, ne = embeds()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x0 = image_latents(pipe, image)  # about unit std, like SD latents
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    errors = {}
    for state_dtype in ("float64", None):  # invert's default, and states kept in float32
        pair = invert(pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                      num_inference_steps=n, guidance_scale=g, state_dtype=state_dtype,
                      progress=False)
        assert (pair.state is None) == (state_dtype is None)
        calls.clear()
        pipe.scheduler.set_latent_pair(pair)
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=pair.x_T2,
                   num_inference_steps=n, guidance_scale=g, output_type="latent").images
        assert len(calls) == n - 1  # the pair skips the first step
        errors[state_dtype] = rel(out, x0)
    err_ddim = rel(ddim_roundtrip(pipe, x0, pe, ne, n, g), x0)
    print(f"\nlatent round trip, float32 pipeline, {n} steps, guidance {g}: "
          f"BELM {errors['float64']:.2e} (invert default, float64 states)  "
          f"BELM {errors[None]:.2e} (float32 states)  "
          f"DDIMInverseScheduler+DDIMScheduler {err_ddim:.2e}")
    assert errors["float64"] <= 1e-6
    assert errors[None] <= (1e-5 if g <= 3 else 1e-4)
    assert err_ddim > 1e-3


def test_pipeline_generation_is_zero_copy_and_matches_a_manual_loop():
    n, g = 12, 7.5
    pipe = tiny_pipe(sample_size=8)
    pe, ne = embeds()
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n,
               guidance_scale=g, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert pipe.scheduler._num_copies == 2  # every step after the first two reuses a buffer
    s = BELMScheduler.from_config(pipe.scheduler.config, backend="torch")
    s.set_timesteps(n)
    x = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    emb = torch.cat([ne, pe])
    with torch.no_grad():
        for t in s.timesteps:
            pred = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=emb,
                             return_dict=False)[0]
            u, c = pred.chunk(2)
            x = s.step(u + g * (c - u), t, x).prev_sample
    assert rel(out, x) < 1e-6


def test_invert_image_with_text_prompt_and_edit():
    """Image in, tokenizer-encoded prompt, regeneration gives the image's latents back."""
    n, g = 8, 5.0
    pipe = tiny_pipe(sample_size=8)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # in [0, 1]
    pair = invert(pipe, image=image, prompt="a photo of a cat", negative_prompt="blurry",
                  num_inference_steps=n, guidance_scale=g, progress=False)
    x_T, x_T2 = pair
    assert x_T.dtype == torch.float32 and pair.state[0].dtype == torch.float64
    x0 = image_latents(pipe, image)
    pipe.scheduler.set_latent_pair(pair)
    out = pipe("a photo of a cat", negative_prompt="blurry", latents=x_T2, num_inference_steps=n,
               guidance_scale=g, output_type="latent").images
    assert rel(out, x0) <= 1e-6
    # plain tensors work too (without the float64 states: float32 rounding, still tiny)
    pipe.scheduler.set_latent_pair(x_T, x_T2)
    out = pipe("a photo of a cat", negative_prompt="blurry", latents=x_T2, num_inference_steps=n,
               guidance_scale=g, output_type="latent").images
    assert rel(out, x0) <= 1e-4
    pipe.scheduler.set_latent_pair(pair)
    edit = pipe("a photo of a dog", negative_prompt="blurry", latents=x_T2, num_inference_steps=n,
                guidance_scale=g, output_type="np").images
    assert edit.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(edit)).all())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_pipeline_roundtrip_other_prediction_types(prediction_type):
    n, g = 8, 5.0
    pipe = tiny_pipe(sample_size=8)
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config,
                                               prediction_type=prediction_type)
    pe, ne = embeds()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                  num_inference_steps=n, guidance_scale=g, progress=False)
    pipe.scheduler.set_latent_pair(pair)
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=pair.x_T2,
               num_inference_steps=n, guidance_scale=g, output_type="latent").images
    assert rel(out, x0) <= 1e-6


def test_invert_batch_with_images_per_prompt():
    """Two latents for one prompt: invert and regenerate with num_images_per_prompt=2."""
    n, g = 6, 4.0
    pipe = tiny_pipe(sample_size=8)
    pe, ne = embeds()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                  num_inference_steps=n, guidance_scale=g, progress=False)
    pipe.scheduler.set_latent_pair(pair)
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_images_per_prompt=2,
               latents=pair.x_T2, num_inference_steps=n, guidance_scale=g,
               output_type="latent").images
    assert rel(out, x0) <= 1e-6
    with pytest.raises(ValueError, match="not a multiple of the prompt batch 2"):
        invert(pipe, latents=x0[:1], prompt_embeds=torch.cat([pe, pe]),
               negative_prompt_embeds=torch.cat([ne, ne]), num_inference_steps=n)


def test_pipeline_pair_errors():
    n = 6
    pipe = tiny_pipe(sample_size=8)
    pe, ne = embeds()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pair = invert(pipe, latents=x0, prompt_embeds=pe, negative_prompt_embeds=ne,
                  num_inference_steps=n, guidance_scale=3.0, progress=False)
    pipe.scheduler.set_latent_pair(pair)
    with pytest.raises(ValueError, match="pass latents=x_T2"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=pair.x_T, num_inference_steps=n,
             guidance_scale=3.0, output_type="latent")
    with pytest.raises(ValueError, match="invert and regenerate with the same num_inference_steps"):
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=pair.x_T2,
             num_inference_steps=n + 1, guidance_scale=3.0, output_type="latent")
    with pytest.raises(ValueError, match="exactly one of image or latents"):
        invert(pipe, prompt_embeds=pe, num_inference_steps=n)


@pytest.mark.filterwarnings("ignore:`callback")  # the legacy callback is deprecated
def test_pipeline_callbacks():
    n, g = 6, 4.0
    pipe = tiny_pipe(sample_size=8)
    pe, ne = embeds()
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n, guidance_scale=g,
              output_type="latent")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = pipe(**kw, generator=gen()).images

    # a callback that looks at (and keeps references to) the latents: no false alarm, same result,
    # and the kept tensors are not overwritten by later steps
    kept = []

    def keep(p, i, t, cb):
        kept.append((cb["latents"], cb["latents"].clone()))
        return cb

    out = pipe(**kw, generator=gen(), callback_on_step_end=keep).images
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in kept)

    # a callback returning a value-identical copy is fine
    out = pipe(**kw, generator=gen(),
               callback_on_step_end=lambda p, i, t, cb: {"latents": cb["latents"].clone()}).images
    assert torch.equal(out, ref)

    # a callback that replaces the latents: detected at the next step
    def replace(p, i, t, cb):
        return {"latents": cb["latents"] * 1.01} if i == 2 else cb

    with pytest.raises(ValueError, match=r"not the prev_sample returned by the previous step .*"
                                         r"modified or replaced by a callback"):
        pipe(**kw, generator=gen(), callback_on_step_end=replace)

    # the legacy callback editing the latents in place: detected too
    def edit(i, t, latents):
        if i == 1:
            latents.mul_(1.01)

    with pytest.raises(ValueError, match="modified in place"):
        pipe(**kw, generator=gen(), callback=edit, callback_steps=1)

    # and the scheduler works again on the next run
    assert torch.equal(pipe(**kw, generator=gen()).images, ref)


def test_img2img_pipeline_uses_set_begin_index():
    n, strength = 10, 0.5
    pipe = tiny_pipe(sample_size=8)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    pe, ne = embeds()
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = []

    def record(p, i, t, cb):
        seen.append(int(t))
        return cb

    out = img2img(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, strength=strength,
                  num_inference_steps=n, guidance_scale=3.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=record).images
    s = img2img.scheduler
    assert s.begin_index == n - int(n * strength)
    assert seen == s.timesteps.tolist()[s.begin_index:]
    assert s.step_index == n
    assert bool(torch.isfinite(out).all())


def test_pipeline_custom_timesteps():
    pipe = tiny_pipe(sample_size=8)
    pe, ne = embeds()
    ts = [999, 800, 600, 400, 200, 1]
    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, timesteps=ts, guidance_scale=2.0,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert pipe.scheduler.timesteps.tolist() == ts and bool(torch.isfinite(out).all())
