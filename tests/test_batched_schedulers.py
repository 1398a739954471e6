"""The fused diffusers schedulers in the batched stepper, next to the BELM samplers: each request's
result against its fused scheduler (or plain sampler) run alone on it, the noise of each request
from its own generator, model-input scaling, history rings, group merging, the admission checks
of scheduler requests, and the plug-in contract.

The models are the analytic Gaussian mixture of test_batched (per-sample computations, so batch
invariant): every result must equal the one computed alone, to the bit, on a backend that runs
every form of the fused op by the same chain of multiply-adds (``same_chain_in_every_form``: the
torch reference always; the compiled backends once their K-term kernels run every form).
"""

import copy
import inspect
import math
import random

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from test_batched import (  # noqa: E402
    DIM,
    MIXTURE,
    SCHED,
    _snapshot,
    assert_same,
    batched_model,
    plain,
    random_request,
)
from test_fused_schedulers import (  # noqa: E402
    FLUX_DEV,
    FLUX_SCHNELL,
    LCM,
    SD3,
    SD15,
    SDXL,
    WAN,
    flux_timesteps,  # noqa: E402
)

import belm_kernels as bk  # noqa: E402
from belm_kernels.batched import BatchedStepper, Layout, Plan  # noqa: E402
from belm_kernels.batched.plugin import merged, relayout  # noqa: E402
from belm_kernels.diffusers import fuse  # noqa: E402
from belm_kernels.diffusers.fused import UnsupportedOptionError  # noqa: E402

AC = SCHED.alphas_cumprod


ALPHA = torch.tensor([math.sqrt(a) for a in AC.tolist()], dtype=torch.float64)
SIGMA = torch.tensor([math.sqrt(1 - a) for a in AC.tolist()], dtype=torch.float64)


def vp_model():
    """model(x, t, cond): the mixture's eps at x - cond, at integer timesteps as test_batched's
    model (and the plain samplers' eps_fn: alpha and sigma from math.sqrt), at fractional ones
    (Euler's interpolated sigmas) with alphas_cumprod interpolated."""
    exact = batched_model()

    def model(x, t, cond):
        if t.dtype == torch.long:
            return exact(x, t, cond)
        lo = t.floor().long()
        w = t - lo
        ac = AC[lo] * (1 - w) + AC[(lo + 1).clamp(max=len(AC) - 1)] * w
        alpha = torch.where(w == 0, ALPHA[lo], ac.sqrt())
        sigma = torch.where(w == 0, SIGMA[lo], (1 - ac).sqrt())
        return MIXTURE.eps(x - cond, alpha, sigma).to(x.dtype)

    return model


def flow_model(x, s, cond):
    return MIXTURE.velocity(x - cond, s).to(x.dtype)


def same_chain_in_every_form(backend: str) -> bool:
    """Whether ``backend`` computes one chain of multiply-adds to the same bits in every form of
    the op (in place or not, with zero terms, with more outputs): what makes a zero-padded group
    layout give a request's result alone bit for bit. The compiled backends run only the in-place
    three-term form themselves until their K-term kernels land, the rest on the torch reference,
    whose rounding differs (a multiply and an add where they fuse)."""
    g = torch.Generator().manual_seed(0)
    x, t, u = torch.randn(3, 4096, generator=g)
    alone = bk.lincomb(x, [t], [0.7, -1.3], backend=backend)
    in_place = bk.lincomb_(x.clone(), [t, u], [0.7, -1.3, 0.0], backend=backend)
    two = bk.lincomb(x, [u, t], [[0.7, 0.0, -1.3], [1.0, 0.5, 0.0]],
                     out=[None, None], backend=backend)
    return torch.equal(alone, in_place) and torch.equal(alone, two[0])


def exact_backend(backend: str) -> str:
    if not same_chain_in_every_form(backend):
        pytest.skip(f"backend {backend!r} does not run every form of the op by one chain of "
                    "multiply-adds yet (its K-term kernels); results agree to rounding only")
    return backend


BACKENDS = ["torch"] + [b for b in bk.available_backends("cpu") if b != "torch"]


