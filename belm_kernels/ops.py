"""The fused K-term update: public functions, the validator, the dispatch and the torch reference.

    lincomb_(x, terms, coef)           x <- c0*x + c1*t1 + ... + cK*tK            (in place)
    lincomb_inverse_(x, terms, coef)   x <- (x - c1*t1 - ... - cK*tK) / c0        (undoes it)
    lincomb(x, terms, coef, out=...)   out <- c0*x + c1*t1 + ... + cK*tK          (x is read only)
    lincomb3_(x, y, z, coef)           lincomb_(x, (y, z), coef): the three-term step of the BELM
    lincomb3_inverse_(x, y, z, coef)   samplers, and its inverse

``lincomb`` computes up to MAX_OUTPUTS results in the same pass over memory, one coefficient row
each, all from the inputs as they were: a sampler step that also keeps a second result (say
DPM-Solver's data prediction for its next step, or LCM's denoised sample next to its next state)
reads its K+1 inputs once and writes its outputs once.

The path of a call, top to bottom (each step in this module unless named):

1. ``_check_args``: x, the 1 to MAX_TERMS terms and the outputs are dense float tensors with
   data, of one shape and device (each term and each output in any float dtype); coef becomes a
   contiguous (K+1,) or (B, K+1) tensor -- (M, K+1) or (B, M, K+1) for M outputs -- on x's
   device in x's compute dtype (float32, or float64 for float64 x). ``_resolve_name`` turns the
   backend name ("auto" or explicit) into one that is available here and supports x's dtype.
2. The registered op ``belm::lincomb_`` (its outputs mutated in place; x None means the first
   output is also the first input, the in-place update). When autograd has to record the update
   (grad mode on and an argument requires grad), each output is ``belm::lincomb`` instead: the
   same update into a new tensor, whose backward is registered below, copied into the output
   (into x for the in-place functions), so gradients are right on every backend and torch's
   in-place rules (a leaf that requires grad) apply before any write.
3. The op's implementation, ``_run``: ``_check_at_run_time`` (memory overlap, inference tensors,
   a zero leading coefficient of the inverse) and then the backend's kernel: ``torch_update``
   here, ``triton_kernels.run``, or the C++/CUDA op (extension.py).

Step 1 runs while torch.compile traces (its results are guarded); step 3 runs whenever the op
runs, eager or compiled, so no check is lost under torch.compile. (Inductor, the default compiler
backend, hands the op the caller's tensors; ``aot_eager`` runs the functionalized graph as is and
hands it copies of the written tensors, whose overlap checks then see the copies: the update is
computed out of place there and stays well defined.) The C++/CUDA kernels keep their own
memory-safety checks for direct calls of their op.

Backends live in their own modules and are imported lazily, so a missing Triton or a failed
extension build never breaks ``import belm_kernels``.

Aliasing. A written tensor (x of the in-place functions, each output of ``lincomb``) must not
share memory with any other argument: not with a term, coef or another output, and an output not
with x (a kernel may read an input after a thread block elsewhere has written the output); the
terms may alias each other and x. Memory is compared by byte spans, so two interleaved views that
never touch the same element (x = t[::2], y = t[1::2]) are rejected too. A written tensor must not
overlap itself: expanded views and views whose strides provably reach one address twice are
rejected (a stride that is k times another, k smaller than the size of the dimension with the
smaller stride; or a span shorter than the element count). Not detected: a collision that needs
three or more dimensions (sizes (2, 2, 2), strides (2, 3, 5): 2 + 3 = 5); torch's own in-place
ops do not detect it either. Such a tensor gives undefined results.
"""

