"""Gradients through a whole sampling chain in constant memory: backprop by exact inversion.

``sample_reversible(sampler, model, x_T)`` returns what ``sampler.sample`` returns -- the same
states, computed by the same fused ops from the same coefficient rows, bit for bit -- but
differentiable: its backward gives the gradients with respect to ``x_T`` (and ``x_T2``), to the
conditioning passed in ``cond`` and to every leaf tensor the model uses (its parameters, captured
tensors), as ``torch.utils.checkpoint`` does. Full autograd through N steps keeps N model calls'
activations; checkpointing every call still keeps N latents and recomputes every call. Here the
backward walks the chain backwards and rebuilds each earlier state from the two later ones with
the sampler's exact inverse step, so it keeps a fixed number of latents (the two states, their two
adjoints) plus one model call's activations, whatever N (DESIGN.md section 2c).

Every sampler step here is a short list of *lines*, each one fused op on two state buffers

    S[target] <- A * S[target] + B * S[other] + C * z,     z = model(S[other], t)  or  S[other]

(O-BELM / BDIA: one line per step, the buffers swapping roles; EDICT: two model lines and two
mixing lines). Walking a line backwards, with G the adjoints of the buffers:

    rebuild   S[target] <- (S[target] - B * S[other] - C * z) / A        (lincomb3_inverse_)
    adjoints  G[other]  <- G[other] + B * G[target] + C * dz/dS[other]^T G[target]
              G[target] <- A * G[target]
    leaves    += C * dz/dtheta^T G[target]

where the model line evaluates z = model(S[other]) once, under autograd, for both the rebuild and
the vector-Jacobian product. The rebuild of the very first line is skipped (nothing needs it).

Exactness. The rebuilt states equal the forward ones up to rounding: each line rounds once forward
and once backward, and the inverse recursion amplifies those errors by at most
:func:`rebuild_bound`'s growth factor. In float64 that is ~1e-15 and the gradients equal full
autograd's to ~1e-12; with float32 or 16-bit latents pass ``state_dtype=torch.float64`` (wide
states, as the diffusers schedulers keep them): the model still sees latents in their own dtype,
now the very roundings the forward pass fed it, so the per-step vector-Jacobian products are those
of full autograd through the same wide-state chain.

The model must be deterministic (same output for the same input: no dropout in training mode). The
tensors it differentiates are found by walking the autograd graph of each of its calls in the
forward pass (which therefore runs the model under autograd too, one call's graph at a time).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .ops import coef_table, compute_dtype, lincomb3_, lincomb3_inverse_
from .samplers import BDIASampler, EDICTSampler, OBELMSampler, Sampler, _check_pair

__all__ = ["EXACT_SAMPLERS", "peak_memory", "rebuild_bound", "sample_autograd",
           "sample_reversible"]

#: The samplers whose steps can be undone exactly (``sampler.name``).
EXACT_SAMPLERS = ("obelm", "bdia", "edict")
_EXACT_CLASSES = (OBELMSampler, BDIASampler, EDICTSampler)

#: grad_hook(step, grads) -> None or a replacement pair; see :func:`sample_reversible`.
GradHook = Callable[[int, tuple[torch.Tensor, torch.Tensor]], Sequence[torch.Tensor] | None]


# --------------------------------------------------------------------------------------------
# The chain: a sampler's steps as lines on two buffers.


class _Line(NamedTuple):
    target: int            # buffer written
    other: int             # buffer read (and the model's input on a model line)
    row: torch.Tensor      # (A, B, C) in the states' compute dtype
    adjoint: torch.Tensor  # (1, B, 1) on a model line (the cotangent is pre-scaled by C), else
    #                        (1, B, C): G[other] <- G[other] + B G[target] + (C) zbar
    time: int | float | None  # the model's time argument; None: z = S[other] (a mixing line)


class _Chain:
    """The lines of ``sampler``'s steps from (x_T, x_T2) on two state buffers like ``like``.

    Buffer 0 starts as x_T and buffer 1 as x_T2 (or x_T). O-BELM / BDIA: step j writes the older
    state, buffer (j - first) % 2, from the other one (from the pair, step 0 is skipped); EDICT:
    buffer 0 is its x, buffer 1 its y.
    """

    def __init__(self, sampler: Sampler, like: torch.Tensor, pair: bool):
        ct = compute_dtype(like.dtype)
        times = sampler.model_times

        def adjoint(row, model_line):
            one = torch.ones((), dtype=ct, device=row.device)
            return torch.stack([one, row[1], one if model_line else row[2]])

        self.edict = isinstance(sampler, EDICTSampler)
        if self.edict:
            step, mix = sampler._tables(like)
            mix_adj = adjoint(mix, False)
            self.first = 0
            self._lines = [
                (_Line(0, 1, step[j], adjoint(step[j], True), times[j]),
                 _Line(1, 0, step[j], adjoint(step[j], True), times[j]),
                 _Line(0, 1, mix, mix_adj, None), _Line(1, 0, mix, mix_adj, None))
                for j in range(sampler.num_steps)]
        else:
            coef = coef_table(sampler.rows(), like)
            self.first = 1 if pair else 0
            self._lines = [None] * self.first + [
                (_Line((j - self.first) % 2, 1 - (j - self.first) % 2, coef[j],
                       adjoint(coef[j], True), times[j]),)
                for j in range(self.first, sampler.num_steps)]
        self.steps = range(self.first, sampler.num_steps)

    def lines(self, j: int) -> tuple[_Line, ...]:
        return self._lines[j]

    def output(self) -> int:
        """The buffer that holds the sample at the end."""
        return 0 if self.edict else self._lines[-1][0].target

    def carried(self, j: int) -> tuple[int, int]:
        """The buffers of the state after step j, in the order the gradient hook sees them:
        (x_j, x_{j+1}) for the two-step samplers, (x, y) for EDICT."""
        if self.edict:
            return 0, 1
        line = self._lines[j][0]
        return line.other, line.target


# --------------------------------------------------------------------------------------------
# The model: evaluated under autograd, the tensors it differentiates found from its graph.


def _walk(out: torch.Tensor, since: int | None) -> tuple[list[torch.Tensor], bool]:
    """The leaf tensors requiring grad that ``out`` depends on (its graph's AccumulateGrad
    nodes), and whether its graph reaches nodes made before sequence number ``since`` (a part
    shared with other calls: conditioning prepared once under autograd; None: cannot tell)."""
    found, seen, stack, shared = [], set(), [out.grad_fn], since is None
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if variable is not None:
            found.append(variable)
            continue
        if not shared and node._sequence_nr() < since:
            shared = True
        stack.extend(fn for fn, _ in node.next_functions)
    return found, shared


def _sequence_number(leaf: torch.Tensor) -> int | None:
    """The autograd sequence number the next node made in this thread will exceed (private
    torch API: None when it is missing, and then every graph counts as shared)."""
    try:
        return leaf.view_as(leaf).grad_fn._sequence_nr()
    except AttributeError:
        return None


class _Model:
    """fn(x, t) as the chain calls it: latents in the model's dtype, evaluated in the same grad
    mode (and autocast state) forward and backward, so both passes run the same kernels."""

    def __init__(self, sampler: Sampler, fn, model_dtype: torch.dtype, device: torch.device):
        self.sampler, self.fn, self.model_dtype = sampler, fn, model_dtype
        self.leaves: dict[int, torch.Tensor] = {}   # id -> leaf, in order of discovery
        self.grads: dict[int, torch.Tensor] = {}    # id -> accumulated gradient
        self.shared = False  # some call's graph reaches outside it: keep graphs in the backward
        kind = device.type
        self._autocast = (functools.partial(
            torch.autocast, kind, dtype=torch.get_autocast_dtype(kind),
            cache_enabled=torch.is_autocast_cache_enabled())
            if torch.is_autocast_enabled(kind) else contextlib.nullcontext)

    def _call(self, x: torch.Tensor, t):
        leaf = x.to(self.model_dtype).detach().requires_grad_()
        with torch.enable_grad(), self._autocast():
            since = _sequence_number(leaf)
            out = self.sampler._model(self.fn, leaf, t)
        if not out.requires_grad:
            raise RuntimeError(
                "the model's output does not require grad although its input does: it ran under "
                "torch.no_grad() or detached its input, so no gradient can flow through it")
        return leaf, out, since

    def forward(self, x: torch.Tensor, t, record: bool) -> torch.Tensor:
        """model(x, t) for the forward pass; ``record``: note the leaves it uses."""
        if not record:  # before a DRaFT-K window: no gradient flows here
            with torch.no_grad(), self._autocast():
                return self.sampler._model(self.fn, x.to(self.model_dtype), t)
        leaf, out, since = self._call(x, t)
        leaves, shared = _walk(out, since)
        self.shared |= shared
        for v in leaves:
            if v is not leaf:
                self.leaves.setdefault(id(v), v)
        return out.detach()

    def vjp(self, x: torch.Tensor, t):
        """(model(x, t), pull): pull(cotangent) accumulates the leaves' gradients and returns
        the gradient with respect to x."""
        leaf, out, _ = self._call(x, t)
        inputs = [leaf, *self.leaves.values()]

        def pull(cotangent: torch.Tensor) -> torch.Tensor:
            # A graph part shared by every call (conditioning prepared once from a stand-in
            # leaf) must survive; otherwise the activations are freed as the VJP runs.
            grads = torch.autograd.grad(out, inputs, cotangent.to(out.dtype),
                                        retain_graph=self.shared, allow_unused=True)
            for key, g in zip(self.leaves, grads[1:], strict=True):
                if g is not None:
                    if key in self.grads:
                        self.grads[key].add_(g)
                    else:
                        self.grads[key] = g.to(compute_dtype(g.dtype))
            return torch.zeros_like(leaf) if grads[0] is None else grads[0]

        return out.detach(), pull


# --------------------------------------------------------------------------------------------
# The reverse walk as an autograd function.


class _Run:
    """One differentiable run: the forward pass and what the backward needs (the final states,
    the chain, the model)."""

    def __init__(self, sampler, model: _Model, x_T, x_T2, state_dtype, window, hook, backend,
                 progress):
        self.sampler, self.model, self.hook = sampler, model, hook
        self.backend, self.progress = backend, progress
        self.pair = x_T2 is not None
        self.out_dtype = x_T.dtype
        states = [x_T.detach().to(state_dtype, copy=True),
                  (x_T if x_T2 is None else x_T2).detach().to(state_dtype, copy=True)]
        self.chain = _Chain(sampler, states[0], self.pair)
        steps = self.chain.steps
        self.window = steps[len(steps) - window:]
        bar = sampler._progress(len(steps), progress, "sampling")
        with bar:
            for j in steps:
                record = j >= self.window.start
                for line in self.chain.lines(j):
                    z = (states[line.other] if line.time is None
                         else model.forward(states[line.other], line.time, record))
                    lincomb3_(states[line.target], states[line.other], z, line.row,
                              backend=backend)
                bar.update()
        self.states = states

    def output(self) -> torch.Tensor:
        return self.states[self.chain.output()].to(self.out_dtype, copy=True)

    def backward(self, grad: torch.Tensor):
        """Gradients of x_T, x_T2 and the model's leaves, by the reverse walk."""
        chain, model, backend = self.chain, self.model, self.backend
        S = [s.clone() for s in self.states]  # kept intact: a second backward starts over
        ct = compute_dtype(S[0].dtype)
        G = [torch.zeros_like(S[0], dtype=ct), torch.zeros_like(S[0], dtype=ct)]
        G[chain.output()].copy_(grad)
        start = self.window.start
        with self.sampler._progress(len(self.window), self.progress, "backward") as bar:
            for j in reversed(self.window):
                if self.hook is not None:
                    self._call_hook(j, G)
                lines = chain.lines(j)
                for k in range(len(lines) - 1, -1, -1):
                    line = lines[k]
                    tgt, oth = line.target, line.other
                    if line.time is None:
                        z, pull = S[oth], None
                    else:
                        z, pull = model.vjp(S[oth], line.time)
                    if not (j == start and k == 0):  # the first line's input is never needed
                        lincomb3_inverse_(S[tgt], S[oth], z, line.row, backend=backend)
                    zbar = G[tgt] if pull is None else pull(line.row[2] * G[tgt])
                    lincomb3_(G[oth], G[tgt], zbar, line.adjoint, backend=backend)
                    G[tgt].mul_(line.row[0])
                    del z, pull, zbar
                bar.update()
        if start != chain.steps.start:  # DRaFT-K: the gradient stops at the window
            return None, None
        if self.pair:
            return G[0].to(self.out_dtype), G[1].to(self.out_dtype)
        return (G[0] + G[1]).to(self.out_dtype), None

    def _call_hook(self, j: int, G: list[torch.Tensor]) -> None:
        first, second = self.chain.carried(j)
        new = self.hook(j, (G[first], G[second]))
        if new is not None:
            if not (isinstance(new, Sequence) and len(new) == 2
                    and all(isinstance(g, torch.Tensor) for g in new)):
                raise TypeError(f"grad_hook must return None or a pair of tensors, got "
                                f"{type(new).__name__} at step {j}")
            for k, g in zip((first, second), new, strict=True):
                if g is not G[k]:
                    G[k].copy_(g)


