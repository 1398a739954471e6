"""CUDA-graph replay of the batched stepper's tick (``tick(graph=True)``).

The GPU tests skip on a machine without CUDA and run as they are on one. The indexing that the
graphs replay (per-slot tables, device-side step index, buffer roles) is the eager tick, which
tests/test_batched.py checks on CPU against the plain samplers.
"""

import copy
import math
import random

import pytest
import torch
from test_batched import (
    DIM,
    MIXTURE,
    SCHED,
    _assert_untouched,
    _snapshot,
    assert_same,
    random_request,
    running,  # noqa: F401 (a fixture, used by name)
)

import belm_kernels as bk
from belm_kernels.batched import DIRECTIONS, SUPPORTED, BatchedStepper, GraphCaptureError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graph capture needs a CUDA device")


def test_capture_on_cpu_raises_before_any_change(running):  # noqa: F811
    snap = _snapshot(running)
    with pytest.raises(GraphCaptureError,
                       match="CUDA graphs need a CUDA device; this stepper runs on cpu"):
        running.tick(graph=True)
    _assert_untouched(running, snap)


# ------------------------------------------------------------------ GPU: models without host syncs


def device_model(device, sync=None):
    """The mixture model of test_batched with every tensor already on the device (a host->device
    copy inside a capture would fail), optionally with a host sync in the middle."""
    gm = copy.copy(MIXTURE)
    gm.means, gm.stds = MIXTURE.means.to(device), MIXTURE.stds.to(device)
    gm.log_weights = MIXTURE.log_weights.to(device)
    ac = SCHED.alphas_cumprod.tolist()
    alpha = torch.tensor([math.sqrt(a) for a in ac], dtype=torch.float64, device=device)
    sigma = torch.tensor([math.sqrt(1 - a) for a in ac], dtype=torch.float64, device=device)

    def model(x, t, cond):
        if sync is not None:
            sync(t)
        return gm.eps(x - cond, alpha[t], sigma[t]).to(x.dtype)

    return model, gm


def mlp_model(device):
    """A model that runs cuBLAS matmuls (timestep features + 2-layer MLP)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2 * DIM + 1, 64), torch.nn.SiLU(),
                              torch.nn.Linear(64, DIM)).to(device, torch.float64)

    def model(x, t, cond):
        feats = torch.cat([x.double(), cond.double(), t[:, None].double() / 1000], dim=1)
        return net(feats).to(x.dtype)

    return model


def gpu_stepper(model, capacity, dtype=torch.float32):
    return BatchedStepper(model, SCHED, (DIM,), capacity=capacity, dtype=dtype, device="cuda",
                          cond_shape=(DIM,))


def serve(stepper, jobs, graph, cancel_seed=None):
    """Run jobs through the stepper, joining as slots free up; returns the requests in order."""
    rng = random.Random(cancel_seed)
    queue, reqs = list(jobs), []
    while queue or len(stepper):
        while queue and stepper.free:
            sampler, direction, x, x_T2, cond = queue.pop(0)
            reqs.append(stepper.add(x, sampler, direction, x_T2=x_T2, cond=cond))
        if cancel_seed is not None and len(stepper) > 1 and rng.random() < 0.1:
            stepper.cancel(stepper.requests[rng.randrange(len(stepper))])
        stepper.tick(graph=graph)
    return reqs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("method", SUPPORTED)
def test_graph_replay_equals_eager_to_the_bit(method, direction, dtype):
    """A lock-step loop (one sampler over a batch), replayed from one captured tick, against the
    eager ticks and against the plain sampler on the same batch."""
    model, gm = device_model("cuda")
    s = bk.get_sampler(method, SCHED, 9)
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, cond = x.to("cuda", dtype), torch.zeros(DIM, device="cuda", dtype=dtype)
    results = []
    for graph in (False, True):
        st = gpu_stepper(model, 5, dtype)
        reqs = [st.add(x[i], s, direction, cond=cond) for i in range(5)]
        st.run(graph=graph)
        results.append([r.result for r in reqs])
        if graph:
            assert len(st._graphs) == 2  # one per buffer parity, replayed every other tick
    for eager, replayed in zip(*results, strict=True):
        assert_same(replayed, eager)
    eps_fn = gm.eps_fn(SCHED)
    if direction == "sample":
        assert torch.equal(torch.stack(results[1]), s.sample(eps_fn, x))
    else:
        pair = s.invert(eps_fn, x)
        assert all(torch.equal(torch.stack([r[k] for r in results[1]]), pair[k]) for k in (0, 1))


@needs_cuda
@pytest.mark.parametrize("which", ["mixture", "mlp"])
def test_graph_replay_with_joins_and_leaves(which):
    """A stream of mixed jobs (methods, lengths, directions, pairs, cancellations): every layout
    gets its own graph; the results equal the eager stepper's to the bit."""
    model = device_model("cuda")[0] if which == "mixture" else mlp_model("cuda")
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    jobs = [random_request(rng, gen, torch.float32, "cuda") for _ in range(12)]
    eager = serve(gpu_stepper(model, 4), jobs, graph=False, cancel_seed=3)
    st = gpu_stepper(model, 4)
    replayed = serve(st, jobs, graph=True, cancel_seed=3)
    assert len(st._graphs) > 2
    for e, r in zip(eager, replayed, strict=True):
        assert (e.result is None) == (r.result is None)
        if e.result is not None:
            assert_same(r.result, e.result)