def model_time(stepper, sched, k):
    """What the stepper gives the model at step k of a scheduler request (one sample)."""
    if isinstance(stepper.schedule, bk.FlowSchedule):
        t = torch.tensor([float(sched.sigmas[k])], dtype=stepper.time_dtype)
    else:
        t = torch.tensor([sched.timesteps[k].item()]).to(stepper.time_dtype)
    return t.to(stepper.device)


def alone(stepper, req, x, cond, generator, step_kwargs, backend):
    """The request's fused scheduler run alone on it (a batch of one): scale_model_input, the
    model, step, as a pipeline's loop calls them."""
    s = copy.deepcopy(req.sampler)
    s._fused_backend = backend
    start = getattr(s, "begin_index", None) or 0
    xs, c = x[None], cond[None]
    takes = inspect.signature(s.step).parameters
    kw = dict(step_kwargs, **({"generator": generator} if "generator" in takes else {}))
    scale = getattr(s, "scale_model_input", lambda x, t: x)  # flow Euler has none
    for k in range(start, len(s.timesteps)):
        t = s.timesteps[k]
        out = stepper.model(scale(xs, t), model_time(stepper, s, k), c)
        xs = s.step(out, t, xs, **kw).prev_sample
    return xs[0]


def steps(n):
    return {"num_inference_steps": n}


# (name, scheduler class, config, overrides, step arguments, steps to draw from, the grid's
# set_timesteps arguments for a number of steps)
VP_SCHEDULERS = [
    ("DPM++ 2M Karras", DPMSolverMultistepScheduler, SD15, dict(use_karras_sigmas=True), {},
     [20]),
    ("DPM++ 3M", DPMSolverMultistepScheduler, SD15, dict(solver_order=3), {}, [6, 12]),
    ("SDE-DPM++ 2M", DPMSolverMultistepScheduler, SD15,
     dict(algorithm_type="sde-dpmsolver++"), {}, [5, 12]),
    ("UniPC", UniPCMultistepScheduler, SD15, {}, {}, [8]),
    ("UniPC-3 bh1", UniPCMultistepScheduler, SD15,
     dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), {}, [4, 10]),
    ("Euler (SDXL)", EulerDiscreteScheduler, SDXL, {}, {}, [3, 9]),
    ("Euler a (SDXL)", EulerAncestralDiscreteScheduler, SDXL, {}, {}, [4, 11]),
    ("LCM", LCMScheduler, LCM, {}, {}, [1, 4, 8]),
    ("DDIM eta 0.6", DDIMScheduler, SD15, {}, {"eta": 0.6}, [7]),
]


def scheduler_request(rng, gen, dtype, table=VP_SCHEDULERS):
    """A random scheduler job: the scheduler plain, fused, or fused with its grid already set;
    returns (scheduler, options of add(), x, cond, the seed of its generator)."""
    _, cls, config, overrides, step_args, counts, *grid = rng.choice(table)
    sched = cls.from_config({**config, **overrides})
    grid = (grid[0] if grid else steps)(rng.choice(counts))
    how = rng.choice(["plain", "fused", "set"])
    options = dict(step_args, **grid)
    if how != "plain":
        sched = fuse(sched)
    if how == "set":
        sched.set_timesteps(**grid)
        options = dict(step_args)
    x = torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype)
    cond = 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype)
    return sched, options, x, cond, rng.randrange(1 << 30)


def serve_mixed(stepper, jobs, rng, cancel=0.1, graph=False, generator_device="cpu"):
    """Runs jobs (("belm", args) or ("scheduler", args)) through the stepper, joining as slots
    free up and cancelling a few mid-run; returns (request, job) for every job."""
    queue, out = list(jobs), []
    while queue or len(stepper):
        while queue and stepper.free:
            kind, args = queue.pop(0)
            if kind == "belm":
                sampler, direction, x, x_T2, cond = args
                req = stepper.add(x, sampler, direction, x_T2=x_T2, cond=cond)
            else:
                sched, options, x, cond, seed = args
                generator = torch.Generator(generator_device).manual_seed(seed)
                req = stepper.add(x, sched, cond=cond, generator=generator, **options)
            out.append((req, kind, args))
        if len(stepper) > 1 and rng.random() < cancel:
            stepper.cancel(rng.choice(stepper.requests))
        stepper.tick(graph=graph)
    return out


