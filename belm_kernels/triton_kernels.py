"""Triton backend of ``lincomb3_`` / ``lincomb3_inverse_``: kernel, launcher and backend object.

    forward:  x <- a*x + b*y + c*z          t = a*x; t = fma(b, y, t); t = fma(c, z, t)
    inverse:  x <- (x - b*y - c*z) / a      t = fma(-b, y, x); t = fma(-c, z, t); x = t / a

Math in float32 (float64 for float64 x), one IEEE rounding per fma, a correctly rounded division
(``div_rn``; Triton's plain ``/`` on float32 is the approximate ``div.full.f32`` on NVIDIA GPUs),
and one rounding to x's dtype on the store. z is loaded in its own dtype. The coefficients are read
from device memory, never passed as Python floats, so a captured CUDA graph replays with whatever
values were last written into the coef tensor.

The launch is wrapped in the torch.library op ``belm::lincomb3_triton`` (schema and fake kernel in
ops.py); its CUDA and CPU implementations are registered here with ``torch.library.impl``. We do
not use ``triton_op``/``wrap_triton``: they do not work with the Triton interpreter, which is how
the CPU-only machines run this kernel (``TRITON_INTERPRET=1`` set before triton is imported).

Importing this module never fails: without triton, ``unavailable_reason`` says why.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _IMPORT_ERROR: str | None = f"triton is not importable ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

# Launch configuration. On a GPU, tensors of AUTOTUNE_MIN_NUMEL elements or more are autotuned:
# the first call per (power-of-two size bucket, dtypes) times BLOCK 1024/2048/4096 x 4/8 warps on
# the real data (x is restored after each timed run) and caches the fastest. Everything else uses
# the fixed default: smaller tensors (their time is launch latency, whatever the block size), the
# interpreter (autotuning there would only time the interpreter), CUDA-graph capture (timing
# synchronises, which capture forbids; warm up before capturing) and BELM_TRITON_AUTOTUNE=0.
# The default, 1024 elements per program with 4 warps, is 8 elements per thread: two 16-byte
# vector accesses per fp32 tensor, the usual sweet spot of a memory-bound elementwise kernel.
# It is not a measurement (no GPU was available when this was written): the GPU benchmark under
# bench/ must confirm it against the autotuned choice.
DEFAULT_BLOCK = 1024
DEFAULT_NUM_WARPS = 4
AUTOTUNE_BLOCKS = (1024, 2048, 4096)
AUTOTUNE_WARPS = (4, 8)
AUTOTUNE_MIN_NUMEL = 1 << 20


def _autotune_enabled() -> bool:
    return os.environ.get("BELM_TRITON_AUTOTUNE", "1") != "0"


if triton is not None:

    @triton.jit
    def _lincomb3_kernel(
        x_ptr, y_ptr, z_ptr, coef_ptr,  # x: in/out; z in its own dtype; coef (3,) or (B, 3)
        n,                              # number of elements
        per_sample,                     # n // B for per-sample coef rows (1 when shared)
        n_bucket,                       # autotune key only: next power of two of n
        INVERSE: tl.constexpr,
        PER_SAMPLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # 64-bit offsets: tensors of 2^31 elements or more must index correctly.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        ct = coef_ptr.dtype.element_ty  # compute dtype: float32, or float64 for float64 x
        if PER_SAMPLE:
            row = (offs // per_sample) * 3
            a = tl.load(coef_ptr + row, mask=mask, other=1.0)
            b = tl.load(coef_ptr + row + 1, mask=mask, other=0.0)
            c = tl.load(coef_ptr + row + 2, mask=mask, other=0.0)
        else:
            a = tl.load(coef_ptr)
            b = tl.load(coef_ptr + 1)
            c = tl.load(coef_ptr + 2)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ct)
        yv = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ct)
        zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ct)
        if INVERSE:
            t = tl.fma(-b, yv, xv)
            t = tl.fma(-c, zv, t)
            if ct == tl.float64:
                t = t / a  # float64 division is IEEE round-to-nearest
            else:
                t = tl.math.div_rn(t, a)
        else:
            t = a * xv
            t = tl.fma(b, yv, t)
            t = tl.fma(c, zv, t)
        tl.store(x_ptr + offs, t.to(x_ptr.dtype.element_ty), mask=mask)

    # True when triton.jit saw TRITON_INTERPRET=1 (i.e. it was set before triton was imported):
    # the decorator then returns an InterpretedFunction that runs on CPU tensors.
    _INTERPRETED = type(_lincomb3_kernel).__name__ == "InterpretedFunction"

    _lincomb3_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": blk}, num_warps=w)
                 for blk in AUTOTUNE_BLOCKS for w in AUTOTUNE_WARPS],
        key=["n_bucket"],       # Triton adds the dtypes of the tensor arguments to the key
        restore_value=["x_ptr"],  # benchmarking runs the in-place kernel many times
    )(_lincomb3_kernel)
else:
    _INTERPRETED = False


def _launch(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
            inverse: bool) -> None:
    """Run the kernel on contiguous x, y, z and a contiguous (3,) or (B, 3) coef."""
    n = x.numel()
    per_sample = n // coef.shape[0] if coef.dim() == 2 else 1
    n_bucket = 1 << max(n - 1, 0).bit_length()
    args = (x, y, z, coef, n, per_sample, n_bucket)
    flags = dict(INVERSE=bool(inverse), PER_SAMPLE=coef.dim() == 2)
    tune = (not _INTERPRETED and n >= AUTOTUNE_MIN_NUMEL and x.is_cuda and _autotune_enabled()
            and not torch.cuda.is_current_stream_capturing())
    if tune:
        _lincomb3_kernel_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](*args, **flags)
    else:
        _lincomb3_kernel[(triton.cdiv(n, DEFAULT_BLOCK),)](
            *args, **flags, BLOCK=DEFAULT_BLOCK, num_warps=DEFAULT_NUM_WARPS)


def _lincomb3_triton_impl(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
                          inverse: bool) -> None:
    """Implementation of ``belm::lincomb3_triton`` (CPU through the interpreter, and CUDA)."""
    if x.numel() == 0:
        return
    # Fast path: contiguous x is updated directly. Slow path for any other layout of x: compute
    # into a contiguous temporary and copy it back into the view (two extra passes over x, but
    # correct for every strided layout and never touches memory outside the view). y, z and coef
    # are made contiguous, which is a no-op when they already are.
    target = x if x.is_contiguous() else x.contiguous()
    y, z, coef = y.contiguous(), z.contiguous(), coef.contiguous()
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _launch(target, y, z, coef, inverse)
    else:
        _launch(target, y, z, coef, inverse)
    if target is not x:
        x.copy_(target)


if triton is not None:
    torch.library.impl("belm::lincomb3_triton", ("CPU", "CUDA"), _lincomb3_triton_impl)


class _TritonBackend:
    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available (torch.cuda.is_available() is False)"
            return None
        if device.type == "cpu":
            if _INTERPRETED:
                return None
            return ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 "
                    "before triton is first imported")
        return (f"Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), "
                f"not {device.type}")

    def run(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
            inverse: bool) -> None:
        torch.ops.belm.lincomb3_triton(x, y, z, coef, inverse)


triton_backend = _TritonBackend()


def get_backend(name: str) -> _TritonBackend:
    if name != "triton":
        raise ValueError(f"belm_kernels.triton_kernels provides the 'triton' backend, not {name!r}")
    return triton_backend