from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
# Preference order of "auto" per device type; the first available backend wins.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_BACKEND_MODULES = {
    "torch": "belm_kernels.ops",
    "triton": "belm_kernels.triton_kernels",
    "cuda": "belm_kernels.extension",
    "cpu": "belm_kernels.extension",
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The most terms besides x (K), and the most outputs one pass of ``lincomb`` writes (M).
MAX_TERMS = 6
MAX_OUTPUTS = 3


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given device; the message says why."""


class Backend(Protocol):
    name: str
    dtypes: tuple[torch.dtype, ...]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a one-line reason."""

    def run(self, out: list[torch.Tensor], x: torch.Tensor | None, terms: list[torch.Tensor],
            coef: torch.Tensor, inverse: bool) -> None:
        """The kernel, on validated arguments. Inputs (x, *terms) -- x None: x is out[0] as it
        was, the in-place update -- and M = len(out) outputs of the inputs' shape, each in its
        own float dtype, sharing no memory with any other argument (but for out[0] being x when
        x is None). coef is contiguous, in x's compute dtype, on x's device, laid out as
        (rows, M, K+1) with rows 1 (shared) or B = x.shape[0] (per sample; the shape it comes
        in may leave out the size-1 dimensions). Writes out[m] <- coef[row, m] . inputs, or
        for the inverse (M = 1) out[0] <- (x - coef[row, 0, 1:] . terms) / coef[row, 0, 0]."""


# --------------------------------------------------------------------------------------------
# The pure-torch reference backend.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coef_table(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Coefficient rows on ``like``'s device in its compute dtype, contiguous, so that a sampler
    moves its float64 table once per run and each step passes a row view."""
    return rows.to(device=like.device, dtype=compute_dtype(like.dtype)).contiguous()


def _columns(coef: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The K+1 coefficients of one output, each broadcastable against x: a (K+1,) row gives
    0-d-like (1, ..., 1) tensors, (B, K+1) rows give (B, 1, ..., 1) columns."""
    shape = coef.shape[:-1] + (1,) * (x.dim() - coef.dim() + 1) + coef.shape[-1:]
    return coef.reshape(shape).unbind(-1)


def torch_update(out, x, terms, coef, inverse) -> None:
    """The reference kernel: plain torch ops in the compute dtype, one rounding per output."""
    first = out[0] if x is None else x
    ct = compute_dtype(first.dtype)
    wide = [t.to(ct) for t in terms]
    n, m_out = len(terms) + 1, len(out)
    rows = coef.numel() // (n * m_out)
    coef = coef.reshape((m_out, n) if rows == 1 else (rows, m_out, n))
    results = []
    for m in range(m_out):
        cols = _columns(coef[..., m, :], first)
        # One working copy per output, updated in place (no temporaries per term).
        acc = first.to(ct, copy=True)
        if inverse:
            for c, t in zip(cols[1:], wide, strict=True):
                acc.addcmul_(c, t, value=-1)
            acc.div_(cols[0])
        else:
            acc.mul_(cols[0])
            for c, t in zip(cols[1:], wide, strict=True):
                acc.addcmul_(c, t)
        results.append(acc)
    for o, r in zip(out, results, strict=True):  # every output from the inputs as they were
        o.copy_(r)


class _TorchBackend:
    name = "torch"
    dtypes = FLOAT_DTYPES

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    run = staticmethod(torch_update)


torch_backend = _TorchBackend()


# --------------------------------------------------------------------------------------------
# Backend lookup.


_LOADED: dict[str, Backend] = {"torch": torch_backend}


def get_backend(name: str) -> Backend:
    """The backend object for ``name`` (imports its module on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_BACKEND_MODULES[name]).get_backend(name)
    return _LOADED[name]


@functools.cache
def _reason(name: str, device: torch.device) -> str | None:
    try:
        return get_backend(name).unavailable_reason(device)
    except Exception as exc:  # an import error of an optional dependency, say
        return f"{type(exc).__name__}: {exc}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU), best first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("torch",))
    ranked = [n for n in order if _reason(n, device) is None]
    others = [n for n in BACKENDS if n not in ranked and _reason(n, device) is None]
    return ranked + others


@functools.cache
def _resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs: ``name`` itself, checked, or the first suitable one for "auto"."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if _reason(candidate, device) is None and dtype in get_backend(candidate).dtypes:
                return get_backend(candidate)
        return torch_backend
    reason = _reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on {device}: {reason}")
    backend = get_backend(name)
    if dtype not in backend.dtypes:
        raise TypeError(f"backend {name!r} supports x dtypes {backend.dtypes}, got {dtype}")
    return backend


# torch.compile evaluates this once while tracing instead of following the imports inside.
@torch.compiler.assume_constant_result
def _resolve_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    return _resolve(name, device, dtype).name


# --------------------------------------------------------------------------------------------
# Validation: what the op call needs (step 1) and what only the run can check (step 3).


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Raise ValueError unless ``t`` has ``ref``'s shape, dtype and device."""
    for what in ("shape", "dtype", "device"):
        want, got = getattr(ref, what), getattr(t, what)
        if got != want:
            raise ValueError(f"{name} must have {ref_name}'s {what} {want}, got {got}")