class _ReverseWalk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, x_T, x_T2, *sources):
        ctx.run = run
        ctx.source_dtypes = [s.dtype for s in sources]
        return run.output()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        run = ctx.run
        g_T, g_T2 = run.backward(grad)
        grads = run.model.grads
        sources = [grads.get(key) for key in run.model.leaves]
        sources = [None if g is None else g.to(dtype)
                   for g, dtype in zip(sources, ctx.source_dtypes, strict=True)]
        run.model.grads = {}
        return (None, g_T, g_T2, *sources)


# --------------------------------------------------------------------------------------------
# Checks.


def _check_sampler(sampler) -> None:
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a belm_kernels sampler (bk.get_sampler(...)), got "
                        f"{type(sampler).__name__}")
    if not isinstance(sampler, _EXACT_CLASSES):
        raise ValueError(
            f"backprop by exact inversion needs an exactly invertible sampler, one of "
            f"{EXACT_SAMPLERS}; got {sampler.name!r}, whose step cannot be undone exactly (use "
            "sample_autograd for it)")
    if isinstance(sampler, BDIASampler):
        sampler._check_invertible()  # gamma = 0 is DDIM


def _modules(model) -> list[torch.nn.Module]:
    """The nn.Modules ``model`` is, is a bound method or partial of, or closes over directly."""
    found, todo = [], [model]
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
        elif isinstance(obj, functools.partial):
            todo += [obj.func, *obj.args, *obj.keywords.values()]
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method
            todo.append(obj.__self__)
        elif callable(obj) and getattr(obj, "__closure__", None):
            for cell in obj.__closure__:
                with contextlib.suppress(ValueError):  # an empty cell
                    if isinstance(cell.cell_contents, torch.nn.Module):
                        found.append(cell.cell_contents)
    return found