def check_alone(stepper, served, backend, generator_device="cpu"):
    """Every finished request equals its sampler alone on it, to the bit; its generator ends
    where the fused scheduler's alone does (the same draws, in the same order)."""
    finished = 0
    for req, kind, args in served:
        if req.result is None:
            continue
        finished += 1
        if kind == "belm":
            sampler, direction, x, x_T2, cond = args
            assert_same(req.result, plain(req, x, cond, x_T2, backend=backend))
        else:
            sched, options, x, cond, seed = args
            mine = torch.Generator(generator_device).manual_seed(seed)
            step_kwargs = {k: v for k, v in options.items() if k == "eta"}
            expected = alone(stepper, req, x, cond, mine, step_kwargs, backend)
            assert torch.equal(req.result, expected), (req, (req.result - expected).abs().max())
    return finished


# ------------------------------------------------------------------ against the schedulers alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge_bytes", [0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(2))
def test_mixed_stream_matches_each_sampler_alone(seed, dtype, merge_bytes, backend):
    """DPM++ 2M Karras at 20 steps next to UniPC at 8, Euler a with its seed, LCM, SDE-DPM++,
    DDIM with eta, O-BELM inversions and BDIA / DDIM samplings, joining as slots free up and a
    few cancelled mid-run, with one group per layout (merge_bytes=0) or merged groups: every
    result is its sampler's alone on it, bit for bit."""
    backend = exact_backend(backend)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    jobs = [("scheduler", scheduler_request(rng, gen, dtype)) if rng.random() < 0.7 else
            ("belm", random_request(rng, gen, dtype, "cpu")) for _ in range(16)]
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=rng.choice([3, 5]), dtype=dtype,
                        cond_shape=(DIM,), merge_bytes=merge_bytes, backend=backend)
    served = serve_mixed(st, jobs, rng)
    assert check_alone(st, served, backend) >= 10
    assert len(st) == 0


def test_groups_per_layout_or_merged():
    """merge_bytes=0: one group (one op per tick) per layout; by default, on these small
    latents, compatible layouts merge -- all forward requests in one group here, the exact
    inversions in their own (the inverse op takes one direction)."""
    jobs = [(DPMSolverMultistepScheduler.from_config(SD15), {}), (UniPCMultistepScheduler
            .from_config(SD15), {}), (EulerDiscreteScheduler.from_config(SDXL), {}),
            (bk.get_sampler("obelm", SCHED, 6), {}), (bk.get_sampler("obelm", SCHED, 6),
                                                      {"direction": "invert"})]
    layouts = []
    for merge_bytes in (0, None):
        st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=5, dtype=torch.float64,
                            cond_shape=(DIM,), merge_bytes=merge_bytes)
        for sampler, kw in jobs:
            extra = {} if isinstance(sampler, bk.Sampler) else {"num_inference_steps": 6}
            st.add(torch.randn(DIM, dtype=torch.float64), sampler, cond=torch.zeros(
                DIM, dtype=torch.float64), **kw, **extra)
        layouts.append([(g.layout, g.hi - g.lo) for g in st._groups])
    assert [n for _, n in layouts[0]] == [1, 1, 1, 1, 1]
    assert [n for _, n in layouts[1]] == [4, 1] and layouts[1][1][0].inverse
    union = layouts[1][0][0]
    assert union.x == "prev" and union.history == ("x0", "last_sample")


