"""The batched stepper (continuous batching) against the plain samplers, its allocations, its
bad-input checks, and the examples that use it.

The model is the analytic Gaussian mixture, shifted by a per-request conditioning vector: its
output for one sample does not depend on the rest of the batch, so every request's result must
equal the plain sampler's for that request alone, to the bit.
"""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import belm_kernels as bk
from belm_kernels import coefficients
from belm_kernels.batched import SUPPORTED, BatchedStepper, step_plan

ROOT = Path(__file__).resolve().parent.parent
SCHED = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
MIXTURE = bk.GaussianMixture.random(dim=8, num_components=4, seed=0)
DIM = MIXTURE.dim
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batched_model(device="cpu"):
    """model(x, t, cond) of the stepper: the mixture's eps at x - cond, per-sample timestep.

    alpha and sigma per timestep come from math.sqrt, as in ``GaussianMixture.eps_fn`` (torch's
    vectorised float64 sqrt differs from it in the last bit for a few percent of the values)."""
    ac = SCHED.alphas_cumprod.tolist()
    alpha = torch.tensor([math.sqrt(a) for a in ac], dtype=torch.float64, device=device)
    sigma = torch.tensor([math.sqrt(1 - a) for a in ac], dtype=torch.float64, device=device)

    def model(x, t, cond):
        return MIXTURE.eps(x - cond, alpha[t], sigma[t]).to(x.dtype)

    return model


def plain_eps_fn(cond):
    """The same model for one request alone, as the plain samplers call it: eps_fn(x, int t)."""
    eps_fn = MIXTURE.eps_fn(SCHED)
    return lambda x, t: eps_fn(x - cond, t)


def stepper(capacity=4, dtype=torch.float64, device="cpu", **kw):
    return BatchedStepper(batched_model(device), SCHED, (DIM,), capacity=capacity, dtype=dtype,
                          device=device, cond_shape=(DIM,), **kw)


def plain(req, x, cond, x_T2=None, backend="auto"):
    """What the request's sampler gives for it alone (a batch of one)."""
    eps_fn = plain_eps_fn(cond)
    if req.direction == "sample":
        return req.sampler.sample(eps_fn, x[None], None if x_T2 is None else x_T2[None],
                                  backend=backend)[0]
    return tuple(t[0] for t in req.sampler.invert(eps_fn, x[None], backend=backend))


def assert_same(result, expected):
    if isinstance(expected, tuple):
        assert len(result) == 2
        assert all(torch.equal(r, e) for r, e in zip(result, expected, strict=True))
    else:
        assert torch.equal(result, expected)


def random_request(rng, gen, dtype, device):
    """A random job: method, steps, spacing, direction; sometimes sampling from a pair."""
    method = rng.choice(["ddim", "bdia", "obelm"])
    params = {"gamma": rng.choice([0.5, 0.8])} if method == "bdia" else {}
    sampler = bk.get_sampler(method, SCHED, rng.randint(2, 12),
                             rng.choice(["linspace", "leading", "trailing"]), **params)
    direction = rng.choice(["sample", "invert"])
    x = torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype).to(device)
    x_T2 = None
    if direction == "sample" and rng.random() < 0.3:
        x_T2 = (0.9 * x + 0.1 * torch.randn(DIM, generator=gen, dtype=torch.float64).to(x))
    cond = 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return sampler, direction, x, x_T2, cond


# ------------------------------------------------------------------ plans