def _check_tensor(t, name: str, ref: torch.Tensor | None = None) -> None:
    """Raise unless t is a dense float tensor (with ref's shape and device, if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a float dtype {FLOAT_DTYPES}, got {t.dtype}")
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have x's shape {tuple(ref.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on x's device {ref.device}, got {t.device}")


def _fits(t, ref: torch.Tensor) -> bool:
    """The fast path of _check_tensor (it explains a False)."""
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype in FLOAT_DTYPES
            and t.shape == ref.shape and t.device == ref.device)


def _output_names(count: int) -> list[str]:
    return ["out"] if count == 1 else [f"out[{m}]" for m in range(count)]


def _check_args(out, x, terms, coef, inverse: bool, several: bool, names,
                same_dtype: int) -> torch.Tensor:
    """Step 1: raise unless the arguments can form an op call (x None: in place on out[0]);
    returns coef as a contiguous tensor in x's compute dtype on x's device, of shape (K+1,) or
    (B, K+1) -- (M, K+1) or (B, M, K+1) for several outputs. ``names``: the terms' names in
    messages; the first ``same_dtype`` terms must have x's dtype. Looks at metadata only
    (traceable)."""
    if not isinstance(terms, (list, tuple)):
        raise TypeError(f"terms must be a list or tuple of 1 to {MAX_TERMS} tensors, got "
                        f"{type(terms).__name__}")
    if not 1 <= len(terms) <= MAX_TERMS:
        raise ValueError(f"terms must hold 1 to {MAX_TERMS} tensors, got {len(terms)}")
    first = out[0] if x is None else x
    _check_tensor(first, "x")
    for k, t in enumerate(terms):
        if not _fits(t, first):
            _check_tensor(t, names[k] if names else f"terms[{k}]", first)
        if k < same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{names[k] if names else f'terms[{k}]'} must have x's dtype "
                            f"{first.dtype}, got {t.dtype}")
    if x is not None:
        for m, o in enumerate(out):
            if o is not None and not _fits(o, first):
                _check_tensor(o, _output_names(len(out))[m], first)
    if first.is_meta:
        raise ValueError("the tensors are meta tensors (shape and dtype only, no data); the "
                         "update needs tensors with data")
    return _as_coef(coef, first, inverse, len(terms) + 1, len(out), several)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_coef(coef, x: torch.Tensor, inverse: bool, n: int, m: int,
             several: bool) -> torch.Tensor:
    ct = compute_dtype(x.dtype)
    rows = (m, n) if several else (n,)
    if isinstance(coef, torch.Tensor):
        if not coef.is_floating_point():
            raise TypeError(f"coef must be a float tensor, got {coef.dtype}")
        if coef.device != x.device:
            raise ValueError(f"coef must be on x's device {x.device} (so CUDA graphs can replay "
                             f"new values), got {coef.device}")
        shape = coef.shape
        if shape != rows and not (x.dim() and shape == (x.shape[0], *rows)):
            expected = " or ".join(str(s) for s in [rows] + ([(x.shape[0], *rows)]
                                                             if x.dim() else []))
            raise ValueError(f"coef must have shape {expected}, got {tuple(coef.shape)}")
    else:
        values = list(coef) if several and isinstance(coef, Sequence) else [coef]
        if not (len(values) == m and all(
                isinstance(r, Sequence) and len(r) == n and all(map(_is_number, r))
                for r in values)):
            what = (f"{m} sequences of {n} floats" if several else f"a sequence of {n} floats")
            shape = f"({m}, {n}) or (B, {m}, {n})" if several else f"({n},) or (B, {n})"
            raise TypeError(f"coef must be a float tensor of shape {shape}, or {what}, got "
                            f"{type(coef).__name__}")
        # Checked here, on the host, whatever x's device. float32 rounds |a| <= 2^-150 (half
        # its smallest subnormal; ties to even) to 0: plain float arithmetic, traceable.
        lead = values[0][0]
        if inverse and (lead == 0 or (ct == torch.float32 and abs(lead) <= 2.0 ** -150)):
            _raise_not_invertible(f"{lead!r}, which is 0 in {ct}")
        coef = torch.tensor(values if several else values[0], dtype=ct, device=x.device)
    if coef.dtype != ct:
        coef = coef.to(ct)
    return coef if coef.is_contiguous() else coef.contiguous()


def _raise_not_invertible(what: str):
    raise ValueError("coef[..., 0] must be nonzero for an inverse update (the update with a zero "
                     f"leading coefficient is not invertible); got {what}")


def _check_invertible(coef: torch.Tensor) -> None:
    """coef (K+1,) or (B, K+1) in the compute dtype on the CPU: its leading coefficients, as the
    kernels see them (after rounding: 1e-300 is 0 in float32), must be nonzero."""
    # On the host as Python floats: tensor ops on a few values cost several microseconds each.
    lead = coef.reshape(-1).tolist()[::coef.shape[-1]]
    if 0 in lead:
        _raise_not_invertible(f"{lead if coef.dim() > 1 else lead[0]} in {coef.dtype}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) byte addresses that t's elements span (t non-empty; strides are never negative)."""
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.nbytes
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return lo, lo + (last + 1) * t.element_size()