def check_deterministic(modules: Iterable[torch.nn.Module]) -> None:
    """Refuse dropout in training mode: the backward pass re-evaluates the model and must get the
    very outputs the forward pass used, or the rebuilt states (and gradients) are wrong."""
    for module in modules:
        for name, sub in module.named_modules():
            if (isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.training
                    and sub.p > 0):
                where = f"{type(module).__name__}.{name}" if name else type(module).__name__
                raise ValueError(
                    f"the model has dropout in training mode ({where}, p={sub.p}): backprop by "
                    "exact inversion re-evaluates the model in the backward pass and needs the "
                    "same outputs as the forward pass; call .eval() on it (or set p=0)")


def _check_options(x_T, state_dtype, last_k, num_steps, grad_hook) -> torch.dtype:
    if state_dtype is None:  # 16-bit states cannot be rebuilt: their rounding is amplified
        state_dtype = compute_dtype(x_T.dtype)
    if not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point:
        raise TypeError(f"state_dtype must be a float torch.dtype or None, got {state_dtype!r}")
    if torch.finfo(state_dtype).eps > torch.finfo(x_T.dtype).eps:
        raise ValueError(f"state_dtype must be at least as precise as x_T's dtype {x_T.dtype}, "
                         f"got {state_dtype}")
    if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int)
                               or not 1 <= last_k <= num_steps):
        raise ValueError(f"last_k must be None or an int in [1, {num_steps}] (the steps this run "
                         f"takes), got {last_k!r}")
    if grad_hook is not None and not callable(grad_hook):
        raise TypeError(f"grad_hook must be callable or None, got {type(grad_hook).__name__}")
    return state_dtype