def test_ddim_inversion_as_inverse_op():
    """The first step of an exact inversion: (r, 0, d) undone on a copy of x_{j+1} is DDIM
    inversion, the forward row (0, 1/r, -d/r) on x_{j+1}, up to rounding: each side rounds its
    two coefficients and the float64 result, a few eps64 of the terms' magnitude."""
    grid = bk.get_sampler("obelm", SCHED, 10).grid
    rows, fwd = coefficients.ddim_inverse_op_rows(grid), coefficients.ddim_inverse(grid)
    assert torch.equal(rows[:, 1], torch.zeros(10))
    assert torch.equal(rows[:, [0, 2]], coefficients.ddim(grid)[:, 1:])
    x, eps = torch.randn(2, 10, 16, dtype=torch.float64)
    for j in range(10):
        got = bk.lincomb3_inverse_(x[j].clone(), x[j], eps[j], rows[j])
        want = bk.lincomb3_(x[j].clone(), x[j], eps[j], fwd[j])
        scale = (x[j].abs() + (rows[j, 2] * eps[j]).abs()) / rows[j, 0]
        assert bool(((got - want).abs() <= 4 * torch.finfo(torch.float64).eps * scale).all())


def test_step_plan_follows_the_sampler():
    s = bk.get_sampler("obelm", SCHED, 6)
    ts, rows = s.timesteps.tolist(), s.rows()
    p = step_plan(s, "sample")
    assert p.times == ts and torch.equal(p.rows, rows) and not p.inverse
    p = step_plan(s, "sample", from_pair=True)
    assert p.times == ts[1:] and torch.equal(p.rows, rows[1:])
    p = step_plan(s, "invert")
    assert p.inverse and p.times == [ts[5], ts[5], ts[4], ts[3], ts[2], ts[1]]
    assert torch.equal(p.rows[1:], rows[1:].flip(0))
    p = step_plan(bk.get_sampler("ddim", SCHED, 6), "invert")
    assert not p.inverse and p.times == ts[::-1]


# ------------------------------------------------------------------ against the plain samplers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_stream_of_requests_matches_plain_samplers(seed, dtype, device):
    """A stream of random jobs through a small stepper: requests join as others finish, a few are
    cancelled mid-run; each result is the plain sampler's for that request alone, to the bit."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    st = stepper(capacity=rng.choice([1, 3, 5]), dtype=dtype, device=device)
    queue = [random_request(rng, gen, dtype, device) for _ in range(14)]
    jobs, cancelled = [], []
    while queue or len(st):
        while queue and st.free:
            sampler, direction, x, x_T2, cond = queue.pop()
            req = st.add(x, sampler, direction, x_T2=x_T2, cond=cond)
            jobs.append((req, x, cond, x_T2))
        if len(st) > 1 and rng.random() < 0.1:
            victim = rng.choice(st.requests)
            st.cancel(victim)
            cancelled.append(victim)
        finished = st.tick()
        assert all(r.done and r.slot is None for r in finished)
    for req, x, cond, x_T2 in jobs:
        if req in cancelled:
            assert req.result is None
        else:
            assert_same(req.result, plain(req, x, cond, x_T2))
    assert len(jobs) == 14 and len(st) == 0


@pytest.mark.parametrize("backend", bk.available_backends("cpu"))
@pytest.mark.parametrize("direction", ["sample", "invert"])
@pytest.mark.parametrize("method", SUPPORTED)
def test_lock_step_loop_matches_plain_sampler(method, direction, backend):
    """The indexing logic (tables, device-side step index, buffer roles) in eager mode: one
    sampler over a batch of requests that join together -- the loop the graph mode replays --
    gives the plain sampler's result on the whole batch."""
    s = bk.get_sampler(method, SCHED, 7)
    x = MIXTURE.sample_data(6, torch.Generator().manual_seed(1)).to(torch.float32)
    cond = torch.zeros(DIM)
    st = stepper(capacity=6, dtype=torch.float32, backend=backend)
    reqs = [st.add(x[i], s, direction, cond=cond) for i in range(6)]
    assert st.run() == reqs
    eps_fn = plain_eps_fn(cond)
    if direction == "sample":
        expected = s.sample(eps_fn, x, backend=backend)
        assert torch.equal(torch.stack([r.result for r in reqs]), expected)
    else:
        pair = s.invert(eps_fn, x, backend=backend)
        for k in range(2):
            assert torch.equal(torch.stack([r.result[k] for r in reqs]), pair[k])


