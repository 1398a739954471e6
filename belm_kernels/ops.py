"""The fused three-term update and its inverse, with argument checks and backend dispatch.

    lincomb3_(x, y, z, coef)          x <- a*x + b*y + c*z
    lincomb3_inverse_(x, y, z, coef)  x <- (x - b*y - c*z) / a

Every backend implements one function ``run(x, y, z, coef, inverse)`` that receives arguments
already validated here: x, y same shape/dtype/device, z same shape and device with any float dtype,
coef a contiguous (3,) or (B, 3) tensor on x's device in x's compute dtype (float32, or float64
for float64 x). Backends live in their own modules and are imported lazily, so a missing Triton
or a failed extension build never breaks ``import belm_kernels``.

Aliasing rule: x must not share memory with y or z (the update is elementwise, but a backend may
read y/z after writing x in another thread block). y and z may alias each other.
"""

from __future__ import annotations

import functools
import importlib
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
        """Apply the update to x in place; arguments are already validated."""


# --------------------------------------------------------------------------------------------
# The pure-torch reference backend.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def coef_table(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Coefficient rows on ``like``'s device in its compute dtype, contiguous, so that a sampler
    moves its float64 table once per run and each step passes a (3,) row view."""
    return rows.to(device=like.device, dtype=compute_dtype(like.dtype)).contiguous()


class _TorchBackend:
    name = "torch"
    dtypes = FLOAT_DTYPES

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def run(self, x, y, z, coef, inverse):
        ct = compute_dtype(x.dtype)
        # (B, 3) -> (B, 1, ..., 1) per column so each row scales its own sample.
        cols = coef.reshape(coef.shape[:-1] + (1,) * (x.dim() - coef.dim() + 1) + (3,)).unbind(-1)
        a, b, c = cols
        # One working copy, updated in place (no temporaries per term), then one rounding.
        result = x.to(ct, copy=True)
        yf, zf = y.to(ct), z.to(ct)
        if inverse:
            result.addcmul_(b, yf, value=-1).addcmul_(c, zf, value=-1).div_(a)
        else:
            result.mul_(a).addcmul_(b, yf).addcmul_(c, zf)
        x.copy_(result)


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


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
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
# Validation.


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory spans of a and b intersect (conservative for interleaved views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.storage_offset() + sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
        hi = t.storage_offset() + sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
        return lo * t.element_size(), (hi + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Raise ValueError unless ``t`` has ``ref``'s shape, dtype and device."""
    for what in ("shape", "dtype", "device"):
        want, got = getattr(ref, what), getattr(t, what)
        if got != want:
            raise ValueError(f"{name} must have {ref_name}'s {what} {want}, got {got}")


def _check_tensors(x, y, z) -> None:
    for name, t in (("x", x), ("y", y), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a float dtype {FLOAT_DTYPES}, got {t.dtype}")
    if y.dtype != x.dtype:
        raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
    for name, t in (("y", y), ("z", z)):
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if torch.compiler.is_compiling():
        return  # memory layout checks need real storage; they ran in eager mode
    if x.numel() > 1 and torch._debug_has_internal_overlap(x) == 1:
        raise ValueError("x has internally overlapping memory (an expanded view?); "
                         "an in-place update needs one element per address")
    for name, t in (("y", y), ("z", z)):
        if _overlap(x, t):
            raise ValueError(f"x must not share memory with {name} (x is written in place)")


def _as_coef(coef, x: torch.Tensor) -> torch.Tensor:
    """Validate coef and return it contiguous, on x's device, in x's compute dtype."""
    ct = compute_dtype(x.dtype)
    if isinstance(coef, torch.Tensor):
        if not coef.is_floating_point():
            raise TypeError(f"coef must be a float tensor, got {coef.dtype}")
        if coef.device != x.device:
            raise ValueError(f"coef must be on x's device {x.device} (so CUDA graphs can replay "
                             f"new values), got {coef.device}")
    elif isinstance(coef, Sequence) and len(coef) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in coef):
        coef = torch.tensor([float(v) for v in coef], dtype=ct, device=x.device)
    else:
        raise TypeError(f"coef must be a float tensor of shape (3,) or (B, 3), or a sequence of "
                        f"three floats, got {type(coef).__name__}")
    batch = x.shape[0] if x.dim() > 0 else None
    if not (coef.shape == (3,) or (coef.dim() == 2 and coef.shape == (batch, 3))):
        expected = "(3,)" if batch is None else f"(3,) or ({batch}, 3)"
        raise ValueError(f"coef must have shape {expected}, got {tuple(coef.shape)}")
    return coef.to(ct).contiguous()


def _check_invertible(coef) -> None:
    # Only where it costs no device sync; on a GPU a zero leading coefficient yields inf/nan.
    if isinstance(coef, torch.Tensor):
        if coef.device.type != "cpu" or torch.compiler.is_compiling():
            return
        zero = bool((coef[..., 0] == 0).any())
    else:
        zero = coef[0] == 0
    if zero:
        raise ValueError("coef[..., 0] must be nonzero for lincomb3_inverse_ "
                         "(the update with a zero leading coefficient is not invertible)")


def _apply(x, y, z, coef, backend: str, inverse: bool) -> torch.Tensor:
    _check_tensors(x, y, z)
    checked = _as_coef(coef, x)
    if inverse:  # a sequence of floats is checked on the host, before it moves to x's device
        _check_invertible(checked if isinstance(coef, torch.Tensor) else coef)
    coef = checked
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    impl = _LOADED[_resolve_name(backend, x.device, x.dtype)]
    if x.numel():
        impl.run(x, y, z, coef, inverse)
    return x


def lincomb3_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
              backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- coef[..., 0] * x + coef[..., 1] * y + coef[..., 2] * z``; returns x.

    coef is a float tensor of shape (3,) or (B, 3) with B = x.shape[0], on x's device, or a
    sequence of three floats. z may have another float dtype than x. Math in float32 (float64 for
    float64 x), rounded once to x's dtype. Every check runs before x is written.
    """
    return _apply(x, y, z, coef, backend, inverse=False)


def lincomb3_inverse_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef, *,
                      backend: str = "auto") -> torch.Tensor:
    """In place: ``x <- (x - coef[..., 1] * y - coef[..., 2] * z) / coef[..., 0]``; returns x.

    Undoes :func:`lincomb3_` with the same y, z and coef. A zero leading coefficient is rejected
    when coef lives on the CPU; on a GPU that check would cost a sync, so it yields inf/nan instead.
    """
    return _apply(x, y, z, coef, backend, inverse=True)


# --------------------------------------------------------------------------------------------
# torch.library ops of the compiled backends. The schema is defined once, here; the kernels are
# registered elsewhere: belm::lincomb3_triton by triton_kernels.py (CUDA, and CPU under
# TRITON_INTERPRET=1), belm::lincomb3_ext by the C++ extension (TORCH_LIBRARY_IMPL for CPU/CUDA).
# Both mutate x and return nothing, so their fake kernel has nothing to compute.

OP_SCHEMA = "(Tensor(a!) x, Tensor y, Tensor z, Tensor coef, bool inverse) -> ()"
_lib = torch.library.Library("belm", "DEF")
for _op_name in ("lincomb3_triton", "lincomb3_ext"):
    _lib.define(_op_name + OP_SCHEMA)
    torch.library.register_fake(f"belm::{_op_name}", lambda x, y, z, coef, inverse: None, lib=_lib)