def _as_tensors(cond, name: str = "cond") -> tuple[torch.Tensor, ...]:
    cond = (cond,) if isinstance(cond, torch.Tensor) else tuple(cond)
    for k, c in enumerate(cond):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a tensor, got {type(c).__name__}")
    return cond


def _num_steps(sampler, pair: bool) -> int:
    first = 1 if pair and not isinstance(sampler, EDICTSampler) else 0
    return sampler.num_steps - first


# --------------------------------------------------------------------------------------------
# Public functions.


def run_reversible(sampler: Sampler, fn, x_T: torch.Tensor, x_T2: torch.Tensor | None = None, *,
                   sources: dict[int, torch.Tensor] | None = None,
                   modules: Iterable[torch.nn.Module] = (), last_k: int | None = None,
                   grad_hook: GradHook | None = None, state_dtype: torch.dtype | None = None,
                   backend: str = "auto", progress: bool = False) -> torch.Tensor:
    """:func:`sample_reversible` for a bound ``fn(x, t)``; for adapters (the diffusers one).

    ``sources`` maps id(stand-in) -> tensor: a stand-in is a leaf that ``fn`` uses in place of
    a tensor of the caller's (``t.detach().requires_grad_()``), whose gradient is handed to that
    tensor, so that a non-leaf (prompt embeddings from a text encoder) gets its gradient through
    its own graph, once.
    """
    _check_sampler(sampler)
    _check_pair(x_T, x_T2)
    steps = _num_steps(sampler, x_T2 is not None)
    state_dtype = _check_options(x_T, state_dtype, last_k, steps, grad_hook)
    check_deterministic(modules)
    if not torch.is_grad_enabled():
        raise RuntimeError("sample_reversible runs with grad mode disabled (torch.no_grad() or "
                           "inference_mode): nothing would be differentiated; use sampler.sample "
                           "for plain sampling")
    bound = rebuild_bound(sampler, state_dtype)
    if bound >= 1:
        wider = "" if state_dtype == torch.float64 else "state_dtype=torch.float64, "
        warnings.warn(
            f"{sampler!r} in {state_dtype}: the error model of the rebuilt states "
            f"(rebuild_bound) is {bound:.1e} relative, so neither the rebuilt states nor the "
            f"gradients can be trusted; use {wider}fewer steps or 'obelm'",
            RuntimeWarning, stacklevel=3)
    model = _Model(sampler, fn, x_T.dtype, x_T.device)
    run = _Run(sampler, model, x_T, x_T2, state_dtype, steps if last_k is None else last_k,
               grad_hook, backend, progress)
    sources = sources or {}
    inputs = [sources.get(key, leaf) for key, leaf in model.leaves.items()]
    whole = last_k is None or last_k == steps
    if not (inputs or (whole and (x_T.requires_grad or (x_T2 is not None
                                                       and x_T2.requires_grad)))):
        window = "" if whole else (f" (with last_k={last_k} of {steps} steps x_T and x_T2 get "
                                   "no gradient)")
        raise ValueError(
            "nothing requires grad: neither x_T, x_T2, the conditioning nor any tensor the model "
            f"uses (its parameters){window}; set requires_grad on what to optimise, or use "
            "sampler.sample for plain sampling")
    return _ReverseWalk.apply(run, x_T, x_T2, *inputs)