def test_a_merged_group_narrows_when_its_widest_member_leaves():
    """A UniPC request widens the BELM samplings' group; when it is cancelled the group goes back
    to the two-step layout (no padding left to pay), and the others end as alone."""
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=3, dtype=torch.float64,
                        cond_shape=(DIM,), backend="torch")
    gen = torch.Generator().manual_seed(4)
    x, cond = torch.randn(2, 2, DIM, generator=gen, dtype=torch.float64)
    obelm = bk.get_sampler("obelm", SCHED, 8)
    a = st.add(x[0], obelm, cond=cond[0])
    st.tick()
    u = st.add(x[1], UniPCMultistepScheduler.from_config(SD15), cond=cond[1],
               num_inference_steps=6)
    b = st.add(x[1], obelm, cond=cond[1])
    assert len(st._groups) == 1 and st._groups[0].layout.history == ("x0", "last_sample")
    st.tick()
    st.cancel(u)
    assert [g.layout for g in st._groups] == [Layout()]
    st.run()
    for req, i in ((a, 0), (b, 1)):
        assert_same(req.result, plain(req, x[i], cond[i], backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_stream_matches_each_sampler_alone(dtype):
    """A FlowSchedule stepper (its model takes sigmas): flow Euler for SD3 and Flux (dynamic
    shifting, the pipeline's sigmas and mu), stochastic flow Euler with a seed, UniPC with Wan's
    flow sigmas, DPM-Solver++ with flow sigmas, and the flow BELM samplers, all in one stream."""
    table = [
        ("SD3", FlowMatchEulerDiscreteScheduler, SD3, {}, {}, [5, 10]),
        ("Flux dev", FlowMatchEulerDiscreteScheduler, FLUX_DEV, {}, {}, [9, 6], flux_timesteps),
        ("Flux schnell", FlowMatchEulerDiscreteScheduler, FLUX_SCHNELL, {}, {}, [4]),
        ("stochastic", FlowMatchEulerDiscreteScheduler, SD3, dict(stochastic_sampling=True), {},
         [6]),
        ("Wan", UniPCMultistepScheduler, WAN, {}, {}, [8, 12]),
        ("DPM flow", DPMSolverMultistepScheduler, SD15,
         dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), {},
         [7]),
    ]
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    jobs = []
    for k in range(14):
        if k % 4 == 3:  # a flow BELM sampler (sigmas as model times too)
            sampler = bk.get_sampler(rng.choice(["euler", "obelm"]), bk.FlowSchedule(shift=3.0),
                                     rng.randint(3, 9))
            x = torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype)
            jobs.append(("belm", (sampler, ["sample", "invert"][k % 2], x, None,
                                  torch.zeros(DIM, dtype=dtype))))
        else:
            jobs.append(("scheduler", scheduler_request(rng, gen, dtype, table)))
    st = BatchedStepper(flow_model, bk.FlowSchedule(), (DIM,), capacity=4, dtype=dtype,
                        cond_shape=(DIM,), backend="torch")
    served = serve_mixed(st, jobs, rng, cancel=0.05)
    v_fn = MIXTURE.v_fn()
    for req, kind, args in served:
        if kind == "belm" and req.result is not None:
            sampler, direction, x, _, _ = args
            if direction == "sample":
                assert_same(req.result, sampler.sample(v_fn, x[None], backend="torch")[0])
            else:
                assert_same(req.result, tuple(
                    t[0] for t in sampler.invert(v_fn, x[None], backend="torch")))
    assert check_alone(st, [s for s in served if s[1] == "scheduler"], "torch") >= 8


def test_fractional_model_times_need_a_float_time_dtype():
    """Euler with Karras sigmas (or linspace spacing) gives its model fractional timesteps: a
    stepper with time_dtype=torch.float64 runs it next to integer-timestep samplers, bit for bit;
    the default long stepper refuses it, saying so."""
    karras = fuse(EulerDiscreteScheduler.from_config({**SDXL, "use_karras_sigmas": True}))
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=4, dtype=torch.float64,
                        cond_shape=(DIM,))
    z = torch.zeros(DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"request 'k': its model times \[.*\]\.\.\. are not "
                       r"numbers that the stepper's time_dtype torch.int64 holds exactly "
                       r"\(fractional timesteps.*time_dtype=torch.float64"):
        st.add(z, karras, cond=z, num_inference_steps=10, name="k")
    assert len(st) == 0
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=4, dtype=torch.float64,
                        cond_shape=(DIM,), time_dtype=torch.float64, backend="torch")
    gen = torch.Generator().manual_seed(0)
    jobs = [("scheduler", (karras, {"num_inference_steps": 10}, *torch.randn(
                2, DIM, generator=gen, dtype=torch.float64), 1)),
            ("scheduler", (EulerAncestralDiscreteScheduler.from_config(SD15),
                           {"num_inference_steps": 7}, *torch.randn(2, DIM, generator=gen,
                                                                   dtype=torch.float64), 2)),
            ("scheduler", (DPMSolverMultistepScheduler.from_config(SD15),
                           {"num_inference_steps": 9}, *torch.randn(2, DIM, generator=gen,
                                                                   dtype=torch.float64), 3)),
            ("belm", (bk.get_sampler("obelm", SCHED, 8), "invert",
                      *torch.randn(1, DIM, generator=gen, dtype=torch.float64), None, z))]
    served = serve_mixed(st, jobs, random.Random(0), cancel=0)
    assert st._t.dtype == torch.float64
    assert not float(served[0][0].sampler.timesteps[1]).is_integer()  # really fractional
    # the plain O-BELM sampler's eps_fn takes integer timesteps; the float64 ones equal them
    assert check_alone(st, served, "torch") == 4