@pytest.mark.parametrize("method,params", [("obelm", {}), ("bdia", {"gamma": 0.8})])
def test_invert_then_sample_reconstructs_float64(method, params):
    """Inversions, then samplings from their pairs, all through the stepper (mixed lengths).

    Error model: every update rounds once in float64 (plus the model's rounding), so each step
    adds at most a few eps64 relative; inversion multiplies a perturbation by at most 1/|a| per
    step (a: the leading coefficient) and sampling undoes that growth. So the relative
    reconstruction error is at most 4 * L * G * eps64, with L the number of steps and
    G = prod max(1, 1/|a_k|) over the inversion's rows (a wrong row or timestep gives O(1e-2).)
    """
    gen = torch.Generator().manual_seed(5)
    st = stepper(capacity=4)
    samplers = [bk.get_sampler(method, SCHED, n, sp, **params)
                for n, sp in [(4, "linspace"), (10, "trailing"), (7, "leading"), (15, "linspace")]]
    x0 = [MIXTURE.sample_data(1, gen)[0] for _ in samplers]
    conds = [0.2 * torch.randn(DIM, generator=gen, dtype=torch.float64) for _ in samplers]
    inverted = [st.add(x, s, "invert", cond=c)
                for x, s, c in zip(x0[:3], samplers[:3], conds[:3], strict=True)]
    st.tick()  # the fourth joins one tick later
    inverted.append(st.add(x0[3], samplers[3], "invert", cond=conds[3]))
    st.run()
    rebuilt = [st.add(r.result[0], s, x_T2=r.result[1], cond=c)
               for r, s, c in zip(inverted[:3], samplers[:3], conds[:3], strict=True)]
    st.tick()
    rebuilt.append(st.add(inverted[3].result[0], samplers[3], x_T2=inverted[3].result[1],
                          cond=conds[3]))
    st.run()
    eps64 = torch.finfo(torch.float64).eps
    for s, x, r in zip(samplers, x0, rebuilt, strict=True):
        a = step_plan(s, "invert").rows[:, 0]
        bound = 4 * s.num_steps * float((1 / a.abs()).clamp(min=1).prod()) * eps64
        assert float((r.result - x).norm() / x.norm()) <= bound


def test_results_are_owned_by_the_caller():
    st = stepper(capacity=2)
    s = bk.get_sampler("obelm", SCHED, 3)
    x, cond = torch.randn(DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64)
    a = st.add(x, s, cond=cond)
    b = st.add(x, s, "invert", cond=cond)
    assert st.requests == [a, b] and st.free == 0 and "2/2 active" in repr(st)
    st.run()
    kept = [a.result.clone()] + [t.clone() for t in b.result]
    st.add(x * 2, s, cond=cond)  # reuses the slots
    st.run()
    assert all(torch.equal(r, k) for r, k in zip([a.result, *b.result], kept, strict=True))
    assert a.done and "done" in repr(a) and len(st) == 0


@pytest.mark.skipif(not hasattr(bk, "FlowSchedule"),
                    reason="FlowSchedule comes with the flow-matching branch; runs once merged")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flow_requests_match_plain_flow_samplers(dtype):
    """Flow-matching samplers (float sigmas as model times) through the same stepper, with
    different shifts in one batch: bit for bit the plain flow samplers."""
    v_fn = MIXTURE.v_fn()
    st = BatchedStepper(lambda x, s: MIXTURE.velocity(x, s).to(x.dtype), bk.FlowSchedule(),
                        (DIM,), capacity=3, dtype=dtype)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    queue, jobs = [], []
    for k in range(10):
        schedule = (bk.FlowSchedule(shift=rng.choice([1.0, 3.0])) if k % 3 else
                    bk.FlowSchedule(use_dynamic_shifting=True, mu=1.15))
        sampler = bk.get_sampler(rng.choice(["euler", "bdia", "obelm"]), schedule,
                                 rng.randint(2, 12))
        x = torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype)
        queue.append((sampler, ["sample", "invert"][k % 2], x))
    while queue or len(st):
        while queue and st.free:
            sampler, direction, x = queue.pop(0)
            jobs.append((st.add(x, sampler, direction), x))
        st.tick()
    assert st._t.dtype == torch.float64
    for req, x in jobs:
        if req.direction == "sample":
            assert_same(req.result, req.sampler.sample(v_fn, x[None])[0])
        else:
            assert_same(req.result, tuple(t[0] for t in req.sampler.invert(v_fn, x[None])))


