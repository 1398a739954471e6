"""Continuous batching of sampling and inversion requests, and CUDA-graph replay of its tick.

:class:`BatchedStepper` holds many requests, each with its own two-step sampler (method, grid,
number of steps), direction ("sample" or "invert") and position on its grid, and moves all of
them one step per :meth:`~BatchedStepper.tick`: ONE model call on the stacked states with a (B,)
tensor of per-sample model times, then the fused update with one coefficient row per sample --
``lincomb3_`` over the sampling requests and ``lincomb3_inverse_`` over the exact inversions (the
kernel takes one direction per launch, so a tick with both kinds launches it twice). Requests
join (:meth:`~BatchedStepper.add`) and leave (when done, or :meth:`~BatchedStepper.cancel`)
between ticks.

Each request runs the very steps of ``sampler.sample`` / ``sampler.invert`` (see
:func:`step_plan`) with the same coefficients and buffer roles, so its result is bit for bit the
plain sampler's whenever the model's output for one sample does not depend on the rest of the
batch (true of the analytic models; a UNet's kernels may round differently at another batch
size, which the result then inherits at the rounding level).

Layout. Slots ``[0, S)`` hold the requests updated with ``lincomb3_`` (sampling, and DDIM's
inexact inversion), slots ``[S, B)`` the exact inversions; requests are kept packed, so a leaving
request's slot is refilled by moving the last one of its block (and, for the first block, the
last inversion into the freed end). Every per-request quantity lives in a preallocated buffer of
``capacity`` slots: the two state buffers (their roles ``prev`` / ``cur`` swap after every tick,
for all requests at once), the conditioning, a table of coefficient rows and one of model times
per slot, and a device-side step index per slot. A tick gathers the current row and time of
every slot from the tables through the step index into fixed buffers, calls the model, applies
the update in place and increments the index: nothing is allocated but the model's output, and
nothing on the host changes between ticks except the host's own bookkeeping.

CUDA graphs. Because the tick reads everything from device memory at fixed addresses, it can be
captured once per layout (S, B, which buffer is ``prev``) and replayed: ``tick(graph=True)``
captures on first use (after a warm-up of the model and of the op on a scratch copy) and replays
afterwards; layouts recur, so a serving loop soon only replays. All graphs share one memory pool,
which is safe because no tensor made inside a graph outlives its tick.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import coefficients
from .ops import coef_table, compute_dtype, lincomb3_, lincomb3_inverse_
from .samplers import SAMPLERS, DDIMSampler, TwoStepSampler

DIRECTIONS = ("sample", "invert")
#: Methods the stepper runs: every two-step sampler (one model call and one update per step).
#: (On a FlowSchedule the DDIM step is named "euler".)
SUPPORTED = tuple(name for name, cls in SAMPLERS.items() if issubclass(cls, TwoStepSampler))
# The sample / invert implementations whose steps step_plan reproduces.
_KNOWN = {"sample": (TwoStepSampler.sample,), "invert": (TwoStepSampler.invert, DDIMSampler.invert)}


class GraphCaptureError(RuntimeError):
    """A tick could not be captured into a CUDA graph; the message says why. Nothing changed."""


@dataclass(frozen=True)
class StepPlan:
    """The steps of one plain sampler run: step k calls the model at ``times[k]`` on ``cur`` and
    updates ``prev`` with ``rows[k]`` (``lincomb3_inverse_`` if ``inverse``), then the roles swap.

    The run starts from prev = cur = x (sample from x_T, invert from x0) or prev = x_T,
    cur = x_T2 (sample from the pair); it ends with the result in ``cur`` (for an inversion the
    pair is (cur, prev))."""

    times: list
    rows: torch.Tensor
    inverse: bool

    @property
    def num_steps(self) -> int:
        return len(self.times)


def step_plan(sampler: TwoStepSampler, direction: str, from_pair: bool = False) -> StepPlan:
    """The steps ``sampler.sample`` (``direction="sample"``) or ``sampler.invert`` would take,
    built from the sampler's grid, its rows and its model times only (so new two-step samplers
    work unchanged). Mirrors ``TwoStepSampler.sample`` / ``.invert`` and ``DDIMSampler.invert``."""
    ts, n = list(sampler.model_times), sampler.num_steps
    if direction == "sample":
        first = 1 if from_pair else 0
        return StepPlan(ts[first:], sampler.rows()[first:], inverse=False)
    if type(sampler).invert is DDIMSampler.invert:  # inexact: forward updates, eps at x_{j+1}
        return StepPlan(ts[::-1], coefficients.ddim_inverse(sampler.grid).flip(0), inverse=False)
    sampler._check_invertible()
    first = coefficients.ddim_inverse_op_rows(sampler.grid)[n - 1:]
    return StepPlan([ts[n - 1]] + ts[n - 1:0:-1], torch.cat([first, sampler.rows()[1:].flip(0)]),
                    inverse=True)


class Request:
    """One sampling or inversion job in a :class:`BatchedStepper`.

    ``result`` is None until the request is done; then the sample (shape ``sample_shape``) or,
    for an inversion, the pair ``(x_T, x_T2)``, on the stepper's device, owned by the caller.
    """

    def __init__(self, name: str, sampler: TwoStepSampler, direction: str, num_steps: int):
        self.name, self.sampler, self.direction = name, sampler, direction
        self.num_steps = num_steps  #: ticks (model calls) the request takes
        self.result = None
        self.slot: int | None = None  # where it sits in the batch while active
        self._end = 0  # the stepper tick after which it is done

    @property
    def done(self) -> bool:
        return self.result is not None

    def __repr__(self) -> str:
        state = "done" if self.done else ("active" if self.slot is not None else "cancelled")
        return (f"Request({self.name!r}, {self.sampler.name}, {self.direction}, "
                f"{self.num_steps} steps, {state})")


def _time_dtype(times: Sequence) -> torch.dtype | None:
    """long for integer model times (VP timesteps), float64 for float ones (flow sigmas)."""
    if all(isinstance(t, int) and not isinstance(t, bool) for t in times):
        return torch.long
    if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
        return torch.float64
    return None


def _normal_tensors():
    """Allocate the stepper's buffers as normal tensors even under ``torch.inference_mode()``:
    they are updated in place by later calls, which may run outside it (an inference tensor
    cannot be updated there)."""
    return torch.inference_mode(False)


@contextlib.contextmanager
def _sync_errors():
    """Make any host-device synchronisation raise (it would break a CUDA graph capture)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