def test_float16_latents_as_alone():
    """float16 states (float32 math): the model input scaled as torch divides a float16 sample
    by a float32 scalar, float32 SDE noise in its own buffer next to float16 noise, history in
    float16 -- each request still as its fused scheduler alone."""
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    table = [row for row in VP_SCHEDULERS if row[0] in ("Euler (SDXL)", "Euler a (SDXL)",
                                                        "SDE-DPM++ 2M", "UniPC", "LCM")]
    jobs = [("scheduler", scheduler_request(rng, gen, torch.float16, table)) for _ in range(8)]
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=4, dtype=torch.float16,
                        cond_shape=(DIM,), backend="torch")
    served = serve_mixed(st, jobs, rng, cancel=0)
    assert check_alone(st, served, "torch") == 8


def test_a_scheduler_set_to_begin_later_runs_from_there():
    """img2img: a scheduler whose begin_index is set runs from that step (as its pipeline)."""
    sched = fuse(DPMSolverMultistepScheduler.from_config(SD15))
    sched.set_timesteps(12)
    sched.set_begin_index(5)
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=2, dtype=torch.float64,
                        cond_shape=(DIM,), backend="torch")
    x, cond = torch.randn(2, DIM, dtype=torch.float64)
    req = st.add(x, sched, cond=cond)
    assert req.num_steps == 7
    st.run()
    assert torch.equal(req.result, alone(st, req, x, cond, None, {}, "torch"))


def test_history_survives_a_ring_that_grows_mid_run():
    """A DPM-Solver++ 2M run (x0 read one step back: a ring of 2) is under way when a UniPC of
    order 3 joins (x0 read three steps back: the ring grows to 4); the first request's history is
    carried over and both end as alone."""
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=2, dtype=torch.float64,
                        cond_shape=(DIM,), backend="torch", merge_bytes=0)
    gen = torch.Generator().manual_seed(2)
    x, cond, y = torch.randn(3, DIM, generator=gen, dtype=torch.float64)
    a = st.add(x, DPMSolverMultistepScheduler.from_config(SD15), cond=cond,
               num_inference_steps=10)
    for _ in range(3):
        st.tick()
    assert len(st._rings["x0"]) == 2
    b = st.add(y, UniPCMultistepScheduler.from_config({**SD15, "solver_order": 3}), cond=cond,
               num_inference_steps=6)
    assert len(st._rings["x0"]) == 4
    st.run()
    for req, start in ((a, x), (b, y)):
        assert torch.equal(req.result, alone(st, req, start, cond, None, {}, "torch"))


def test_the_callers_scheduler_and_generator_are_its_own():
    """add() sets the timesteps of a copy (the caller's scheduler keeps its grid) and draws from
    the request's generator only: the global generator does not move."""
    plain_sched = EulerAncestralDiscreteScheduler.from_config(SDXL)
    fused = fuse(EulerAncestralDiscreteScheduler.from_config(SDXL))
    fused.set_timesteps(4)
    before = fused.timesteps.clone()
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=2, dtype=torch.float64,
                        cond_shape=(DIM,))
    z = torch.zeros(DIM, dtype=torch.float64)
    state = torch.get_rng_state()
    st.add(z, plain_sched, cond=z, num_inference_steps=9, generator=torch.Generator())
    st.add(z, fused, cond=z, num_inference_steps=6, generator=torch.Generator())
    st.run()
    assert plain_sched.num_inference_steps is None and torch.equal(fused.timesteps, before)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ allocations per tick