def sample_reversible(sampler: Sampler, model: Callable, x_T: torch.Tensor,
                      x_T2: torch.Tensor | None = None, *,
                      cond: torch.Tensor | Sequence[torch.Tensor] = (),
                      last_k: int | None = None, grad_hook: GradHook | None = None,
                      state_dtype: torch.dtype | None = None, backend: str = "auto",
                      progress: bool = False) -> torch.Tensor:
    """``sampler.sample(model, x_T, x_T2)``, differentiable in constant memory.

    ``sampler``: an exact sampler (``"obelm"``, ``"bdia"`` or ``"edict"``, on a ``Schedule`` or a
    ``FlowSchedule``). ``model(x, t, *cond)``: the noise (or velocity) prediction, as the
    sampler's ``eps_fn(x, t)`` with the tensors of ``cond`` as extra arguments. Returns the sample
    (in x_T's dtype), the same values as ``sampler.sample(lambda x, t: model(x, t, *cond), x_T,
    x_T2, backend=backend)`` (float32 or float64 x_T, default ``state_dtype``).

    Its backward computes the gradients with respect to x_T and x_T2, every tensor in ``cond``
    (leaf or not: a non-leaf gets its gradient once, through its own graph) and every leaf tensor
    requiring grad that the model uses (parameters, captured tensors), and hands them to autograd
    (``.backward()`` accumulates them into ``.grad``; ``torch.autograd.grad`` returns them). It
    keeps two states, two adjoints and one model call's activations, whatever the number of
    steps; it costs one more model evaluation and one vector-Jacobian product per call.

    * ``last_k``: differentiate only through the last K steps (DRaFT-K); the earlier steps run
      without autograd and x_T, x_T2 get no gradient.
    * ``grad_hook(step, (g_a, g_b))``: called as the backward pass reaches each step (latest
      first) with the gradient of the loss with respect to the two states carried after that
      step (O-BELM / BDIA: x_j and x_{j+1}; EDICT: its x and y), in the states' compute dtype;
      it may modify them in place or return a replacement pair (clipping, logging).
    * ``state_dtype``: the dtype of the states (default: x_T's, at least float32: rebuilt 16-bit
      states are off by their rounding amplified over the steps). ``torch.float64`` (as the
      diffusers schedulers' ``state_dtype``) for float32 or 16-bit latents: the model still gets
      x_T's dtype, and the rebuilt states give it back the very latents of the forward pass, so
      the gradients are those of full autograd through the same chain (see
      :func:`rebuild_bound`).

    The model must be deterministic (an ``nn.Module`` with dropout in training mode is refused).
    Grad mode must be on and something must require grad, or an error says so.
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, *cond), got "
                        f"{type(model).__name__}")
    cond = _as_tensors(cond)
    stand_ins = tuple(c.detach().requires_grad_() if c.requires_grad else c for c in cond)
    sources = {id(s): c for s, c in zip(stand_ins, cond, strict=True) if c.requires_grad}
    fn = functools.partial(_with_cond, model, stand_ins) if cond else model
    return run_reversible(sampler, fn, x_T, x_T2, sources=sources, modules=_modules(model),
                          last_k=last_k, grad_hook=grad_hook, state_dtype=state_dtype,
                          backend=backend, progress=progress)


def _with_cond(model, cond, x, t):
    return model(x, t, *cond)


def sample_autograd(sampler: Sampler, model: Callable, x_T: torch.Tensor,
                    x_T2: torch.Tensor | None = None, *,
                    cond: torch.Tensor | Sequence[torch.Tensor] = (), checkpoint: bool = False,
                    last_k: int | None = None, state_dtype: torch.dtype | None = None,
                    backend: str = "auto", progress: bool = False) -> torch.Tensor:
    """The same chain as :func:`sample_reversible`, differentiated by plain autograd: the
    baseline it is compared with (any sampler, exact or not).

    Every line is the same fused op from the same rows, applied out of place so that autograd
    records it; the forward values are ``sampler.sample``'s bit for bit. Memory grows with the
    number of steps: every model call's activations are kept, or with ``checkpoint=True`` (each
    model call wrapped in ``torch.utils.checkpoint``, non-reentrant) every call's input latents,
    the activations being recomputed in the backward pass. ``last_k``: the earlier steps run
    without autograd and their states are detached (DRaFT-K's truncation).
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a belm_kernels sampler, got {type(sampler).__name__}")
    _check_pair(x_T, x_T2)
    cond = _as_tensors(cond)
    steps = _num_steps(sampler, x_T2 is not None)
    state_dtype = _check_options(x_T, state_dtype, last_k, steps, None)
    model_dtype = x_T.dtype
    S = [x_T.to(state_dtype, copy=True),
         (x_T if x_T2 is None else x_T2).to(state_dtype, copy=True)]
    chain = _Chain(sampler, S[0].detach(), x_T2 is not None)
    start = chain.steps[len(chain.steps) - (steps if last_k is None else last_k)]

    def call(x, t):
        return sampler._model(functools.partial(_with_cond, model, cond), x, t)

    with sampler._progress(steps, progress, "sampling") as bar:
        for j in chain.steps:
            if j == start and j != chain.steps.start:  # DRaFT-K: cut the graph here
                S = [s.detach() for s in S]
            with contextlib.nullcontext() if j >= start else torch.no_grad():
                for line in chain.lines(j):
                    x = S[line.other]
                    if line.time is None:
                        z = x
                    elif checkpoint and j >= start:
                        z = torch.utils.checkpoint.checkpoint(call, x.to(model_dtype), line.time,
                                                              use_reentrant=False)
                    else:
                        z = call(x.to(model_dtype), line.time)
                    S[line.target] = lincomb3_(S[line.target].clone(), x, z, line.row,
                                               backend=backend)
            bar.update()
    return S[chain.output()].to(model_dtype)


def rebuild_bound(sampler: Sampler, dtype: torch.dtype, roundings_per_line: float = 2) -> float:
    """Error model of the states the backward pass rebuilds, relative to the largest state.

    Each line rounds once when the forward pass applies it and once when the backward pass
    undoes it, each time by at most eps/2 of ``dtype`` relative to the terms it combines (about
    the size of the states: at most ``roundings_per_line`` eps per line). An error made at one
    step reaches an earlier one through the inverse recursion, which multiplies it by at most
    ``growth``: O-BELM / BDIA, the largest product of consecutive 1 / a_j (their parasitic mode,
    ``accuracy.parasitic_growth``: 1 on VP grids for O-BELM, 2^N for BDIA with gamma = 0.5);
    EDICT, the 2-norm of its inverse mixing per step, to the power N. To first order in eps (so
    for float64 and float32 states, not 16-bit ones) and neglecting the model's Jacobian term
    (c_j J, small against the coefficients when the step size is):

        max_j |rebuilt_j - x_j| / max_j |x_j| <= roundings_per_line * lines * eps(dtype) * growth

    With wide states the model sees the rebuilt states rounded to its own dtype, which equal the
    forward pass's latents unless a state lies within this bound of a rounding boundary.
    """
    if isinstance(sampler, EDICTSampler):
        p = sampler.p
        mix = torch.tensor([[p, 1 - p], [p * (1 - p), p + (1 - p) ** 2]], dtype=torch.float64)
        growth = float(torch.linalg.matrix_norm(torch.linalg.inv(mix), ord=2)) ** \
            sampler.num_steps
        lines = 4 * sampler.num_steps
    else:
        from .accuracy import parasitic_growth

        growth, lines = parasitic_growth(sampler.rows()), sampler.num_steps
    return roundings_per_line * lines * torch.finfo(dtype).eps * growth


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """(fn(), peak bytes torch allocated on ``device`` while fn ran, above what was allocated
    before). CUDA: the caching allocator's ``max_memory_allocated``; CPU: the profiler's memory
    events (allocations and frees in time order), so it counts tensors, not the Python heap."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return result, peak