def _allocations(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["allocation.all.allocated"] - before


@needs_cuda
def test_ticks_allocate_only_the_model_output():
    """The caching allocator's counter: a replayed tick allocates nothing at all, an eager tick
    exactly what the model call alone allocates (no request finishing in between)."""
    model, _ = device_model("cuda")
    st = gpu_stepper(model, 4)
    s = bk.get_sampler("obelm", SCHED, 50)
    for d in ("sample", "invert", "sample"):
        st.add(torch.randn(DIM, device="cuda"), s, d, cond=torch.zeros(DIM, device="cuda"))
    st.tick()
    st.tick(graph=True)
    st.tick(graph=True)  # both parities captured
    assert _allocations(lambda: [st.tick(graph=True) for _ in range(6)]) == 0
    args = (st._cur[:3], st._t[:3], st._cond[:3])
    eps = model(*args)
    prev, cur, coef = st._prev, st._cur, st._coef

    def bare_ops():  # nothing on the CUDA / Triton backends; the torch reference allocates
        bk.lincomb3_(prev[:2], cur[:2], eps[:2], coef[:2])
        bk.lincomb3_inverse_(prev[2:3], cur[2:3], eps[2:3], coef[2:3])

    expected = _allocations(lambda: model(*args)) + _allocations(bare_ops)
    assert _allocations(st.tick) == expected


def _int_timestep(t):
    int(t[0])  # .item(): a device -> host copy and a sync


@needs_cuda
@pytest.mark.parametrize("sync,match", [
    (_int_timestep, "the model synchronises with the host"),
    (lambda t: torch.cuda.synchronize(), "synchronises with the host"),
])
def test_host_syncing_model_cannot_be_captured(sync, match):
    model, gm = device_model("cuda", sync=sync)
    st = gpu_stepper(model, 3, torch.float64)
    s = bk.get_sampler("obelm", SCHED, 6)
    x = torch.randn(3, DIM, dtype=torch.float64, device="cuda")
    cond = torch.zeros(DIM, dtype=torch.float64, device="cuda")
    reqs = [st.add(x[i], s, cond=cond) for i in range(3)]
    st.tick()
    snap = _snapshot(st)
    with pytest.raises(GraphCaptureError, match=match):
        st.tick(graph=True)
    _assert_untouched(st, snap)
    st.run()  # the eager ticks still work, and give the plain sampler's results
    assert torch.equal(torch.stack([r.result for r in reqs]), s.sample(gm.eps_fn(SCHED), x))


@needs_cuda
def test_wrong_model_shape_is_caught_before_capture():
    model, _ = device_model("cuda")
    st = gpu_stepper(lambda x, t, cond: model(x, t, cond)[:-1], 3)
    st.add(torch.zeros(DIM, device="cuda"), bk.get_sampler("obelm", SCHED, 5),
           cond=torch.zeros(DIM, device="cuda"))
    snap = _snapshot(st)
    with pytest.raises(ValueError, match="the model returned shape"):
        st.tick(graph=True)
    _assert_untouched(st, snap)


# ------------------------------------------------------------------ GPU: the fused schedulers


def _cuda_jobs(seed, dtype, n=12):
    """A mixed stream (test_batched_schedulers' schedulers and BELM jobs) on the GPU."""
    from test_batched_schedulers import scheduler_request

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    jobs = []
    for _ in range(n):
        if rng.random() < 0.7:
            sched, options, x, cond, s = scheduler_request(rng, gen, dtype)
            jobs.append(("scheduler", (sched, options, x.cuda(), cond.cuda(), s)))
        else:
            jobs.append(("belm", random_request(rng, gen, dtype, "cuda")))
    return jobs


@needs_cuda
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_replay_of_scheduler_streams_equals_eager(dtype, generator_device):
    """DPM-Solver++, UniPC, Euler (scaled model input), Euler a / SDE / LCM / DDIM eta (noise
    drawn outside the graph into its buffer, from CPU or CUDA generators) and BELM requests,
    joining, leaving and cancelled: replayed ticks give the eager ticks' results to the bit."""
    pytest.importorskip("diffusers")
    from test_batched_schedulers import serve_mixed

    model = device_model("cuda")[0]
    jobs = _cuda_jobs(4, dtype)
    results = []
    for graph in (False, True):
        st = gpu_stepper(model, 4, dtype)
        served = serve_mixed(st, jobs, random.Random(9), graph=graph,
                             generator_device=generator_device)
        results.append([req.result for req, _, _ in served])
        if graph:
            assert len(st._graphs) > 2
    for eager, replayed in zip(*results, strict=True):
        assert (eager is None) == (replayed is None)
        if eager is not None:
            assert_same(replayed, eager)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_requests_equal_their_fused_scheduler_alone(dtype):
    """On a GPU too each request is its fused scheduler alone on it (torch reference op on both
    sides), with the model input scaled as scale_model_input scales it there: torch divides a
    CUDA sample by a CPU scalar by multiplying with its reciprocal."""
    pytest.importorskip("diffusers")
    from test_batched_schedulers import check_alone, serve_mixed

    model = device_model("cuda")[0]
    jobs = [job for job in _cuda_jobs(6, dtype, n=10) if job[0] == "scheduler"]
    st = BatchedStepper(model, SCHED, (DIM,), capacity=4, dtype=dtype, device="cuda",
                        cond_shape=(DIM,), backend="torch")
    served = serve_mixed(st, jobs, random.Random(0), cancel=0, generator_device="cuda")
    assert check_alone(st, served, "torch", generator_device="cuda") == len(jobs)


@needs_cuda
def test_replayed_scheduler_ticks_allocate_nothing():
    """Replayed ticks of scaled, noisy (a CUDA generator: drawn in place) and multistep requests
    next to an exact inversion allocate nothing, for every phase of the history rings."""
    pytest.importorskip("diffusers")
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )
    from test_fused_schedulers import SD15, SDXL

    model, _ = device_model("cuda")
    st = gpu_stepper(model, 5)
    z = torch.zeros(DIM, device="cuda")
    for cls, config in [(EulerDiscreteScheduler, SDXL), (EulerAncestralDiscreteScheduler, SDXL),
                        (DPMSolverMultistepScheduler, SD15), (UniPCMultistepScheduler, SD15)]:
        st.add(torch.randn(DIM, device="cuda"), cls.from_config(config), cond=z,
               num_inference_steps=50, generator=torch.Generator("cuda"))
    st.add(torch.randn(DIM, device="cuda"), bk.get_sampler("obelm", SCHED, 50), "invert",
           cond=z)
    for _ in range(5):  # every phase of the rings captured
        st.tick(graph=True)
    assert _allocations(lambda: [st.tick(graph=True) for _ in range(8)]) == 0


@needs_cuda
def test_cpu_stepper_refuses_a_cuda_generator():
    pytest.importorskip("diffusers")
    from diffusers import EulerAncestralDiscreteScheduler
    from test_fused_schedulers import SDXL

    st = BatchedStepper(lambda x, t: x, SCHED, (DIM,), capacity=1)
    with pytest.raises(ValueError, match="request 'g': its generator is on cuda"):
        st.add(torch.zeros(DIM), EulerAncestralDiscreteScheduler.from_config(SDXL),
               num_inference_steps=5, generator=torch.Generator("cuda"), name="g")
    assert len(st) == 0