def test_the_steppers_own_work_allocates_nothing(monkeypatch):
    """A tick of scaled (Euler), noisy (Euler a: drawn in place) and multistep (DPM-Solver++,
    UniPC: rings) requests: with the fused ops and the model taken out, nothing is allocated --
    the gathers, the per-sample model-input scaling, the ring indexing and the noise draws write
    into the stepper's buffers. (test_batched compares a tick with the bare ops.)"""
    from test_batched import _allocations

    from belm_kernels.batched import stepper as core

    eps = torch.zeros(4, DIM)
    st = BatchedStepper(lambda x, t: eps[:x.shape[0]], SCHED, (DIM,), capacity=4,
                        merge_bytes=0)
    for cls, config in [(EulerDiscreteScheduler, SDXL), (EulerAncestralDiscreteScheduler, SDXL),
                        (DPMSolverMultistepScheduler, SD15), (UniPCMultistepScheduler, SD15)]:
        st.add(torch.randn(DIM), cls.from_config(config), num_inference_steps=20,
               generator=torch.Generator())
    st.tick()
    calls = []
    for op in ("_apply", "_lincomb_ext"):  # the public op, or the kernel op called directly
        monkeypatch.setattr(core, op, lambda *args, **kw: calls.append(args))
    assert _allocations(st.tick) == []
    assert len(calls) == 4 and st._scaled == 2 and len(st._noisy) == 1


# ------------------------------------------------------------------ admission checks


@pytest.fixture
def busy():
    """A stepper mid-run with scheduler and BELM requests (rings, noise, scales allocated)."""
    st = BatchedStepper(vp_model(), SCHED, (DIM,), capacity=5, dtype=torch.float64,
                        cond_shape=(DIM,))
    gen = torch.Generator().manual_seed(0)
    z = torch.zeros(DIM, dtype=torch.float64)
    for sampler, kw in [(UniPCMultistepScheduler.from_config(SD15), {}),
                        (EulerAncestralDiscreteScheduler.from_config(SDXL),
                         {"generator": torch.Generator().manual_seed(1)}),
                        (bk.get_sampler("obelm", SCHED, 9), {"direction": "invert"})]:
        extra = {} if isinstance(sampler, bk.Sampler) else {"num_inference_steps": 9}
        st.add(torch.randn(DIM, generator=gen, dtype=torch.float64), sampler, cond=z, **kw,
               **extra)
        st.tick()
    return st


def snapshot(st):
    bufs, slots, ticks = _snapshot(st)
    extra = [t.clone() for t in (st._noise, st._scales, *st._rings.values())]
    return bufs + extra, slots, ticks, [(g.layout, g.lo, g.hi) for g in st._groups]


Z = torch.zeros(DIM, dtype=torch.float64)


def dpm(**overrides):
    return DPMSolverMultistepScheduler.from_config({**SD15, **overrides})


class OtherSchedule:
    """Neither a VP Schedule nor a FlowSchedule."""