def _overlaps_itself(t: torch.Tensor) -> bool:
    """True when t's strides provably map two indices to one address (see the module docstring
    for what this does not detect)."""
    if t.is_contiguous():
        return False
    dims = [(n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1]
    if any(s == 0 for _, s in dims):  # an expanded dimension
        return True
    for (n1, s1), (_, s2) in itertools.permutations(dims, 2):
        if s1 <= s2 and s2 % s1 == 0 and s2 // s1 < n1:  # index s2/s1 of dim 1 == index 1 of dim 2
            return True
    span = 1 + sum((n - 1) * s for n, s in dims)
    return span < t.numel()  # more elements than addresses


def _check_at_run_time(out, x, terms, coef, inverse: bool) -> None:
    """Step 3: the checks that need real storage, values or the run's mode; run by the op's
    implementation (eager and compiled alike) before any write. Names are made only for a
    message: this runs on every call."""
    read = list(terms) if x is None else [x, *terms]
    read.append(coef)

    def name(i: int) -> str:  # of read[i], then of out[i - len(read)]
        if i < len(read):
            j = i - (x is not None)
            return "coef" if i == len(read) - 1 else "x" if j < 0 else f"terms[{j}]"
        return "x" if x is None else _output_names(len(out))[i - len(read)]

    for m, o in enumerate(out):
        if o.is_inference() and not torch.is_inference_mode_enabled():
            who = name(len(read) + m)
            raise RuntimeError(f"{who} is an inference tensor (created under "
                               "torch.inference_mode) and cannot be updated in place outside "
                               "inference mode; run the update under torch.inference_mode() or "
                               f"pass {who}.clone()")
        if not o.numel():
            continue
        if o.numel() > 1 and _overlaps_itself(o):
            raise ValueError(f"{name(len(read) + m)} has internally overlapping memory (an "
                             "expanded view, or strides that reach one address twice); an "
                             "in-place update needs one element per address")
        # Memory spans are compared: conservative for interleaved views.
        o0, o1 = _span(o)
        for i, t in enumerate(read + out[m + 1:]):
            if t.numel():
                t0, t1 = _span(t)
                if o0 < t1 and t0 < o1:
                    who = name(len(read) + m)
                    other = name(i) if i < len(read) else name(i + m + 1)
                    raise ValueError(f"{who} must not share memory with {other} ({who} is "
                                     "written)")
    if inverse and coef.device.type == "cpu":  # on a GPU this would cost a device sync
        _check_invertible(coef)


#: The backends whose kernel is the registered op belm::lincomb_ext (extension.py).
KERNEL_OP_BACKENDS = ("cpu", "cuda")


def _kernel_direct(backend: str, first: torch.Tensor, tensors) -> bool:
    """Whether a caller whose outputs are its own buffers -- fresh tensors, or buffers it never
    gives out (the fused schedulers, the batched stepper) -- may call the compiled kernel op
    ``belm::lincomb_ext`` itself instead of the public op. That op checks shapes, dtypes, devices
    and memory overlap in C++ before it writes, so the public op's Python checks would only
    repeat them, at several times the kernel's cost on a small latent. Not when autograd records
    (grad enabled and a tensor requires grad), torch.compile traces or a functorch transform
    runs (the public op's autograd and fake rules), nor on the torch and Triton backends, nor
    when the tensors (None entries skipped) are on different devices: the dispatcher would pick
    one device's kernel (the meta device's writes nothing). The caller checks the zero leading
    coefficient of an inverse (``_check_invertible``), which the kernel does not."""
    device = first.device
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.device != device or (grad and t.requires_grad)):
            return False
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and _resolve_name(backend, device, first.dtype) in KERNEL_OP_BACKENDS)


