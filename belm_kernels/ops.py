"""The fused three-term update and its inverse: public functions, the validator, the dispatch and
the torch reference.

    lincomb3_(x, y, z, coef)          x <- a*x + b*y + c*z
    lincomb3_inverse_(x, y, z, coef)  x <- (x - b*y - c*z) / a

The path of a call, top to bottom (each step in this module unless named):

1. ``_check_args``: x, y, z are dense float tensors with data, of one shape and device (y of x's
   dtype, z of any float dtype); coef becomes a contiguous (3,) or (B, 3) tensor on x's device in
   x's compute dtype (float32, or float64 for float64 x). ``_resolve_name`` turns the backend
   name ("auto" or explicit) into one that is available here and supports x's dtype.
2. The registered op ``belm::lincomb3_`` (x mutated in place). When autograd has to record the
   update (grad mode on and an argument requires grad), ``x.copy_(belm::lincomb3(...))`` instead:
   the same update out of place, whose backward is registered below, so gradients are right on
   every backend and torch's in-place rules (a leaf that requires grad) apply before any write.
3. The op's implementation, ``_run``: ``_check_at_run_time`` (memory overlap, inference tensors,
   a zero leading coefficient of the inverse) and then the backend's kernel: ``torch_update``
   here, ``triton_kernels.run``, or the C++/CUDA op ``belm::lincomb3_ext`` (extension.py).

Step 1 runs while torch.compile traces (its results are guarded); step 3 runs whenever the op
runs, eager or compiled, so no check is lost under torch.compile. (Inductor, the default compiler
backend, hands the op the caller's x; ``aot_eager`` runs the functionalized graph as is and hands
it a copy of x, whose overlap checks then see the copy: the update is computed out of place there
and stays well defined.) The C++/CUDA kernels keep their own memory-safety checks for direct calls
of ``torch.ops.belm.lincomb3_ext``.

Backends live in their own modules and are imported lazily, so a missing Triton or a failed
extension build never breaks ``import belm_kernels``.

Aliasing: x must not share memory with y, z or coef (the update is elementwise, but a kernel may
read them after writing x in another thread block); y and z may alias each other. Memory is
compared by byte spans, so two interleaved views that never touch the same element (x = t[::2],
y = t[1::2]) are rejected too. x must not overlap itself: expanded views and views whose strides
provably reach one address twice are rejected (a stride that is k times another, k smaller than
the size of the dimension with the smaller stride; or a span shorter than the element count). Not
detected: a collision that needs three or more dimensions (sizes (2, 2, 2), strides (2, 3, 5):
2 + 3 = 5); torch's own in-place ops do not detect it either. Such an x gives undefined results.
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


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given device; the message says why."""


class Backend(Protocol):
    name: str
    dtypes: tuple[torch.dtype, ...]

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a one-line reason."""

    def run(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
            inverse: bool) -> None:
        """The kernel: apply the update to x in place; arguments are already validated."""


# --------------------------------------------------------------------------------------------
# The pure-torch reference backend.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coef_table(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Coefficient rows on ``like``'s device in its compute dtype, contiguous, so that a sampler
    moves its float64 table once per run and each step passes a (3,) row view."""
    return rows.to(device=like.device, dtype=compute_dtype(like.dtype)).contiguous()


def _columns(coef: torch.Tensor, x: torch.Tensor):
    """(a, b, c), each broadcastable against x: (B, 3) -> (B, 1, ..., 1) per column."""
    return coef.reshape(coef.shape[:-1] + (1,) * (x.dim() - coef.dim() + 1) + (3,)).unbind(-1)


def torch_update(x, y, z, coef, inverse) -> None:
    """The reference kernel: plain torch ops in the compute dtype, one rounding to x's dtype."""
    ct = compute_dtype(x.dtype)
    a, b, c = _columns(coef, x)
    # One working copy, updated in place (no temporaries per term), then one rounding.
    result = x.to(ct, copy=True)
    yf, zf = y.to(ct), z.to(ct)
    if inverse:
        result.addcmul_(b, yf, value=-1).addcmul_(c, zf, value=-1).div_(a)
    else:
        result.mul_(a).addcmul_(b, yf).addcmul_(c, zf)
    x.copy_(result)


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