# ------------------------------------------------------------------ allocations per tick


def _allocations(fn) -> list[int]:
    """Sizes of the CPU allocations made while fn runs (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]


def _preallocated_model(capacity, device="cpu"):
    """A model that writes into its own buffer, so it allocates nothing: what is left is ours."""
    out = torch.empty(capacity, DIM, dtype=torch.float64, device=device)
    k = torch.tensor(0.01, dtype=torch.float64, device=device)

    def model(x, t):
        return torch.mul(x, k, out=out[:x.shape[0]])

    return model


@pytest.mark.parametrize("directions", [["sample"] * 4, ["invert"] * 4, ["sample", "invert"] * 2])
def test_steady_tick_allocates_no_more_than_the_bare_op(directions):
    """CPU: a tick (no request finishing) allocates exactly what the bare fused op calls on the
    same slices allocate -- nothing on the C++ backend for lincomb3_; lincomb3_inverse_ checks
    for a zero leading coefficient on CPU coefficients, a B-byte and a 1-byte bool tensor, a check
    that does not run on a GPU. The stepper's own gathers, views and index update allocate
    nothing. (On a GPU, test_graph.py counts the caching allocator's allocations instead.)"""
    st = BatchedStepper(_preallocated_model(4), SCHED, (DIM,), capacity=4, dtype=torch.float64)
    s = bk.get_sampler("obelm", SCHED, 20)
    for d in directions:
        st.add(torch.randn(DIM, dtype=torch.float64), s, d)
    st.tick()  # warm up (backend resolution, lazy imports)
    ticked = _allocations(st.tick)
    S, B = sum(r.direction == "sample" for r in st.requests), len(st)  # samplings first
    prev, cur, coef, eps = st._prev, st._cur, st._coef, st.model(st._cur, None)

    def bare():
        if S:
            bk.lincomb3_(prev[:S], cur[:S], eps[:S], coef[:S])
        if S < B:
            bk.lincomb3_inverse_(prev[S:B], cur[S:B], eps[S:B], coef[S:B])

    assert sorted(ticked) == sorted(_allocations(bare))
    if "cpu" in bk.available_backends("cpu") and "invert" not in directions:
        assert ticked == []


# ------------------------------------------------------------------ bad input


def _snapshot(st):
    return ([b.clone() for b in (*st._bufs, st._cond, st._coefs, st._times, st._step)],
            [(r, r.slot) for r in st.requests], st._ticks)


def _assert_untouched(st, snap):
    bufs, slots, ticks = _snapshot(st)
    assert all(torch.equal(a, b) for a, b in zip(bufs, snap[0], strict=True))
    assert slots == snap[1] and ticks == snap[2]


@pytest.fixture
def running():
    """A stepper mid-run: three requests at different positions."""
    st = stepper(capacity=4)
    gen = torch.Generator().manual_seed(0)
    for i, (m, d) in enumerate([("obelm", "sample"), ("bdia", "invert"), ("ddim", "sample")]):
        st.add(torch.randn(DIM, generator=gen, dtype=torch.float64), bk.get_sampler(m, SCHED, 9),
               d, cond=torch.zeros(DIM, dtype=torch.float64), name=f"r{i}")
        st.tick()
    return st


def other_betas():
    return bk.Schedule.from_betas(0.0001, 0.02, "linear")


class FlowLikeSchedule(bk.Schedule):
    """Stands in for another family of grids (e.g. flow matching) on a VP stepper."""


Z = torch.zeros(DIM, dtype=torch.float64)
OBELM = bk.get_sampler("obelm", SCHED, 5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda st: st.add(torch.zeros(DIM + 1, dtype=torch.float64), OBELM, cond=Z, name="bad"),
     ValueError, r"request 'bad': latents x has shape \(9,\), the batch's is \(8,\)"),
    (lambda st: st.add(torch.zeros(1, DIM, dtype=torch.float64), OBELM, cond=Z),
     ValueError, r"latents x has shape \(1, 8\).*one sample per request"),
    (lambda st: st.add(torch.zeros(DIM), OBELM, cond=Z, name="f32"),
     ValueError, "request 'f32': latents x has dtype torch.float32, the batch's is torch.float64"),
    (lambda st: st.add([0.0] * DIM, OBELM, cond=Z), TypeError, "latents x must be a torch.Tensor"),
    (lambda st: st.add(Z, OBELM, x_T2=torch.zeros(DIM), cond=Z), ValueError, "x_T2 has dtype"),
    (lambda st: st.add(Z, OBELM, "invert", x_T2=Z, cond=Z), ValueError,
     "x_T2 .* only makes sense for direction='sample'"),
    (lambda st: st.add(Z, OBELM, cond=torch.zeros(3, dtype=torch.float64)), ValueError,
     r"cond has shape \(3,\)"),
    (lambda st: st.add(Z, OBELM), ValueError, "cond is required"),
    (lambda st: st.add(Z, OBELM, "backwards", cond=Z), ValueError, "direction must be one of"),
    (lambda st: st.add(Z, bk.get_sampler("edict", SCHED, 5), cond=Z, name="e"), TypeError,
     r"request 'e': the batched stepper runs two-step samplers \('ddim', 'bdia', 'obelm'\) "
     r"\('euler' in place of 'ddim' on a FlowSchedule\), got 'edict' \(EDICT couples two "
     r"sequences"),
    (lambda st: st.add(Z, "obelm", cond=Z), TypeError, "runs two-step samplers"),
    (lambda st: st.add(Z, bk.get_sampler("obelm", bk.Schedule(SCHED.alphas_cumprod[:500]), 5),
                       cond=Z, name="short"),
     ValueError, "request 'short': its sampler's schedule does not fit the stepper's model "
                 r"\(num_train_timesteps=500, the model's is 1000\)"),
    (lambda st: st.add(Z, bk.get_sampler("obelm", other_betas(), 5), cond=Z), ValueError,
     "alphas_cumprod differ from the model's"),
    (lambda st: st.add(Z, bk.get_sampler("obelm", FlowLikeSchedule(SCHED.alphas_cumprod), 5),
                       cond=Z), ValueError,
     "grid comes from a FlowLikeSchedule, but the stepper's model takes the model times of a "
     "Schedule"),
    (lambda st: st.add(Z, bk.get_sampler("bdia", SCHED, 5, gamma=0.0), "invert", cond=Z),
     ValueError, "gamma=0 .* cannot be inverted"),
    (lambda st: st.cancel(bk.batched.Request("gone", OBELM, "sample", 5)), ValueError,
     "request 'gone' is not active"),
    # copies that would fail: checked before the request joins (no phantom request)
    (lambda st: st.add(torch.zeros(DIM, dtype=torch.float64, device="meta"), OBELM, cond=Z,
                       name="m"),
     ValueError, r"request 'm': latents x is on meta, the stepper on cpu: move it there first"),
    (lambda st: st.add(Z, OBELM, cond=Z.to("meta")), ValueError, "cond is on meta"),
    (lambda st: st.add(Z.to_sparse(), OBELM, cond=Z, name="sp"), ValueError,
     r"request 'sp': latents x is a torch.sparse_coo tensor; the batch holds dense \(strided\)"),
    (lambda st: st.add(Z, OBELM, x_T2=Z.to_sparse(), cond=Z), ValueError,
     "x_T2 is a torch.sparse_coo tensor"),
    # non-finite latents would end NaN
    (lambda st: st.add(torch.full((DIM,), math.nan, dtype=torch.float64), OBELM, cond=Z,
                       name="nan"),
     ValueError, "request 'nan': latents x has NaN or inf values; the request would end NaN"),
    (lambda st: st.add(Z, OBELM, x_T2=Z.index_fill(0, torch.tensor([3]), -math.inf), cond=Z),
     ValueError, "x_T2 has NaN or inf values"),
    (lambda st: st.add(Z, OBELM, cond=Z.index_fill(0, torch.tensor([0]), math.nan)),
     ValueError, "cond has NaN values"),
])
def test_bad_request_leaves_everything_untouched(running, call, exc, match):
    snap = _snapshot(running)
    with pytest.raises(exc, match=match):
        call(running)
    _assert_untouched(running, snap)