@pytest.mark.parametrize("call,exc,match", [
    (lambda st: st.add(Z, dpm(), "invert", cond=Z, num_inference_steps=5, name="i"),
     ValueError, r"request 'i': a diffusers scheduler only samples \(direction='sample'\); "
                 r"exact inversion needs a two-step sampler"),
    (lambda st: st.add(Z, dpm(), x_T2=Z, cond=Z, num_inference_steps=5),
     ValueError, "x_T2 .* is for two-step samplers"),
    (lambda st: st.add(Z, dpm(), cond=Z, num_inference_steps=5, generator=3),
     TypeError, "generator must be a torch.Generator .* got int"),
    (lambda st: st.add(Z, dpm(), cond=Z, name="n"), ValueError,
     "request 'n': its scheduler has no timesteps yet: pass num_inference_steps="),
    (lambda st: st.add(Z, dpm(), cond=Z, num_inference_steps=5, steps=5, name="kw"),
     TypeError, "request 'kw': .*unexpected keyword argument 'steps'"),
    (lambda st: st.add(Z, dpm(thresholding=True), cond=Z, num_inference_steps=5, name="t"),
     UnsupportedOptionError, "request 't': DPMSolverMultistepScheduler with thresholding=True "
                             "is not implemented by the fused step"),
    (lambda st: st.add(Z, PNDMScheduler.from_config(SD15), cond=Z, num_inference_steps=5),
     TypeError, "fuse supports .* got PNDMScheduler"),
    (lambda st: st.add(Z, dpm(beta_schedule="linear"), cond=Z, num_inference_steps=5,
                       name="b"),
     ValueError, "request 'b': its sampler's schedule does not fit the stepper's model "
                 r"\(alphas_cumprod differ from the model's\)"),
    (lambda st: st.add(Z, dpm(num_train_timesteps=500), cond=Z, num_inference_steps=5),
     ValueError, r"num_train_timesteps=500, the model's is 1000"),
    (lambda st: st.add(Z, FlowMatchEulerDiscreteScheduler.from_config(SD3), cond=Z,
                       num_inference_steps=5, name="f"),
     ValueError, "request 'f': FlowMatchEulerDiscreteScheduler with flow sigmas gives sigmas, "
                 "but the stepper's model takes the timesteps of a VP Schedule"),
    (lambda st: st.add(Z, dpm(use_flow_sigmas=True, prediction_type="flow_prediction"), cond=Z,
                       num_inference_steps=5),
     ValueError, "DPMSolverMultistepScheduler with flow sigmas gives sigmas"),
    (lambda st: st.add(Z, EulerDiscreteScheduler.from_config(
        {**SDXL, "timestep_type": "continuous", "prediction_type": "v_prediction"}), cond=Z,
        num_inference_steps=5),
     ValueError, "timestep_type='continuous' gives its model other times"),
    (lambda st: st.add(Z, bk.get_sampler("obelm", SCHED, 5), cond=Z, num_inference_steps=5,
                       name="o"),
     TypeError, "request 'o': a two-step sampler takes no options .* got num_inference_steps"),
    (lambda st: st.add(Z, bk.get_sampler("obelm", SCHED, 5), cond=Z,
                       generator=torch.Generator()),
     TypeError, "takes no options .* got generator"),
    (lambda st: st.add(Z, object(), cond=Z), TypeError,
     "it also runs the diffusers schedulers that belm_kernels.diffusers.fuse supports"),
    # a plan that fits no op: UniPC of order 6 reads x and 7 terms
    (lambda st: st.add(Z, UniPCMultistepScheduler.from_config(
        {**SD15, "solver_order": 6, "lower_order_final": False,
         "final_sigmas_type": "sigma_min"}), cond=Z,
        num_inference_steps=12, name="u"),
     ValueError, "request 'u': UniPCMultistepScheduler does not fit a tick of the stepper: a "
                 "layout reads x and 1 to 6 terms"),
    (lambda st: st.add(Z.to("meta"), dpm(), cond=Z, num_inference_steps=5),
     ValueError, "latents x is on meta"),
])
def test_bad_scheduler_request_leaves_everything_untouched(busy, call, exc, match):
    snap = snapshot(busy)
    with pytest.raises(exc, match=match):
        call(busy)
    after = snapshot(busy)
    assert all(torch.equal(a, b) for a, b in zip(after[0], snap[0], strict=True))
    assert after[1:] == snap[1:]


def test_schedulers_need_a_vp_or_flow_stepper_of_their_kind():
    z = torch.zeros(DIM)
    flow = BatchedStepper(lambda x, s: x, bk.FlowSchedule(), (DIM,), capacity=1)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler gives a VP model's "
                                         "timesteps, but the stepper's model takes the sigmas"):
        flow.add(z, dpm(), num_inference_steps=5)
    other = BatchedStepper(lambda x, t: x, OtherSchedule(), (DIM,), capacity=1)
    with pytest.raises(ValueError, match="runs on a stepper with a Schedule or a FlowSchedule, "
                                         "not a OtherSchedule"):
        other.add(z, dpm(), num_inference_steps=5)
    assert len(flow) == len(other) == 0


@pytest.mark.parametrize("kw,exc,match", [
    ({"time_dtype": torch.int32}, TypeError, "time_dtype must be torch.long, torch.float32"),
    ({"merge_bytes": -1}, ValueError, "merge_bytes must be an int >= 0 or None"),
    ({"merge_bytes": 1.5}, ValueError, "merge_bytes must be an int"),
])
def test_bad_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        BatchedStepper(vp_model(), SCHED, (DIM,), capacity=2, **kw)