# --------------------------------------------------------------------------------------------
# Public functions.


def _apply(out, x, terms, coef, backend, inverse: bool, *, several: bool = False, names=None,
           same_dtype: int = 0) -> list[torch.Tensor]:
    """Validate, then run the op. out: the written tensors (None entries: new tensors of x's
    dtype); x None: in place on out[0]. Returns the outputs."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    coef = _check_args(out, x, terms, coef, inverse, several, names, same_dtype)
    first = out[0] if x is None else x
    name = _resolve_name(backend, first.device, first.dtype)
    terms = list(terms)
    if torch.is_grad_enabled() and (first.requires_grad or coef.requires_grad
                                    or any(t.requires_grad for t in terms)):
        # One out-of-place op per output, all computed before any is written.
        results = [torch.ops.belm.lincomb.default(first, terms, coef[..., m, :] if several
                                                  else coef, inverse, name,
                                                  None if o is None else o.dtype)
                   for m, o in enumerate(out)]
        return [r if o is None else o.copy_(r) for o, r in zip(out, results, strict=True)]
    out = [torch.empty_like(first, memory_format=torch.contiguous_format) if o is None else o
           for o in out]
    if _intercepted(first, terms, out):
        torch.ops.belm.lincomb_.default(out, x, terms, coef, inverse, name)
    else:  # what that op runs, without its round trip through the dispatcher into Python
        _run(out, x, terms, coef, inverse, name)
    return out


def _intercepted(first: torch.Tensor, terms, out) -> bool:
    """Whether something may act on the call of belm::lincomb_ itself -- torch.compile tracing
    it, a dispatch mode, a functorch transform (vmap, grad), a tensor subclass -- so that eager
    code must call the op rather than its implementation."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()
            or any(type(t) is not torch.Tensor for t in (first, *terms, *out)))