def _check_args(x, y, z, coef, inverse: bool) -> torch.Tensor:
    """Step 1: raise unless x, y, z and coef can form an op call; returns coef as a contiguous
    tensor in x's compute dtype on x's device. Looks at metadata only (traceable)."""
    for name, t in (("x", x), ("y", y), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a float dtype {FLOAT_DTYPES}, got {t.dtype}")
    if y.dtype != x.dtype:
        raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
    for name, t in (("y", y), ("z", z)):
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if x.is_meta:
        raise ValueError("x, y and z are meta tensors (shape and dtype only, no data); the "
                         "update needs tensors with data")
    return _as_coef(coef, x, inverse)


def _as_coef(coef, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    ct = compute_dtype(x.dtype)
    if isinstance(coef, torch.Tensor):
        if not coef.is_floating_point():
            raise TypeError(f"coef must be a float tensor, got {coef.dtype}")
        if coef.device != x.device:
            raise ValueError(f"coef must be on x's device {x.device} (so CUDA graphs can replay "
                             f"new values), got {coef.device}")
    elif isinstance(coef, Sequence) and len(coef) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in coef):
        # Checked here, on the host, whatever x's device. float32 rounds |a| <= 2^-150 (half
        # its smallest subnormal; ties to even) to 0: plain float arithmetic, traceable.
        if inverse and (coef[0] == 0 or (ct == torch.float32 and abs(coef[0]) <= 2.0 ** -150)):
            _raise_not_invertible(f"{coef[0]!r}, which is 0 in {ct}")
        coef = torch.tensor([float(v) for v in coef], dtype=ct, device=x.device)
    else:
        raise TypeError(f"coef must be a float tensor of shape (3,) or (B, 3), or a sequence of "
                        f"three floats, got {type(coef).__name__}")
    batch = x.shape[0] if x.dim() > 0 else None
    if not (coef.shape == (3,) or (coef.dim() == 2 and coef.shape == (batch, 3))):
        expected = "(3,)" if batch is None else f"(3,) or ({batch}, 3)"
        raise ValueError(f"coef must have shape {expected}, got {tuple(coef.shape)}")
    if coef.dtype != ct:
        coef = coef.to(ct)
    return coef if coef.is_contiguous() else coef.contiguous()


def _raise_not_invertible(what: str):
    raise ValueError("coef[..., 0] must be nonzero for lincomb3_inverse_ (the update with a zero "
                     f"leading coefficient is not invertible); got {what}")


def _check_invertible(coef: torch.Tensor) -> None:
    """coef in the compute dtype on the CPU: its leading coefficients, as the kernels see them
    (after rounding: 1e-300 is 0 in float32), must be nonzero."""
    if bool((coef[..., 0] == 0).any()):
        _raise_not_invertible(f"{coef[..., 0].tolist()} in {coef.dtype}")


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


def _check_at_run_time(x, y, z, coef, inverse: bool) -> None:
    """Step 3: the checks that need real storage, values or the run's mode; run by the op's
    implementation (eager and compiled alike) before any write."""
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("x is an inference tensor (created under torch.inference_mode) and "
                           "cannot be updated in place outside inference mode; run the update "
                           "under torch.inference_mode() or pass x.clone()")
    if x.numel() > 1 and _overlaps_itself(x):
        raise ValueError("x has internally overlapping memory (an expanded view, or strides that "
                         "reach one address twice); an in-place update needs one element per "
                         "address")
    if x.numel():  # memory spans are compared: conservative for interleaved views
        x0, x1 = _span(x)
        for name, t in (("y", y), ("z", z), ("coef", coef)):
            if t.numel():
                t0, t1 = _span(t)
                if x0 < t1 and t0 < x1:
                    raise ValueError(f"x must not share memory with {name} (x is written in "
                                     "place)")
    if inverse and coef.device.type == "cpu":  # on a GPU this would cost a device sync
        _check_invertible(coef)


# --------------------------------------------------------------------------------------------
# Public functions.


def _apply(x, y, z, coef, backend, inverse: bool) -> torch.Tensor:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    coef = _check_args(x, y, z, coef, inverse)
    name = _resolve_name(backend, x.device, x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or z.requires_grad
                                    or coef.requires_grad):
        x.copy_(torch.ops.belm.lincomb3.default(x, y, z, coef, inverse, name))
    else:
        torch.ops.belm.lincomb3_.default(x, y, z, coef, inverse, name)
    return x


def lincomb3_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
              backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- coef[..., 0] * x + coef[..., 1] * y + coef[..., 2] * z``; returns x.

    coef is a float tensor of shape (3,) or (B, 3) with B = x.shape[0], on x's device, or a
    sequence of three floats. z may have another float dtype than x. Math in float32 (float64 for
    float64 x), rounded once to x's dtype. Every check runs before x is written, under
    torch.compile too. Differentiable in x, y, z and coef (when autograd records the update, it
    runs out of place and is copied into x: one extra pass).
    """
    return _apply(x, y, z, coef, backend, inverse=False)


def lincomb3_inverse_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
                      backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- (x - coef[..., 1] * y - coef[..., 2] * z) / coef[..., 0]``; returns x.

    Undoes :func:`lincomb3_` with the same y, z and coef. A zero leading coefficient (after
    rounding to the compute dtype) is rejected when coef is a sequence or lives on the CPU; on a
    GPU that check would cost a device sync, so it yields inf/nan instead.
    """
    return _apply(x, y, z, coef, backend, inverse=True)


# --------------------------------------------------------------------------------------------
# torch.library ops. belm::lincomb3_ and belm::lincomb3 are implemented here, for every device
# (CompositeExplicitAutograd), by _run; belm::lincomb3_ext is implemented by the C++ extension
# (TORCH_LIBRARY_IMPL for CPU/CUDA) and is the kernel of the "cpu" and "cuda" backends.

_lib = torch.library.Library("belm", "DEF")
_lib.define("lincomb3_(Tensor(a!) x, Tensor y, Tensor z, Tensor coef, bool inverse, str backend)"
            " -> ()")
_lib.define("lincomb3(Tensor x, Tensor y, Tensor z, Tensor coef, bool inverse, str backend)"
            " -> Tensor")
_lib.define("lincomb3_ext(Tensor(a!) x, Tensor y, Tensor z, Tensor coef, bool inverse) -> ()")


def _run(x, y, z, coef, inverse, backend) -> None:
    _check_at_run_time(x, y, z, coef, inverse)
    get_backend(backend).run(x, y, z, coef, inverse)


def _run_out_of_place(x, y, z, coef, inverse, backend) -> torch.Tensor:
    _check_at_run_time(x, y, z, coef, inverse)
    out = x.clone(memory_format=torch.contiguous_format)
    get_backend(backend).run(out, y, z, coef, inverse)
    return out


torch.library.impl("belm::lincomb3_", "CompositeExplicitAutograd", _run, lib=_lib)
torch.library.impl("belm::lincomb3", "CompositeExplicitAutograd", _run_out_of_place, lib=_lib)
torch.library.register_fake("belm::lincomb3_", lambda x, y, z, coef, inverse, backend: None,
                            lib=_lib)
torch.library.register_fake(
    "belm::lincomb3",
    lambda x, y, z, coef, inverse, backend: torch.empty_like(
        x, memory_format=torch.contiguous_format), lib=_lib)
torch.library.register_fake("belm::lincomb3_ext", lambda x, y, z, coef, inverse: None, lib=_lib)


# Backward of belm::lincomb3. With s = sums over each coefficient row's elements:
#   forward  out = a x + b y + c z:    dx = a g, dy = b g, dz = c g,
#                                      d(a, b, c) = s(g x), s(g y), s(g z)
#   inverse  out = (x - b y - c z)/a:  with h = g / a: dx = h, dy = -b h, dz = -c h,
#                                      d(a, b, c) = -s(h out), -s(h y), -s(h z)

def _setup_context(ctx, inputs, output):
    x, y, z, coef, inverse, _ = inputs
    ctx.inverse = inverse
    ctx.dtypes = (x.dtype, z.dtype)
    need_coef = ctx.needs_input_grad[3]
    # The forward's d(a) needs x as it was: x is overwritten by the caller's copy_, so keep a
    # copy (only when coef needs a gradient).
    first = (output if inverse else x.detach().clone()) if need_coef else None
    ctx.save_for_backward(coef, first, y if need_coef else None, z if need_coef else None)


def _backward(ctx, grad):
    coef, first, y, z = ctx.saved_tensors
    x_dtype, z_dtype = ctx.dtypes
    a, b, c = _columns(coef, grad)
    g = grad.to(coef.dtype)
    if ctx.inverse:
        g = g / a
        dx, dy, dz = g, -b * g, -c * g
    else:
        dx, dy, dz = a * g, b * g, c * g
    dcoef = None
    if ctx.needs_input_grad[3]:
        dims = tuple(range(1 if coef.dim() == 2 else 0, grad.dim()))
        sums = [(g * t.to(coef.dtype)).sum(dim=dims) for t in (first, y, z)]
        dcoef = torch.stack([-s for s in sums] if ctx.inverse else sums, dim=-1)
    return dx.to(x_dtype), dy.to(x_dtype), dz.to(z_dtype), dcoef, None, None


torch.library.register_autograd("belm::lincomb3", _backward, setup_context=_setup_context,
                                lib=_lib)