# ------------------------------------------------------------------ the plug-in contract


def test_layouts_merge_keeping_every_chain():
    belm = Layout()
    dpm2 = Layout(x="cur", terms=("model_output", "x0[-1]"), history=("x0",))
    ancestral = Layout(x="noise", terms=("cur", "model_output"))
    sde = Layout(x="cur", terms=("model_output", "noise", "x0[-1]"), history=("x0",))
    assert merged(belm, dpm2) == Layout(terms=("cur", "model_output", "x0[-1]"),
                                        history=("x0",))
    assert merged(belm, ancestral) == Layout(terms=("noise", "cur", "model_output"))
    assert merged(dpm2, sde) == sde
    assert merged(ancestral, sde) is None  # noise first in one chain, after the model in other
    assert merged(belm, Layout(inverse=True)) is None
    assert merged(Layout(inverse=True), Layout(inverse=True)) == Layout(inverse=True)
    wide = Layout(x="cur", terms=("model_output", "a[-1]", "b[-1]", "c[-1]", "d[-1]", "e[-1]"))
    assert merged(wide, Layout(x="cur", terms=("model_output", "f[-1]"))) is None  # 7 terms
    coef = torch.arange(1.0, 7.0).reshape(2, 3)
    wide = merged(belm, dpm2)
    out = relayout(coef[None], dpm2, wide)
    assert out.tolist() == [[[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 5.0, 6.0]]]
    assert torch.equal(relayout(out, wide, dpm2), coef[None])  # narrowed back


@pytest.mark.parametrize("kw,match", [
    ({"x": "state"}, "layout role 'state' is not one of"),
    ({"terms": ("model_output[-1]",)}, "keeps no history of 'model_output'"),
    ({"history": ("prev",)}, "history stream 'prev' must be a plain name"),
    ({"terms": ()}, "reads x and 1 to 6 terms"),
    ({"history": ("a", "b", "c")}, "at most 2 history streams"),
    ({"x": "cur", "inverse": True}, "an inverse layout updates 'prev' in place"),
])
def test_bad_layouts_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Layout(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"times": []}, "at least one step"),
    ({"coef": torch.zeros(2, 1, 3, dtype=torch.float32)}, "coef must be float64"),
    ({"scales": torch.ones(3)}, r"scales must have shape \(2,\)"),
    ({"draw": lambda out: None, "noise": (True, False)}, "reads 'noise' exactly when"),
    ({"layout": Layout(x="noise"), "draw": lambda out: None, "noise": (True,)},
     "for each of the 2 steps"),
    ({"result": "both"}, "result must be 'sample' or 'pair'"),
])
def test_bad_plans_are_refused(kw, match):
    plan = dict(kind="k", layout=Layout(), times=[1, 2], coef=torch.zeros(2, 1, 3,
                                                                          dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        Plan(**{**plan, **kw}).check()


def test_euler_input_scaling_is_per_sample():
    """One tick with an Euler request (model input divided by sqrt(sigma^2 + 1)) next to a DPM
    one (not scaled): the model sees each sample as its scheduler's scale_model_input gives it."""
    seen = []

    def model(x, t, cond):
        seen.append(x.clone())
        return torch.zeros_like(x)

    st = BatchedStepper(model, SCHED, (DIM,), capacity=2, dtype=torch.float32,
                        cond_shape=(DIM,))
    x = torch.randn(2, DIM)
    euler = st.add(x[0], EulerDiscreteScheduler.from_config(SDXL), cond=torch.zeros(DIM),
                   num_inference_steps=5)
    st.add(x[1], dpm(), cond=torch.zeros(DIM), num_inference_steps=5)
    st.tick()
    s = copy.deepcopy(euler.sampler)
    assert torch.equal(seen[0][0], s.scale_model_input(x[:1], s.timesteps[0])[0])
    assert torch.equal(seen[0][1], x[1]) and not torch.equal(seen[0][0], x[0])
    assert math.isclose(float(x[0].norm() / seen[0][0].norm()),
                        float((s.sigmas[0] ** 2 + 1) ** 0.5), rel_tol=1e-5)