def lincomb_(x: torch.Tensor, terms: Sequence[torch.Tensor], coef, *,
             backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- coef[..., 0] * x + coef[..., 1] * terms[0] + ... + coef[..., K] *
    terms[K-1]``; returns x.

    terms: a list or tuple of 1 to ``MAX_TERMS`` tensors of x's shape and device, each in any
    float dtype (read as it is, no cast kernel). coef: a float tensor of shape (K+1,) or (B, K+1)
    with B = x.shape[0] (one row per sample), on x's device, or a sequence of K+1 floats. Math in
    float32 (float64 for float64 x), a fused multiply-add per term, rounded once to x's dtype.
    Every check runs before x is written, under torch.compile too. Differentiable in x, the terms
    and coef (when autograd records the update, it runs out of place and is copied into x: one
    extra pass).
    """
    return _apply([x], None, terms, coef, backend, inverse=False)[0]


def lincomb_inverse_(x: torch.Tensor, terms: Sequence[torch.Tensor], coef, *,
                     backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- (x - coef[..., 1] * terms[0] - ... - coef[..., K] * terms[K-1]) /
    coef[..., 0]``; returns x.

    Undoes :func:`lincomb_` with the same terms and coef (a correctly rounded division). A zero
    leading coefficient (after rounding to the compute dtype) is rejected when coef is a sequence
    or lives on the CPU; on a GPU that check would cost a device sync, so it yields inf/nan.
    """
    return _apply([x], None, terms, coef, backend, inverse=True)[0]


def lincomb(x: torch.Tensor, terms: Sequence[torch.Tensor], coef, *, out=None,
            inverse: bool = False, backend: str = "auto"):
    """Out of place, one pass over memory: ``coef[..., 0] * x + coef[..., 1] * terms[0] + ...``
    (with ``inverse=True``: ``(x - coef[..., 1] * terms[0] - ...) / coef[..., 0]``); x and the
    terms are only read.

    out: None (a new tensor of x's dtype), a tensor of x's shape and device in any float dtype,
    or a list or tuple of up to ``MAX_OUTPUTS`` such tensors (None entries: new tensors), each
    computed with its own coefficient row from the same inputs in the same pass: coef is then
    (M, K+1) or (B, M, K+1), or M sequences of K+1 floats. Outputs must not share memory with x,
    the terms, coef or each other. Returns the output, or a tuple of the M outputs. Otherwise as
    :func:`lincomb_` (one rounding per output, to its own dtype).
    """
    several = out is not None and not isinstance(out, torch.Tensor)
    outs = list(out) if several else [out]
    if several and not 1 <= len(outs) <= MAX_OUTPUTS:
        raise ValueError(f"out must hold 1 to {MAX_OUTPUTS} tensors, got {len(outs)}")
    if inverse and len(outs) != 1:
        raise ValueError(f"an inverse update has one output, got {len(outs)}")
    outs = _apply(outs, x, terms, coef, backend, bool(inverse), several=several)
    return tuple(outs) if several else outs[0]


def lincomb3_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
              backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- coef[..., 0] * x + coef[..., 1] * y + coef[..., 2] * z``; returns x.

    :func:`lincomb_` with terms (y, z) (so y is ``terms[0]`` and z ``terms[1]`` in the messages
    of the checks that run inside the op): y has x's dtype, z any float dtype; coef is (3,),
    (B, 3) or three floats.
    """
    return _apply([x], None, (y, z), coef, backend, inverse=False, names=("y", "z"),
                  same_dtype=1)[0]


def lincomb3_inverse_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
                      backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- (x - coef[..., 1] * y - coef[..., 2] * z) / coef[..., 0]``; returns x.

    Undoes :func:`lincomb3_` with the same y, z and coef (see :func:`lincomb_inverse_`).
    """
    return _apply([x], None, (y, z), coef, backend, inverse=True, names=("y", "z"),
                  same_dtype=1)[0]


# --------------------------------------------------------------------------------------------
# torch.library ops. belm::lincomb_ (the outputs written in place) and belm::lincomb (one output,
# out of place, with autograd) are implemented here, for every device
# (CompositeExplicitAutograd), by _run; the compiled backends register their own kernel ops
# (extension.py).

_lib = torch.library.Library("belm", "DEF")
_lib.define("lincomb_(Tensor(a!)[] out, Tensor? x, Tensor[] terms, Tensor coef, bool inverse, "
            "str backend) -> ()")
_lib.define("lincomb(Tensor x, Tensor[] terms, Tensor coef, bool inverse, str backend, "
            "ScalarType? dtype) -> Tensor")
# The compiled kernels' op (csrc/lincomb_cpu.cpp, csrc/lincomb_cuda.cu; see extension.py): the
# contract of Backend.run, with its own memory-safety checks for direct calls.
_lib.define("lincomb_ext(Tensor(a!)[] out, Tensor? x, Tensor[] terms, Tensor coef, bool inverse) "
            "-> ()")
_lincomb_ext = torch.ops.belm.lincomb_ext.default


def _run(out, x, terms, coef, inverse, backend) -> None:
    _check_at_run_time(out, x, terms, coef, inverse)
    get_backend(backend).run(out, x, terms, coef, inverse)
    # The compiled kernels write through data pointers, which autograd does not see: without
    # this, a tensor saved for a backward pass and then updated here would give wrong gradients
    # instead of autograd's "modified by an inplace operation" error.
    for o in out:  # one at a time: older torch versions take a single tensor
        torch.autograd.graph.increment_version(o)


def _run_out_of_place(x, terms, coef, inverse, backend, dtype) -> torch.Tensor:
    """coef: the (K+1,) or (B, K+1) rows of this one output; dtype: the output's (None: x's)."""
    result = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    _run([result], x, terms, coef.contiguous(), inverse, backend)
    return result


torch.library.impl("belm::lincomb_", "CompositeExplicitAutograd", _run, lib=_lib)
torch.library.impl("belm::lincomb", "CompositeExplicitAutograd", _run_out_of_place, lib=_lib)
torch.library.register_fake("belm::lincomb_", lambda out, x, terms, coef, inverse, backend: None,
                            lib=_lib)
torch.library.register_fake(
    "belm::lincomb",
    lambda x, terms, coef, inverse, backend, dtype: torch.empty_like(
        x, dtype=dtype, memory_format=torch.contiguous_format), lib=_lib)
torch.library.register_fake("belm::lincomb_ext", lambda out, x, terms, coef, inverse: None,
                            lib=_lib)


# Backward of belm::lincomb. With s = sums over each coefficient row's elements and c_0 the
# leading coefficient:
#   forward  out = c_0 x + sum_k c_k t_k:    dx = c_0 g, dt_k = c_k g,
#                                            dc_0 = s(g x), dc_k = s(g t_k)
#   inverse  out = (x - sum_k c_k t_k)/c_0:  with h = g / c_0: dx = h, dt_k = -c_k h,
#                                            dc_0 = -s(h out), dc_k = -s(h t_k)

def _setup_context(ctx, inputs, output):
    x, terms, coef, inverse, _, _ = inputs
    ctx.inverse = inverse
    ctx.dtypes = (x.dtype, [t.dtype for t in terms])
    need_coef = ctx.needs_input_grad[2]
    # The forward's dc_0 needs x as it was: the in-place functions overwrite x with the result,
    # so keep a copy (only when coef needs a gradient).
    first = (output if inverse else x.detach().clone()) if need_coef else None
    ctx.save_for_backward(coef, first, *(terms if need_coef else ()))


def _backward(ctx, grad):
    coef, first, *terms = ctx.saved_tensors
    x_dtype, term_dtypes = ctx.dtypes
    cols = _columns(coef, grad)
    g = grad.to(coef.dtype)
    if ctx.inverse:
        g = g / cols[0]
        dx, dterms = g, [-c * g for c in cols[1:]]
    else:
        dx, dterms = cols[0] * g, [c * g for c in cols[1:]]
    dcoef = None
    if ctx.needs_input_grad[2]:
        dims = tuple(range(1 if coef.dim() == 2 else 0, grad.dim()))
        sums = [(g * t.to(coef.dtype)).sum(dim=dims) for t in (first, *terms)]
        dcoef = torch.stack([-s for s in sums] if ctx.inverse else sums, dim=-1)
    dterms = [d.to(dt) for d, dt in zip(dterms, term_dtypes, strict=True)]
    return dx.to(x_dtype), dterms, dcoef, None, None, None


torch.library.register_autograd("belm::lincomb", _backward, setup_context=_setup_context,
                                lib=_lib)