def test_refused_copy_leaves_no_phantom_request():
    """The issue's reproducer: a request whose latents cannot be copied in (another device)
    used to join before the copy failed; every later tick then failed on its slot."""
    o = bk.get_sampler("obelm", SCHED, 6)
    st = BatchedStepper(lambda x, t: 0.1 * x, SCHED, (4,), capacity=3, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    req = st.add(x, o, "invert")
    st.tick()
    with pytest.raises(ValueError, match="latents x is on meta"):
        st.add(torch.zeros(4, dtype=torch.float64, device="meta"), o)
    assert len(st) == 1 and st.requests == [req]
    assert st.run() == [req]
    assert_same(req.result, tuple(t[0] for t in o.invert(lambda x, t: 0.1 * x, x[None])))


def test_infinite_conditioning_is_accepted():
    """-inf in a conditioning is meaningful (an additive attention mask); NaN never is."""
    st = BatchedStepper(lambda x, t, cond: x * cond.exp(), SCHED, (DIM,), capacity=1,
                        dtype=torch.float64, cond_shape=(DIM,))
    cond = Z.index_fill(0, torch.tensor([2]), -math.inf)
    req = st.add(torch.ones(DIM, dtype=torch.float64), OBELM, cond=cond)
    st.run()
    assert bool(torch.isfinite(req.result).all())


@pytest.mark.parametrize("built_in, run_in", [(True, False), (False, True), (True, True)])
def test_inference_mode_inside_or_outside(built_in, run_in):
    """A stepper built under torch.inference_mode() and fed outside it (or the other way round)
    works: its buffers are normal tensors, updated in place in either mode."""
    with torch.inference_mode(built_in):
        st = stepper(capacity=2)
    gen = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, DIM, generator=gen, dtype=torch.float64)
    with torch.inference_mode(run_in):
        a = st.add(x, OBELM, cond=cond)
        b = st.add(x, OBELM, "invert", cond=cond)
        st.run()
    assert_same(a.result, plain(a, x, cond))
    assert_same(b.result, plain(b, x, cond))


