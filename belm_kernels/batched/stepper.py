"""The stepper core: slots, buffers per role, per-slot tables, groups, ticks and their CUDA graphs.

Slots and groups. Every per-request quantity lives in a preallocated buffer of ``capacity`` slots:
the two state buffers (their roles "prev" / "cur" swap after every tick, for all requests at
once), the conditioning, per-slot tables of coefficients, model times and model-input scales, a
device-side step index, the noise buffer and one ring per history stream (allocated when a
request first needs them). Requests that share a :class:`~.plugin.Layout` form a group and sit in
consecutive slots, groups one after the other; a joining request takes the slot after its group's
last (the first slot of each later group moves to that group's end), a leaving one's slot is
refilled by its group's last (then the last of each later group moves down): at most one move
per group.

A tick. It gathers each slot's model time (and model-input scale) through its step index into
fixed buffers, makes ONE model call on the stacked states (divided by their scales if any active
request scales its model input), draws the noise of the requests that draw at this step (each
from its own generator), runs ONE fused op per group with one coefficient row per slot (gathered
the same way), and increments the step index. Nothing is allocated but the model's output (and a
noise draw that cannot be written in place), and nothing on the host changes between ticks except
the host's own bookkeeping.

History. Stream ``name`` has a ring of R buffers (a power of two above its deepest lag): at tick
tau a request writes it into ``ring[tau % R]`` and reads ``name[-j]`` from ``ring[(tau - j) %
R]``. Every request advances one step per tick, so one ring serves all of them; a joining request
finds its slots zeroed (a zero coefficient on a stale value would still read it).

CUDA graphs. The tick reads everything from device memory at fixed addresses, so it is captured
once per layout (the groups and their sizes, whether inputs are scaled, the tick's phase in the
rings) and replayed: ``tick(graph=True)`` captures on first use (after a warm-up of the model
and of the ops on scratch copies) and replays afterwards. The noise is drawn outside the graph,
into the fixed noise buffer, before each replay: a graph cannot capture a CPU generator, nor one
generator per request in the order its fused scheduler would draw.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..ops import _apply, _check_invertible, _kernel_direct, _lincomb_ext, compute_dtype
from ..schedule import Schedule
from .plugin import Layout, Plan, Plugin, merged, relayout
from .schedulers import SchedulerPlugin
from .two_step import TwoStepPlugin

DIRECTIONS = ("sample", "invert")
#: The sampler kinds a stepper runs, asked in this order which one takes a sampler.
PLUGINS: list[Plugin] = [TwoStepPlugin(), SchedulerPlugin()]
#: ``merge_bytes`` by device type: below about this much extra memory traffic per tick, one op
#: over a zero-padded merged layout costs less than a second op launch (bench/bench_batched.py,
#: part 3, measures both sides).
MERGE_BYTES = {"cpu": 1 << 20, "cuda": 2 << 20}


class GraphCaptureError(RuntimeError):
    """A tick could not be captured into a CUDA graph; the message says why. Nothing changed."""


class Request:
    """One sampling or inversion job in a :class:`BatchedStepper`.

    ``result`` is None until the request is done; then the sample (shape ``sample_shape``) or,
    for an inversion, the pair ``(x_T, x_T2)``, on the stepper's device, owned by the caller.
    ``sampler`` is what it runs (for a diffusers scheduler: the fused scheduler with its grid).
    """

    def __init__(self, name: str, sampler, direction: str, num_steps: int):
        self.name, self.sampler, self.direction = name, sampler, direction
        self.num_steps = num_steps  #: ticks (model calls) the request takes
        self.result = None
        self.slot: int | None = None  # where it sits in the batch while active
        self._start = self._end = 0  # the stepper ticks at which it starts and after which it ends
        self._plan: Plan | None = None
        self._group: _Group | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def __repr__(self) -> str:
        state = "done" if self.done else ("active" if self.slot is not None else "cancelled")
        kind = self._plan.kind if self._plan else getattr(self.sampler, "name",
                                                          type(self.sampler).__name__)
        return f"Request({self.name!r}, {kind}, {self.direction}, {self.num_steps} steps, {state})"


@dataclass(eq=False)
class _Group:
    """Requests sharing a layout, in slots [lo, hi)."""

    layout: Layout
    lo: int
    hi: int


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


def _ring_size(lag: int) -> int:
    """Slots of a ring read ``lag`` ticks back: a power of two (so that every ring's phase
    divides the largest one's, which bounds the graphs per layout)."""
    return 1 << lag.bit_length()


class BatchedStepper:
    """Steps many sampling / inversion requests at once: one model call per tick, and one fused
    op per group of requests that share a layout; requests join and leave between ticks (module
    docstring: slots, history, CUDA graphs).

    model: ``model(x, t)`` -- or ``model(x, t, cond)`` when ``cond_shape`` is given -- with x the
        stacked states (B, *sample_shape) in ``dtype`` (each divided by its scheduler's
        ``scale_model_input`` divisor where it has one), t a (B,) tensor of per-sample model times
        in ``time_dtype``, cond (B, *cond_shape); it returns the model output (B, *sample_shape),
        any float dtype, on the same device.
    schedule: the schedule the model was trained on. A :class:`~belm_kernels.Schedule` model takes
        training timesteps, and every request must mean the same noise levels by them (the same
        ``alphas_cumprod``); a :class:`~belm_kernels.FlowSchedule` model takes sigmas.
    sample_shape: the shape of one request's latents (one sample per request, no batch dim).
    capacity: the most requests active at once (the size of every buffer).
    time_dtype: the dtype of t: by default long for a ``Schedule`` (integer timesteps), float64
        otherwise. A request whose model times it cannot hold exactly is refused (Euler with
        Karras sigmas gives fractional timesteps: build the stepper with ``torch.float64``).
    merge_bytes: a request whose layout differs from every group's joins the group whose
        merged layout (zero-padded: :func:`~.plugin.merged`) adds the least memory traffic per
        tick, if that is at most ``merge_bytes`` (one fewer op per tick); else it starts a group.
        Default (None): ``MERGE_BYTES`` of the device type; 0 never merges.
    backend: the fused op's backend (see :func:`belm_kernels.lincomb`).
    """

    def __init__(self, model: Callable, schedule, sample_shape: Sequence[int], *,
                 capacity: int, dtype: torch.dtype = torch.float32, device="cpu",
                 cond_shape: Sequence[int] | None = None, cond_dtype: torch.dtype | None = None,
                 time_dtype: torch.dtype | None = None, merge_bytes: int | None = None,
                 backend: str = "auto"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a float torch.dtype, got {dtype!r}")
        if time_dtype is None:
            time_dtype = torch.long if isinstance(schedule, Schedule) else torch.float64
        if time_dtype not in (torch.long, torch.float32, torch.float64):
            raise TypeError(f"time_dtype must be torch.long, torch.float32 or torch.float64, got "
                            f"{time_dtype!r}")
        if merge_bytes is None:
            merge_bytes = MERGE_BYTES.get(torch.device(device).type, 0)
        if isinstance(merge_bytes, bool) or not isinstance(merge_bytes, int) or merge_bytes < 0:
            raise ValueError(f"merge_bytes must be an int >= 0 or None, got {merge_bytes!r}")
        self.merge_bytes = merge_bytes
        self.model, self.schedule, self.capacity = model, schedule, capacity
        self.sample_shape = torch.Size(sample_shape)
        self.dtype, self.time_dtype, self.backend = dtype, time_dtype, backend
        self.cond_shape = None if cond_shape is None else torch.Size(cond_shape)
        self.cond_dtype = cond_dtype or dtype
        self._ct = compute_dtype(dtype)
        alloc = dict(device=torch.device(device))
        with _normal_tensors():
            self._bufs = tuple(torch.zeros(capacity, *self.sample_shape, dtype=dtype, **alloc)
                               for _ in range(2))
            self._cond = (None if cond_shape is None else
                          torch.zeros(capacity, *self.cond_shape, dtype=self.cond_dtype, **alloc))
            self._step = torch.zeros(capacity, dtype=torch.long, **alloc)  # device-side index
            self._one = torch.ones((), dtype=torch.long, **alloc)  # add_(1) would allocate
            # Per slot and step: the flattened (M, K+1) coefficients, the model time, the scale.
            self._coefs = torch.zeros(capacity, 0, 3, dtype=self._ct, **alloc)
            self._times = torch.zeros(capacity, 0, dtype=time_dtype, **alloc)
            self._coef = torch.zeros(capacity, 3, dtype=self._ct, **alloc)  # this tick's
            self._t = torch.zeros(capacity, dtype=time_dtype, **alloc)
        self.device = self._bufs[0].device  # with its index ("cuda" -> "cuda:0"): compared exactly
        self._scales = self._scale = self._x_in = None  # model-input scaling, when first needed
        self._noise = None  # the noise drawn for this tick, when first needed
        self._rings: dict[str, torch.Tensor] = {}  # history stream -> (R, capacity, *shape)
        self._slots: list[Request | None] = [None] * capacity
        self._groups: list[_Group] = []  # the non-empty groups, in slot order
        self._B = self._ticks = 0
        self._scaled = 0  # active requests whose model input is scaled
        self._noisy: list[Request] = []  # active requests that draw noise
        self._ends: dict[int, list[Request]] = {}
        self._names = itertools.count()
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
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

    @property
    def _prev(self) -> torch.Tensor:
        """The state buffer the next tick writes."""
        return self._bufs[self._ticks % 2]

    @property
    def _cur(self) -> torch.Tensor:
        """The state buffer the next tick's model reads."""
        return self._bufs[(self._ticks + 1) % 2]

    # ------------------------------------------------------------------------------ joining
    def add(self, x: torch.Tensor, sampler, direction: str = "sample", *,
            x_T2: torch.Tensor | None = None, cond: torch.Tensor | None = None,
            name: str | None = None, generator: torch.Generator | None = None,
            **options) -> Request:
        """Add a request; it takes its first step at the next tick.

        x: the latents, shape ``sample_shape``, dtype ``dtype``, a dense tensor on the stepper's
            device (never moved between devices here), finite: the noise x_T to sample from (for
            a diffusers scheduler: as its pipeline starts it, ``init_noise_sigma`` included), or
            the clean x0 to invert. ``x_T2`` (two-step sampling only) is the second state of an
            inverted pair: sampling then starts from the pair and skips the first step, exactly
            like ``sampler.sample(eps_fn, x_T, x_T2)``.
        sampler: a two-step sampler (``SUPPORTED``) on the stepper's schedule, or a diffusers
            scheduler that :func:`belm_kernels.diffusers.fuse` supports, fused or not (it runs
            fused; from its ``begin_index`` if one is set).
        direction: "sample" (result: the sample) or "invert" (result: the pair (x_T, x_T2);
            two-step samplers only).
        cond: this request's conditioning, shape ``cond_shape`` and dtype ``cond_dtype``, dense,
            on the device, without NaN (required iff ``cond_shape`` was given; +-inf is allowed,
            as in an additive attention mask).
        generator: the request's own generator, for a scheduler that draws noise (Euler
            ancestral, SDE DPM-Solver++, LCM, DDIM with eta > 0, stochastic flow Euler): the
            draws are the fused scheduler's alone with it. None: torch's default generator.
        options: for a diffusers scheduler, its ``set_timesteps`` arguments
            (``num_inference_steps=20``, ``sigmas=``, ``mu=``, ...; the caller's scheduler is not
            changed: a copy is set) and the step arguments its coefficients depend on (DDIM's
            ``eta``).

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
        if x_T2 is not None and direction != "sample":
            raise ValueError(f"{who}: x_T2 (the second state of a pair) only makes sense for "
                             "direction='sample'")
        plugin = next((p for p in PLUGINS if p.accepts(sampler)), None)
        if plugin is None:
            kind = getattr(sampler, "name", type(sampler).__name__)
            hints = "".join(p.hint(sampler) for p in PLUGINS)
            others = "; ".join(p.description for p in PLUGINS[1:])
            raise TypeError(f"{who}: the batched stepper runs {PLUGINS[0].description}, got "
                            f"{kind!r}{hints}; it also runs {others}")
        plan = plugin.plan(self, who, sampler, direction, from_pair=x_T2 is not None,
                           generator=generator, options=options)
        plan.check()
        self._check_tensor(who, "latents x", x, self.sample_shape, self.dtype)
        if x_T2 is not None:
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
        times = self._model_times(who, plan)
        if self._B == self.capacity:
            raise RuntimeError(f"{who}: the stepper is full ({self.capacity} active requests); "
                               "add it after a tick has finished one (see .free)")
        # Every copy that can fail, before the request joins: its own detached copies of the
        # caller's tensors, its coefficients, model times and scales on the device, the buffers
        # it needs. What follows only copies between the stepper's own tensors.
        x, x_T2, cond = (None if t is None else t.detach().clone() for t in (x, x_T2, cond))
        n = plan.num_steps
        group, layout = self._group_for(plan.layout)
        coef = relayout(plan.coef, plan.layout, layout).reshape(n, -1)
        coef = coef.to(device=self.device, dtype=self._ct)
        times = times.to(self.device)
        scales = None if plan.scales is None else self._scale_rows(plan.scales)
        self._fit_tables(n, coef.shape[1], scaled=scales is not None)
        for stream, lag in layout.reads().items():
            self._fit_ring(stream, _ring_size(lag))
        for stream in layout.history:
            self._fit_ring(stream, 1)
        if "noise" in layout.inputs():
            self._fit_noise()

        # Every check passed: from here on the request joins.
        req = Request(name, plan.sampler, direction, n)
        req._plan, req._start, req._end = plan, self._ticks, self._ticks + n
        if group is None:
            group = _Group(layout, self._B, self._B)
            self._groups.append(group)
        elif group.layout != layout:
            self._relayout(group, layout)
        req._group = group
        slot = self._open_slot(group)
        req.slot = slot
        self._slots[slot] = req
        self._ends.setdefault(req._end, []).append(req)
        self._prev[slot].copy_(x)
        self._cur[slot].copy_(x if x_T2 is None else x_T2)
        if cond is not None:
            self._cond[slot].copy_(cond)
        self._coefs[slot, :n, :coef.shape[1]].copy_(coef)
        self._times[slot, :n].copy_(times)
        if scales is not None:
            self._scales[slot, :n].copy_(scales)
        elif self._scales is not None:
            self._scales[slot].fill_(1)
        for ring in self._rings.values():
            ring[:, slot].zero_()
        self._step[slot] = 0
        self._scaled += scales is not None
        if plan.draw is not None:
            self._noisy.append(req)
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

    def _model_times(self, who: str, plan: Plan) -> torch.Tensor:
        """The plan's model times in ``time_dtype`` (on the host), which must hold them exactly."""
        try:
            exact = torch.tensor(plan.times, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            exact = None
        times = None if exact is None else exact.to(self.time_dtype)
        if times is None or exact.dim() != 1 or not torch.equal(times.double(), exact):
            fix = (" (fractional timesteps, e.g. Euler with Karras sigmas: build the stepper "
                   "with time_dtype=torch.float64)" if self.time_dtype == torch.long else "")
            raise ValueError(f"{who}: its model times {list(plan.times)[:4]}... are not numbers "
                             f"that the stepper's time_dtype {self.time_dtype} holds "
                             f"exactly{fix}")
        return times

    def _scale_rows(self, scales: torch.Tensor) -> torch.Tensor:
        """A request's model-input divisors as the tick applies them, so that each sample gets
        torch's ``sample / d`` for a CPU 0-d tensor d (what ``scale_model_input`` computes) bit
        for bit: on CUDA that kernel multiplies by the reciprocal, computed in the compute dtype;
        elsewhere it divides (d rounded to the compute dtype: to the sample's dtype, or kept in
        float32 for a float16 / bfloat16 sample)."""
        d = scales.to(self._ct)
        if self.device.type == "cuda":
            d = 1.0 / d
        return d.to(self.device)

    # ------------------------------------------------------------------------------ layout
    def _fit_tables(self, num_steps: int, width: int, scaled: bool) -> None:
        """Make the per-slot tables at least ``num_steps`` long and ``width`` wide, with scales
        if needed (growing drops captured graphs, which point at the old tables)."""
        steps, w = self._coefs.shape[1:]
        if num_steps > steps or width > w:
            steps, w = max(num_steps, 2 * steps), max(width, w)
            with _normal_tensors():
                coefs = self._coefs.new_zeros(self.capacity, steps, w)
                times = self._times.new_zeros(self.capacity, steps)
                coef = self._coef.new_zeros(self.capacity, w)
                scales = None if self._scales is None else self._scales.new_ones(self.capacity,
                                                                                  steps)
            coefs[:, :self._coefs.shape[1], :self._coefs.shape[2]] = self._coefs
            times[:, :self._times.shape[1]] = self._times
            if scales is not None:
                scales[:, :self._scales.shape[1]] = self._scales
            self._coefs, self._times, self._coef, self._scales = coefs, times, coef, scales
            self._graphs.clear()
        if scaled and self._scales is None:
            with _normal_tensors():
                self._scales = self._coefs.new_ones(self.capacity, self._coefs.shape[1])
                self._scale = self._coefs.new_ones(self.capacity)
                self._x_in = torch.zeros_like(self._bufs[0])
            self._graphs.clear()

    def _fit_ring(self, stream: str, size: int) -> None:
        """A ring of at least ``size`` buffers for ``stream``; a grown ring keeps what the active
        requests wrote in the ticks it still reads."""
        ring = self._rings.get(stream)
        if ring is not None and len(ring) >= size:
            return
        size = max(size, 1 if ring is None else len(ring))
        with _normal_tensors():
            grown = self._bufs[0].new_zeros(size, *self._bufs[0].shape)
        if ring is not None:
            for j in range(1, len(ring)):  # written j ticks before the next one
                grown[(self._ticks - j) % size] = ring[(self._ticks - j) % len(ring)]
        self._rings[stream] = grown
        self._graphs.clear()

    def _fit_noise(self) -> None:
        if self._noise is None:
            with _normal_tensors():  # wide enough for every draw (float32 noise of a half model)
                self._noise = self._bufs[0].new_zeros(
                    self._bufs[0].shape, dtype=torch.promote_types(self.dtype, torch.float32))
            self._graphs.clear()

    def _group_for(self, layout: Layout) -> tuple[_Group | None, Layout]:
        """The group a request of ``layout`` joins (None: a new one) and the group's layout
        after it joins. Changes nothing."""
        same = next((g for g in self._groups if g.layout == layout), None)
        if same is not None:
            return same, layout
        passes = lambda lay: sum(lay.shape)  # noqa: E731 (buffers read or written per slot)
        size = self.sample_shape.numel() * self._bufs[0].element_size()
        best = (self.merge_bytes, None, layout)
        for g in self._groups:
            union = merged(g.layout, layout)
            if union is None:
                continue
            extra = size * ((passes(union) - passes(g.layout)) * (g.hi - g.lo)
                            + passes(union) - passes(layout))
            if extra <= best[0]:
                best = (extra, g, union)
        return best[1], best[2]

    def _relayout(self, group: _Group, layout: Layout) -> None:
        """Give a group another layout (merged with a joining request's, or narrowed to its
        members' after one left): its slots' coefficients at the new places."""
        n, steps = group.hi - group.lo, self._coefs.shape[1]
        old, new = group.layout.shape, layout.shape
        rows = self._coefs[group.lo:group.hi, :, :old[0] * old[1]].reshape(n, steps, *old)
        rows = relayout(rows, group.layout, layout).reshape(n, steps, -1)
        self._coefs[group.lo:group.hi, :, :new[0] * new[1]] = rows
        group.layout = layout

    def _open_slot(self, group: _Group) -> int:
        later = self._groups[self._groups.index(group) + 1:]
        for g in reversed(later):  # each later group's first slot moves to its end
            if g.hi > g.lo:
                self._move(g.lo, g.hi)
            g.lo, g.hi = g.lo + 1, g.hi + 1
        group.hi += 1
        self._B += 1
        return group.hi - 1

    def _close_slot(self, slot: int) -> None:
        req = self._slots[slot]
        group = req._group
        req.slot = None
        self._slots[slot] = None
        if req in self._noisy:
            self._noisy.remove(req)
        self._scaled -= req._plan.scales is not None
        free = group.hi - 1
        if slot != free:  # refill from the end of the group, then refill that from the next
            self._move(free, slot)
        group.hi -= 1
        for g in self._groups[self._groups.index(group) + 1:]:
            if g.hi > g.lo:
                self._move(g.hi - 1, free)
            g.lo, g.hi = g.lo - 1, g.hi - 1
            free = g.hi
        self._groups = [g for g in self._groups if g.hi > g.lo]
        self._B -= 1
        if group.hi > group.lo:  # no wider than its members need any more
            members = [r._plan.layout for r in self._slots[group.lo:group.hi]]
            narrow = functools.reduce(lambda a, b: a and merged(a, b), members)
            if narrow is not None and narrow != group.layout:
                self._relayout(group, narrow)

    def _move(self, src: int, dst: int) -> None:
        for buf in (*self._bufs, self._cond, self._coefs, self._times, self._scales, self._step):
            if buf is not None:
                buf[dst].copy_(buf[src])
        for ring in self._rings.values():
            ring[:, dst].copy_(ring[:, src])
        req = self._slots[dst] = self._slots[src]
        self._slots[src] = None
        req.slot = dst

    # ------------------------------------------------------------------------------ stepping
    def tick(self, *, graph: bool = False) -> list[Request]:
        """One step of every active request; returns the requests it finished (they leave).

        ``graph=True`` replays a CUDA graph of the tick (captured on the first tick with this
        layout; raises :class:`GraphCaptureError`, with nothing changed, if it cannot be)."""
        if self._B == 0:
            return []
        with torch.no_grad():
            if graph:
                replay = self._graph().replay
                self._draw_noise()
                replay()
            else:
                self._tick(draw=True)
        self._ticks += 1
        done = self._ends.pop(self._ticks, [])
        for req in done:  # copy every result out before any slot moves
            cur = self._cur[req.slot].clone()
            req.result = cur if req._plan.result == "sample" else (cur,
                                                                   self._prev[req.slot].clone())
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

    def _role(self, role: str, eps: torch.Tensor) -> torch.Tensor:
        """The buffer of ``role`` at this tick, all slots."""
        if role == "model_output":
            return eps
        if role in ("prev", "cur"):
            return getattr(self, f"_{role}")
        if role == "noise":
            return self._noise
        name, j = role[:-1].split("[-")
        ring = self._rings[name]
        return ring[(self._ticks - int(j)) % len(ring)]

    def _gather_and_call(self) -> torch.Tensor:
        """This tick's model times (and scales) into the fixed buffers, then the model call."""
        B = self._B
        idx = self._step[:B, None]
        torch.gather(self._times[:B], 1, idx, out=self._t[:B, None])
        x = self._cur[:B]
        if self._scaled:
            torch.gather(self._scales[:B], 1, idx, out=self._scale[:B, None])
            scale = self._scale[:B].view(B, *(1,) * len(self.sample_shape))
            scaled = torch.mul if self.device.type == "cuda" else torch.div  # see _scale_rows
            x = scaled(x, scale, out=self._x_in[:B])
        args = (x, self._t[:B]) + (() if self._cond is None else (self._cond[:B],))
        eps = self.model(*args)
        if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
            raise TypeError(f"the model must return a float tensor, got "
                            f"{getattr(eps, 'dtype', type(eps).__name__)}")
        if eps.shape != x.shape or eps.device != self.device:
            raise ValueError(
                f"the model returned shape {tuple(eps.shape)} on {eps.device} for the stacked "
                f"batch of shape {tuple(x.shape)} on {self.device} (requests "
                f"{[r.name for r in self._slots[:B]]}); it must return one prediction per sample")
        return eps

    def _draw_noise(self) -> None:
        """The noise of the requests that draw at this step, each from its own generator."""
        for req in self._noisy:
            if req._plan.noise[self._ticks - req._start]:
                req._plan.draw(self._noise[req.slot])

    def _update(self, eps: torch.Tensor, scratch: bool = False) -> None:
        """One fused op per group (``scratch``: into copies of what it writes, for a warm-up)."""
        flat = self._coef.view(-1)
        for g in self._groups:
            lo, hi, layout = g.lo, g.hi, g.layout
            n, (m, k) = hi - lo, layout.shape
            # This tick's rows, contiguous: (n, M, K+1) from row lo of the gathered buffer on.
            coef = flat[lo * self._coef.shape[1]:][:n * m * k]
            torch.gather(self._coefs[lo:hi, :, :m * k], 1,
                         self._step[lo:hi].view(n, 1, 1).expand(n, 1, m * k),
                         out=coef.view(n, 1, m * k))
            outs = [self._prev[lo:hi]] + [self._rings[s][self._ticks % len(self._rings[s])][lo:hi]
                                          for s in layout.history]
            if scratch:
                outs = [o.clone() for o in outs]
            terms = [self._role(r, eps)[lo:hi] for r in layout.terms]
            x = None if layout.x == "prev" else self._role(layout.x, eps)[lo:hi]
            coef = coef.view(n, m, k) if m > 1 else coef.view(n, k)
            if _kernel_direct(self.backend, outs[0], (*outs, x, *terms)):  # own buffers
                if layout.inverse and coef.device.type == "cpu":
                    _check_invertible(coef)
                _lincomb_ext(outs, x, terms, coef, layout.inverse)
            else:
                _apply(outs, x, terms, coef, self.backend, layout.inverse, several=m > 1)

    def _tick(self, draw: bool = False) -> None:
        eps = self._gather_and_call()  # raises before any state is written
        if draw:
            self._draw_noise()
        self._update(eps)
        self._step[:self._B].add_(self._one)

    # ------------------------------------------------------------------------------ graphs
    def _graph(self) -> torch.cuda.CUDAGraph:
        period = max([2, *(len(r) for r in self._rings.values())])
        key = (tuple((g.layout, g.hi - g.lo) for g in self._groups), bool(self._scaled),
               self._ticks % period)
        if key not in self._graphs:
            self._graphs[key] = self._capture()
        return self._graphs[key]

    def _capture(self) -> torch.cuda.CUDAGraph:
        if self.device.type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need a CUDA device; this stepper runs on "
                                    f"{self.device} (use tick() / run() without graph=True)")
        stream = torch.cuda.current_stream(self.device)
        # Warm up on a side stream without touching any state: the model (lazy initialisation,
        # algorithm choice) on the real batch, the ops (builds, autotuning) into scratch copies.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            try:
                with _sync_errors():
                    eps = self._gather_and_call()
            except RuntimeError as exc:  # "called a synchronizing CUDA operation"
                if "synchroniz" not in str(exc):
                    raise
                raise GraphCaptureError(
                    "the model synchronises with the host (e.g. .item(), .tolist(), .cpu(), "
                    "int(t), printing a CUDA tensor, or a data-dependent shape), which a CUDA "
                    f"graph cannot capture: {exc}") from exc
            self._update(eps, scratch=True)
        stream.wait_stream(side)
        del eps
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=torch.cuda.Stream(self.device)):
                self._tick()
        except RuntimeError as exc:
            torch.cuda.set_stream(stream)  # a failed capture_end leaves its stream current
            raise GraphCaptureError(f"capturing the tick into a CUDA graph failed: the model "
                                    f"synchronises with the host or runs an op that cannot be "
                                    f"captured: {exc}") from exc
        return graph