class BatchedStepper:
    """Steps many sampling / inversion requests at once: one model call and the fused update per
    tick, requests joining and leaving between ticks (module docstring: layout, CUDA graphs).

    model: ``model(x, t)`` -- or ``model(x, t, cond)`` when ``cond_shape`` is given -- with x the
        stacked states (B, *sample_shape) in ``dtype``, t a (B,) tensor of per-sample model times
        (``sampler.model_times``: long training timesteps for :class:`~belm_kernels.Schedule`
        grids, float64 for float model times such as flow sigmas) and cond (B, *cond_shape); it
        returns the noise prediction (B, *sample_shape), any float dtype, on the same device.
    schedule: the schedule the model was trained on; every request's sampler must use it (for
        a VP schedule: the same alphas_cumprod, so that a timestep means the same noise level).
    sample_shape: the shape of one request's latents (one sample per request, no batch dim).
    capacity: the most requests active at once (the size of every buffer).
    backend: the fused op's backend (see :func:`belm_kernels.lincomb3_`).
    """

    def __init__(self, model: Callable, schedule, sample_shape: Sequence[int], *,
                 capacity: int, dtype: torch.dtype = torch.float32, device="cpu",
                 cond_shape: Sequence[int] | None = None, cond_dtype: torch.dtype | None = None,
                 backend: str = "auto"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a float torch.dtype, got {dtype!r}")
        self.model, self.schedule, self.capacity = model, schedule, capacity
        self.sample_shape = torch.Size(sample_shape)
        self.dtype, self.backend = dtype, backend
        self.cond_shape = None if cond_shape is None else torch.Size(cond_shape)
        self.cond_dtype = cond_dtype or dtype
        alloc = dict(device=torch.device(device))
        with _normal_tensors():
            self._bufs = tuple(torch.zeros(capacity, *self.sample_shape, dtype=dtype, **alloc)
                               for _ in range(2))
            self._cond = (None if cond_shape is None else
                          torch.zeros(capacity, *self.cond_shape, dtype=self.cond_dtype, **alloc))
            self._step = torch.zeros(capacity, dtype=torch.long, **alloc)  # device-side index
            self._one = torch.ones((), dtype=torch.long, **alloc)  # add_(1) would allocate
            self._coef = torch.zeros(capacity, 3, dtype=compute_dtype(dtype), **alloc)  # tick's
            self._coefs = torch.zeros(capacity, 0, 3, dtype=self._coef.dtype, **alloc)  # per slot
        self._prev, self._cur = self._bufs
        self.device = self._prev.device  # with its index ("cuda" -> "cuda:0"): compared exactly
        self._t = self._times = None  # this tick's model times / per slot (dtype: first request)
        self._slots: list[Request | None] = [None] * capacity
        self._S = self._B = 0  # slots [0, S): lincomb3_; [S, B): lincomb3_inverse_
        self._ticks = 0
        self._ends: dict[int, list[Request]] = {}
        self._names = itertools.count()
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._pool = None

    # ------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._B

    @property
    def free(self) -> int:
        """How many more requests fit now."""
        return self.capacity - self._B

    @property
    def requests(self) -> list[Request]:
        """The active requests, in batch order."""
        return self._slots[:self._B]

    def __repr__(self) -> str:
        return (f"BatchedStepper({self._B}/{self.capacity} active, sample_shape="
                f"{tuple(self.sample_shape)}, dtype={self.dtype}, device={self.device})")

    # ------------------------------------------------------------------------------ joining
    def add(self, x: torch.Tensor, sampler: TwoStepSampler, direction: str = "sample", *,
            x_T2: torch.Tensor | None = None, cond: torch.Tensor | None = None,
            name: str | None = None) -> Request:
        """Add a request; it takes its first step at the next tick.

        x: the latents, shape ``sample_shape``, dtype ``dtype``, a dense tensor on the stepper's
            device (never moved between devices here), finite: the noise x_T to sample from, or
            the clean x0 to invert. ``x_T2`` (sampling only) is the second state of an inverted
            pair: sampling then starts from the pair and skips the first step, exactly like
            ``sampler.sample(eps_fn, x_T, x_T2)``.
        sampler: a two-step sampler (``SUPPORTED``) on the stepper's schedule.
        direction: "sample" (result: the sample) or "invert" (result: the pair (x_T, x_T2)).
        cond: this request's conditioning, shape ``cond_shape`` and dtype ``cond_dtype``, dense,
            on the device, without NaN (required iff ``cond_shape`` was given; +-inf is allowed,
            as in an additive attention mask).

        The tensors are copied in detached: the stepper does not differentiate (its ticks run
        under ``no_grad``), so results never require grad and its buffers never join an autograd
        graph; for gradients use the plain samplers. Every check runs, and every copy is made,
        before anything changes: a bad request raises naming it and leaves the others untouched.
        A model that returns NaN or inf is not detected: checking it would cost a host sync per
        tick, which CUDA graph replay cannot have; check ``torch.isfinite(result)`` if needed.
        """
        name = f"#{next(self._names)}" if name is None else str(name)
        who = f"request {name!r}"
        if direction not in DIRECTIONS:
            raise ValueError(f"{who}: direction must be one of {DIRECTIONS}, got {direction!r}")
        self._check_sampler(who, sampler, direction)
        self._check_tensor(who, "latents x", x, self.sample_shape, self.dtype)
        if x_T2 is not None:
            if direction != "sample":
                raise ValueError(f"{who}: x_T2 (the second state of a pair) only makes sense "
                                 "for direction='sample'")
            self._check_tensor(who, "x_T2", x_T2, self.sample_shape, self.dtype)
        if (cond is None) != (self.cond_shape is None):
            raise ValueError(f"{who}: " + ("cond is required: the stepper was built with "
                                           f"cond_shape={tuple(self.cond_shape)}"
                                           if cond is None else
                                           "got cond, but the stepper was built without "
                                           "cond_shape (its model takes no conditioning)"))
        if cond is not None:
            self._check_tensor(who, "cond", cond, self.cond_shape, self.cond_dtype,
                               allow_inf=True)
        plan = step_plan(sampler, direction, from_pair=x_T2 is not None)
        time_dtype = _time_dtype(plan.times)
        if time_dtype is None or (self._times is not None and time_dtype != self._times.dtype):
            raise ValueError(f"{who}: its sampler's model times ({type(plan.times[0]).__name__}) "
                             "do not match the model's "
                             f"({'unset' if self._times is None else self._times.dtype})")
        if self._B == self.capacity:
            raise RuntimeError(f"{who}: the stepper is full ({self.capacity} active requests); "
                               "add it after a tick has finished one (see .free)")
        # Every copy that can fail, before the request joins: its own detached copies of the
        # caller's tensors, its coefficient rows and model times. What follows only copies
        # between the stepper's own tensors.
        x, x_T2, cond = (None if t is None else t.detach().clone() for t in (x, x_T2, cond))
        rows = coef_table(plan.rows, self._prev)
        times = torch.tensor(plan.times, dtype=time_dtype, device=self.device)

        # Every check passed: from here on the request joins.
        self._fit_tables(plan.num_steps, time_dtype)
        slot = self._open_slot(plan.inverse)
        req = Request(name, sampler, direction, plan.num_steps)
        req.slot, req._end = slot, self._ticks + plan.num_steps
        self._slots[slot] = req
        self._ends.setdefault(req._end, []).append(req)
        self._prev[slot].copy_(x)
        self._cur[slot].copy_(x if x_T2 is None else x_T2)
        if cond is not None:
            self._cond[slot].copy_(cond)
        self._coefs[slot, :plan.num_steps].copy_(rows)
        self._times[slot, :plan.num_steps].copy_(times)
        self._step[slot] = 0
        return req

    def cancel(self, request: Request) -> None:
        """Drop an active request (between ticks); it gets no result."""
        if request.slot is None or self._slots[request.slot] is not request:
            raise ValueError(f"request {request.name!r} is not active in this stepper")
        ending = self._ends[request._end]
        ending.remove(request)
        if not ending:
            del self._ends[request._end]
        self._close_slot(request.slot)

    def _check_sampler(self, who: str, sampler, direction: str) -> None:
        if not isinstance(sampler, TwoStepSampler):
            kind = getattr(sampler, "name", type(sampler).__name__)
            why = (" (EDICT couples two sequences with two model calls and four updates per "
                   "step, which does not fit a tick of one call and one update per sample)"
                   if kind == "edict" else "")
            raise TypeError(f"{who}: the batched stepper runs two-step samplers "
                            f"{SUPPORTED} ('euler' in place of 'ddim' on a FlowSchedule), got "
                            f"{kind!r}{why}")
        if getattr(type(sampler), direction) not in _KNOWN[direction]:
            raise TypeError(f"{who}: {type(sampler).__name__} has its own {direction}(), whose "
                            "steps the batched stepper does not know")
        mine, theirs = self.schedule, sampler.schedule
        if type(theirs) is not type(mine):
            raise ValueError(f"{who}: its sampler's grid comes from a {type(theirs).__name__}, "
                             f"but the stepper's model takes the model times of a "
                             f"{type(mine).__name__}")
        ac, other = getattr(mine, "alphas_cumprod", None), getattr(theirs, "alphas_cumprod", None)
        if ac is not None and not (other.shape == ac.shape and torch.equal(other, ac)):
            diff = (f"num_train_timesteps={len(other)}, the model's is {len(ac)}"
                    if other.shape != ac.shape else "alphas_cumprod differ from the model's")
            raise ValueError(f"{who}: its sampler's schedule does not fit the stepper's model "
                             f"({diff}): its timesteps would mean other noise levels")

    def _check_tensor(self, who, what, t, shape, dtype, allow_inf=False) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{who}: {what} has shape {tuple(t.shape)}, the batch's is "
                             f"{tuple(shape)} (one sample per request)")
        if t.dtype != dtype:
            raise ValueError(f"{who}: {what} has dtype {t.dtype}, the batch's is {dtype}")
        if t.layout != torch.strided:
            raise ValueError(f"{who}: {what} is a {t.layout} tensor; the batch holds dense "
                             "(strided) tensors (use .to_dense())")
        if t.device != self.device:
            raise ValueError(f"{who}: {what} is on {t.device}, the stepper on {self.device}: "
                             f"move it there first (the stepper does not copy across devices)")
        # One host sync per tensor at admission; the ticks themselves never sync.
        bad = torch.isnan(t).any() if allow_inf else ~torch.isfinite(t).all()
        if bad:
            raise ValueError(f"{who}: {what} has {'NaN' if allow_inf else 'NaN or inf'} values; "
                             "the request would end NaN")

    # ------------------------------------------------------------------------------ layout
    def _fit_tables(self, num_steps: int, time_dtype: torch.dtype) -> None:
        """Make the per-slot tables at least ``num_steps`` wide (growing drops captured graphs,
        which point at the old tables)."""
        width = self._coefs.shape[1]
        if self._times is not None and num_steps <= width:
            return
        width = max(num_steps, 2 * width)
        with _normal_tensors():
            coefs = self._coefs.new_zeros(self.capacity, width, 3)
            times = torch.zeros(self.capacity, width, dtype=time_dtype, device=self.device)
            if self._t is None:
                self._t = torch.zeros(self.capacity, dtype=time_dtype, device=self.device)
        if self._times is not None:
            coefs[:, :self._coefs.shape[1]] = self._coefs
            times[:, :self._times.shape[1]] = self._times
        self._coefs, self._times = coefs, times
        self._graphs.clear()

    def _open_slot(self, inverse: bool) -> int:
        if inverse:
            slot = self._B
        else:  # the first inversion (if any) moves to the end to make room
            slot = self._S
            if self._B > self._S:
                self._move(self._S, self._B)
            self._S += 1
        self._B += 1
        return slot

    def _close_slot(self, slot: int) -> None:
        self._slots[slot].slot = None
        self._slots[slot] = None
        if slot < self._S:  # refill from the end of the first block, then refill that
            last = self._S - 1
            if slot != last:
                self._move(last, slot)
            if self._B > self._S:
                self._move(self._B - 1, last)
            self._S -= 1
        elif slot != self._B - 1:
            self._move(self._B - 1, slot)
        self._B -= 1

    def _move(self, src: int, dst: int) -> None:
        for buf in (*self._bufs, self._cond, self._coefs, self._times, self._step):
            if buf is not None:
                buf[dst].copy_(buf[src])
        req = self._slots[dst] = self._slots[src]
        self._slots[src] = None
        req.slot = dst

    # ------------------------------------------------------------------------------ stepping
    def tick(self, *, graph: bool = False) -> list[Request]:
        """One step of every active request; returns the requests it finished (they leave).

        ``graph=True`` replays a CUDA graph of the tick (captured on the first tick with this
        layout; raises :class:`GraphCaptureError`, with nothing changed, if it cannot be)."""
        S, B = self._S, self._B
        if B == 0:
            return []
        with torch.no_grad():
            if graph:
                self._graph(S, B).replay()
            else:
                self._tick(self._prev, self._cur, S, B)
        self._prev, self._cur = self._cur, self._prev
        self._ticks += 1
        done = self._ends.pop(self._ticks, [])
        for req in done:  # copy every result out before any slot moves
            cur, prev = self._cur[req.slot].clone(), self._prev[req.slot].clone()
            req.result = cur if req.direction == "sample" else (cur, prev)
        for req in done:
            self._close_slot(req.slot)
        return done

    def run(self, *, graph: bool = False, progress: bool = False) -> list[Request]:
        """Tick until every active request is done; returns them in the order they finished."""
        finished = []
        total = max(self._ends, default=self._ticks) - self._ticks
        with tqdm(total=total, disable=not progress, desc="batched", unit="tick") as bar:
            while self._B:
                finished += self.tick(graph=graph)
                bar.update()
        return finished

    def _gather_and_call(self, cur: torch.Tensor, B: int) -> torch.Tensor:
        """This tick's rows and times into the fixed buffers, then the model on the batch."""
        idx = self._step[:B, None]
        torch.gather(self._times[:B], 1, idx, out=self._t[:B, None])
        torch.gather(self._coefs[:B], 1, idx[..., None].expand(B, 1, 3),
                     out=self._coef[:B, None])
        args = (cur[:B], self._t[:B]) + (() if self._cond is None else (self._cond[:B],))
        eps = self.model(*args)
        if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
            raise TypeError(f"the model must return a float tensor, got "
                            f"{getattr(eps, 'dtype', type(eps).__name__)}")
        if eps.shape != cur[:B].shape or eps.device != self.device:
            raise ValueError(
                f"the model returned shape {tuple(eps.shape)} on {eps.device} for the stacked "
                f"batch of shape {tuple(cur[:B].shape)} on {self.device} (requests "
                f"{[r.name for r in self._slots[:B]]}); it must return one prediction per sample")
        return eps

    def _update(self, prev, cur, eps, S: int, B: int) -> None:
        if S:
            lincomb3_(prev[:S], cur[:S], eps[:S], self._coef[:S], backend=self.backend)
        if S < B:
            lincomb3_inverse_(prev[S:B], cur[S:B], eps[S:B], self._coef[S:B],
                              backend=self.backend)

    def _tick(self, prev, cur, S: int, B: int) -> None:
        eps = self._gather_and_call(cur, B)  # raises before any state is written
        self._update(prev, cur, eps, S, B)
        self._step[:B].add_(self._one)

    # ------------------------------------------------------------------------------ graphs
    def _graph(self, S: int, B: int) -> torch.cuda.CUDAGraph:
        key = (S, B, self._prev is self._bufs[0])
        if key not in self._graphs:
            self._graphs[key] = self._capture(S, B)
        return self._graphs[key]

    def _capture(self, S: int, B: int) -> torch.cuda.CUDAGraph:
        if self.device.type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need a CUDA device; this stepper runs on "
                                    f"{self.device} (use tick() / run() without graph=True)")
        prev, cur = self._prev, self._cur
        stream = torch.cuda.current_stream(self.device)
        # Warm up on a side stream without touching any state: the model (lazy initialisation,
        # algorithm choice) on the real batch, the op (builds, autotuning) on a scratch copy.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            try:
                with _sync_errors():
                    eps = self._gather_and_call(cur, B)
            except RuntimeError as exc:  # "called a synchronizing CUDA operation"
                if "synchroniz" not in str(exc):
                    raise
                raise GraphCaptureError(
                    "the model synchronises with the host (e.g. .item(), .tolist(), .cpu(), "
                    "int(t), printing a CUDA tensor, or a data-dependent shape), which a CUDA "
                    f"graph cannot capture: {exc}") from exc
            self._update(prev[:B].clone(), cur, eps, S, B)
        stream.wait_stream(side)
        del eps
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.Stream(self.device)):
                self._tick(prev, cur, S, B)
        except RuntimeError as exc:
            torch.cuda.set_stream(stream)  # a failed capture_end leaves its stream current
            raise GraphCaptureError(f"capturing the tick into a CUDA graph failed: the model "
                                    f"synchronises with the host or runs an op that cannot be "
                                    f"captured: {exc}") from exc
        return graph