def test_no_autograd_graph_leaks_through_the_stepper():
    """Latents that require grad (VAE latents made outside no_grad) are copied in detached:
    neither their request's result nor a later request's requires grad, and the stepper's buffers
    never join a graph."""
    st = stepper(capacity=2)
    leaf = torch.randn(DIM, dtype=torch.float64, requires_grad=True)
    x, cond = 2 * leaf, torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    first = st.add(x, OBELM, cond=cond)
    inv = st.add(x, OBELM, "invert", cond=cond)
    st.run()
    later = st.add(torch.randn(DIM, dtype=torch.float64), OBELM, cond=cond.detach())
    st.run()
    for t in (first.result, *inv.result, later.result):
        assert not t.requires_grad and t.grad_fn is None
    later.result.numpy()  # raised "Can't call numpy() on Tensor that requires grad"
    for buf in (*st._bufs, st._cond, st._coefs, st._times, st._step):
        assert not buf.requires_grad and buf.grad_fn is None
    assert_same(first.result, plain(first, x.detach(), cond.detach()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stepper_refuses_cpu_latents():
    st = stepper(device="cuda")
    assert st.device == torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(ValueError, match="request 'c': latents x is on cpu, the stepper on cuda"):
        st.add(Z, OBELM, cond=Z.cuda(), name="c")
    assert len(st) == 0
    st.add(Z.cuda(), OBELM, cond=Z.cuda())  # "cuda" and "cuda:0" are the same device


def test_full_stepper_refuses_before_any_change(running):
    running.add(Z, OBELM, cond=Z)
    snap = _snapshot(running)
    with pytest.raises(RuntimeError, match="request 'late': the stepper is full"):
        running.add(Z, OBELM, cond=Z, name="late")
    _assert_untouched(running, snap)


@pytest.mark.parametrize("output,exc,match", [
    (lambda x: x[:-1], ValueError,
     r"the model returned shape \(2, 8\) on cpu for the stacked batch of shape \(3, 8\) on cpu "
     r"\(requests \['r0', 'r2', 'r1'\]\)"),
    (lambda x: x.reshape(3, 2, 4), ValueError, "returned shape"),
    (lambda x: x.long(), TypeError, "the model must return a float tensor"),
    (lambda x: None, TypeError, "the model must return a float tensor"),
])
def test_bad_model_output_raises_before_any_write(running, output, exc, match):
    running.model = lambda x, t, cond: output(x)
    snap = _snapshot(running)
    with pytest.raises(exc, match=match):
        running.tick()
    _assert_untouched(running, snap)


def test_conditioning_mismatch_with_the_model():
    st = BatchedStepper(_preallocated_model(2), SCHED, (DIM,), capacity=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="got cond, but the stepper was built without cond_shape"):
        st.add(Z, OBELM, cond=Z)


@pytest.mark.parametrize("kw,exc,match", [
    ({"capacity": 0}, ValueError, "capacity must be an int >= 1"),
    ({"capacity": 2, "dtype": torch.long}, TypeError, "dtype must be a float torch.dtype"),
    ({"capacity": 2, "model": "unet"}, TypeError, "model must be callable"),
])
def test_bad_construction(kw, exc, match):
    kw = {"model": batched_model(), **kw}
    with pytest.raises(exc, match=match):
        BatchedStepper(kw.pop("model"), SCHED, (DIM,), **kw)


# ------------------------------------------------------------------ examples


@pytest.mark.slow  # 10-30 s: a fresh interpreter imports torch (+ diffusers) and builds the UNet
@pytest.mark.parametrize("script,expected", [
    ("serve_batched.py", "every request matches the plain sampler"),
    ("graph_loop.py", "the stepper's loop matches the plain sampler to the bit"),
])
def test_example_runs(script, expected):
    """The examples run as written and print their check. One thread: the models are tiny, and
    on a shared CI machine more threads only contend (the check does not depend on it)."""
    if script == "serve_batched.py":
        pytest.importorskip("diffusers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "python" / script)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expected in out.stdout


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Serving many requests", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    namespace = {}
    exec(compile(blocks[0], "README.md (batched stepper)", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.count(", done)") == 6 and "invert, 20 steps" in out
    pytest.importorskip("diffusers")
    exec(compile(blocks[1], "README.md (batched schedulers)", "exec"), namespace)
    out = capsys.readouterr().out
    for line in ("DPMSolverMultistepScheduler, sample, 20 steps, done",
                 "UniPCMultistepScheduler, sample, 8 steps, done",
                 "EulerAncestralDiscreteScheduler, sample, 12 steps, done",
                 "obelm, invert, 10 steps, done"):
        assert line in out
