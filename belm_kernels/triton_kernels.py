"""Triton backend of ``lincomb3_`` / ``lincomb3_inverse_``: kernel, launch plan and launcher.

    forward:  x <- a*x + b*y + c*z          t = a*x; t = fma(b, y, t); t = fma(c, z, t)
    inverse:  x <- (x - b*y - c*z) / a      t = fma(-b, y, x); t = fma(-c, z, t); x = t / a

Math in float32 (float64 for float64 x), one IEEE rounding per operation (compiled with
``enable_fp_fusion=False``: no contraction), a correctly rounded division (``div_rn``; Triton's
plain ``/`` on float32 is the approximate ``div.full.f32`` on NVIDIA GPUs), and one rounding to
x's dtype on the store. z is loaded in its own dtype. The coefficients are read from device
memory, never passed as Python floats, so a captured CUDA graph replays with whatever values were
last written into the coef tensor. All element offsets are 64-bit.

Shape of the work. Every program updates one block of BLOCK consecutive elements of the
contiguous x, y, z; a full block takes the mask-free body, whose loads and stores are 128-bit
vectors (16 bytes of x and y per access; z in pieces holding as many elements) whenever x, y and z
are 16-byte aligned (Triton specialises the kernel on that), whatever the element count: only a
partial block is masked. How a program finds its coefficients (the ROWS constexpr):

* "shared": one (3,) row, three scalar loads;
* "long": per-sample rows of at least LONG_ROWS_MIN elements. One program per block of a row, so
  the row costs one 32-bit division per program and three scalar loads. Each row's body starts
  at its first element whose offset is a multiple of the vector length, so 16-byte alignment
  holds for any row length; the up to VEC - 1 elements before it are done, masked, by the row's
  first program;
* "short": shorter per-sample rows (many small samples). One program per block of elements; each
  lane finds its row with a 32-bit division and gathers its three coefficients from the (cached)
  table.

An unaligned pointer (a view at an odd offset) gets Triton's unaligned specialisation, correct
with narrower accesses. tests/test_codegen.py compiles every variant for sm_80 and sm_90 and
checks the PTX (vector widths, the division, 64-bit offsets, no spills or shared memory).

Launch configuration. Without autotuning every launch uses DEFAULT_CONFIG, 1024 elements per
program with 4 warps: 8 elements per thread, i.e. at least one 16-byte access of x and y per
thread for every dtype. That is used for tensors below AUTOTUNE_MIN_NUMEL elements (their time is
launch latency), for per-sample rows shorter than LONG_ROWS_MIN, in the interpreter, during
CUDA-graph capture (autotuning times the kernel, which capture forbids: warm up before capturing)
and with BELM_TRITON_AUTOTUNE=0. Larger tensors on a GPU are autotuned per (x dtype, z dtype,
power-of-two size bucket) over ``autotune_configs``; x is restored after each timed run. None of
these configurations was timed on a GPU when this was written: the GPU benchmark under bench/
must confirm them.

The launcher, ``run``, takes already validated arguments (belm_kernels.ops checks them): it is
the "triton" backend's kernel, called by the ops ``belm::lincomb3_`` and ``belm::lincomb3``. On
CPU tensors it runs through Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported). Importing this module never fails: without triton, ``unavailable_reason`` says
why.
"""

from __future__ import annotations

import functools
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

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_CONFIG = (1024, 4)  # (BLOCK, num_warps)
AUTOTUNE_MIN_NUMEL = 1 << 20
# Bytes of x (and y) each thread moves per program: one or two 128-bit accesses. (Four need up
# to 127 registers for 16-bit x: measured with tests/test_codegen.py.)
_BYTES_PER_THREAD = (16, 32)
_WARPS = (4, 8)


def _autotune_enabled() -> bool:
    return os.environ.get("BELM_TRITON_AUTOTUNE", "1") != "0"


def autotune_configs(x_dtype: torch.dtype, z_dtype: torch.dtype) -> list[tuple[int, int]]:
    """(BLOCK, num_warps) candidates for autotuning: each thread moves 16 or 32 bytes of x and y,
    with 4 or 8 warps; a z wider than x is capped at 64 bytes per thread. None spills, and the
    heaviest needs under 70 registers on sm_80/sm_90 (bench/results/codegen_sm80_sm90.md;
    tests/test_codegen.py checks both)."""
    configs = []
    for nbytes in _BYTES_PER_THREAD:
        per_thread = nbytes // x_dtype.itemsize
        if per_thread * z_dtype.itemsize > 64:
            continue
        configs += [(per_thread * 32 * warps, warps) for warps in _WARPS]
    return configs


# Per-sample rows of at least this many elements get a program per block of a row ("long"); shorter
# rows would leave most lanes of those programs idle, and are looked up per lane ("short", never
# autotuned: BLOCK is DEFAULT_CONFIG's, which keeps the lookup's 32-bit arithmetic in range).
LONG_ROWS_MIN = 4096


def launch_plan(numel: int, rows: int) -> dict:
    """Kernel arguments that describe the work: ``n`` elements, ``rows`` coefficient rows of
    ``inner`` elements each, the constexpr ``ROWS`` and ``n_bucket`` (the power of two the
    autotuning is keyed on)."""
    inner = numel // rows
    kind = "shared" if rows == 1 else "long" if inner >= LONG_ROWS_MIN else "short"
    return dict(n=numel, inner=inner, rows=rows, ROWS=kind,
                n_bucket=1 << max(numel - 1, 0).bit_length())


def programs(plan: dict, block: int) -> int:
    """The grid: one program per block of a row ("long" rows), else per block of elements."""
    if plan["ROWS"] == "long":
        return plan["rows"] * -(-plan["inner"] // block)
    return -(-plan["n"] // block)


if triton is not None:

    @triton.jit
    def _update(x_ptr, y_ptr, z_ptr, offs, mask, a, b, c, INVERSE: tl.constexpr):
        """One block of the update; mask None: the full, unmasked body."""
        ct = a.dtype  # compute dtype: float32, or float64 for float64 x
        xv = tl.load(x_ptr + offs, mask=mask).to(ct)
        yv = tl.load(y_ptr + offs, mask=mask).to(ct)
        zv = tl.load(z_ptr + offs, mask=mask).to(ct)
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

    @triton.jit
    def _coefficients(coef_ptr, row):
        return tl.load(coef_ptr + 3 * row), tl.load(coef_ptr + 3 * row + 1), \
            tl.load(coef_ptr + 3 * row + 2)

    # Sizes are typed int64 and not specialised (no value-1 or divisible-by-16 variants: the body
    # is unmasked by construction); coef's alignment does not matter, x's, y's and z's does.
    @triton.jit(do_not_specialize=["n", "inner", "rows", "n_bucket"],
                do_not_specialize_on_alignment=["coef_ptr"])
    def _lincomb3_kernel(
        x_ptr, y_ptr, z_ptr, coef_ptr,  # x: in/out; z in its own dtype; coef: rows x 3
        n: tl.int64,                    # elements
        inner: tl.int64,                # elements per coefficient row (n when coef is shared)
        rows: tl.int64,                 # coefficient rows (1 when shared)
        n_bucket: tl.int64,             # autotuning key only
        INVERSE: tl.constexpr,
        ROWS: tl.constexpr,             # "shared", "long" or "short" (see launch_plan)
        BLOCK: tl.constexpr,
    ):
        VEC: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth  # 16 bytes of x
        pid = tl.program_id(0)
        lanes = tl.arange(0, BLOCK)
        if ROWS == "long":
            # A program per block of a row: its row costs one 32-bit division per program. The
            # row's body starts at its first multiple of VEC (so a multiple of VEC by
            # construction: 16-byte aligned); the up to VEC - 1 elements before it (the head,
            # when rows * 16 bytes do not line up) are done, masked, by the row's first block.
            blocks = tl.cdiv(inner, BLOCK).to(tl.int32)
            row = pid // blocks
            block = pid - row * blocks
            row_start = row.to(tl.int64) * inner
            body = (row_start + VEC - 1) // VEC * VEC
            a, b, c = _coefficients(coef_ptr, row)
            if block == 0:
                head = tl.minimum(body - row_start, inner).to(tl.int32)
                if head > 0:  # a block of its own (VEC lanes): its layout stays apart
                    head_lanes = tl.arange(0, VEC)
                    _update(x_ptr, y_ptr, z_ptr, row_start + head_lanes, head_lanes < head,
                            a, b, c, INVERSE)
            start = body + block.to(tl.int64) * BLOCK
            left = row_start + inner - start  # elements of the row from start on
        else:
            # One program per BLOCK elements. start is a multiple of BLOCK; the compiler is told
            # only that it is one of VEC: knowing more, it would give a z narrower than x
            # (float16 next to float32) wider vectors than x, and convert between the two
            # layouts through shared memory.
            start = tl.multiple_of(pid.to(tl.int64) * BLOCK, VEC)
            left = n - start
            if ROWS == "shared":
                a, b, c = _coefficients(coef_ptr, 0)
            else:
                # Rows shorter than LONG_ROWS_MIN: each lane finds its row and gathers its
                # coefficients from the (cached) table. 32-bit divisions only: with
                # pid = q * inner + r, start // inner = q * BLOCK + r * BLOCK // inner, and
                # r * BLOCK, the lanes' offsets from row0's start and inner stay below 2^23.
                inner32 = inner.to(tl.int32)
                q = pid // inner32
                row0 = q.to(tl.int64) * BLOCK + ((pid - q * inner32) * BLOCK) // inner32
                first = (start - row0 * inner).to(tl.int32)  # where the block starts in row0
                row = row0 + ((first + lanes) // inner32).to(tl.int64)
                a, b, c = _coefficients(coef_ptr, tl.minimum(row, rows - 1))  # lanes past the end
        offs = start + lanes.to(tl.int64)
        if left >= BLOCK:
            _update(x_ptr, y_ptr, z_ptr, offs, None, a, b, c, INVERSE)
        else:
            _update(x_ptr, y_ptr, z_ptr, offs, lanes < left, a, b, c, INVERSE)

    # True when triton.jit saw TRITON_INTERPRET=1 (i.e. it was set before triton was imported):
    # the decorator then returns an InterpretedFunction that runs on CPU tensors.
    _INTERPRETED = type(_lincomb3_kernel).__name__ == "InterpretedFunction"

    @functools.cache
    def _tuned_kernel(x_dtype: torch.dtype, z_dtype: torch.dtype):
        return triton.autotune(
            configs=[triton.Config({"BLOCK": block}, num_warps=warps)
                     for block, warps in autotune_configs(x_dtype, z_dtype)],
            key=["n_bucket"],         # one choice per power-of-two size (and dtypes, by Triton)
            restore_value=["x_ptr"],  # benchmarking runs the in-place kernel many times
        )(_lincomb3_kernel)
else:
    _INTERPRETED = False


def _launch(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
            inverse: bool) -> None:
    """Run the kernel on contiguous, non-empty x, y, z and a contiguous (3,) or (B, 3) coef."""
    plan = launch_plan(x.numel(), coef.numel() // 3)
    args = (x, y, z, coef, plan["n"], plan["inner"], plan["rows"], plan["n_bucket"])
    flags = dict(INVERSE=bool(inverse), ROWS=plan["ROWS"])
    if not _INTERPRETED:
        flags["enable_fp_fusion"] = False
    # Short rows (many small samples) keep the default: their lookups, not the block, set the pace.
    tune = (not _INTERPRETED and x.numel() >= AUTOTUNE_MIN_NUMEL and x.is_cuda
            and plan["ROWS"] != "short" and _autotune_enabled()
            and not torch.cuda.is_current_stream_capturing())
    if tune:
        _tuned_kernel(x.dtype, z.dtype)[lambda meta: (programs(plan, meta["BLOCK"]),)](
            *args, **flags)
    else:
        block, warps = DEFAULT_CONFIG
        _lincomb3_kernel[(programs(plan, block),)](*args, **flags, BLOCK=block, num_warps=warps)


def run(out, x, terms, coef, inverse) -> None:
    """The backend's kernel (belm_kernels.ops.Backend.run). Interim: the Triton kernel does the
    in-place three-term update; other updates run on the torch reference until the K-term
    kernel lands."""
    if x is None and len(out) == 1 and len(terms) == 2 and terms[0].dtype == out[0].dtype:
        run3(out[0], terms[0], terms[1], coef, inverse)
    else:
        from .ops import torch_update
        torch_update(out, x, terms, coef, inverse)


def run3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, coef: torch.Tensor,
         inverse: bool) -> None:
    """The update on validated arguments (coef in the compute dtype), CPU (interpreter) or CUDA.

    Fast path: contiguous x is updated directly. Any other layout of x is computed into a
    contiguous temporary and copied back into the view (two extra passes over x, but correct for
    every strided layout and never touching memory outside the view). y, z and coef are made
    contiguous, a no-op when they already are.
    """
    if x.numel() == 0:
        return
    target = x if x.is_contiguous() else x.contiguous()
    y, z, coef = y.contiguous(), z.contiguous(), coef.contiguous()
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _launch(target, y, z, coef, inverse)
    else:
        _launch(target, y, z, coef, inverse)
    if target is not x:
        x.copy_(target)


class _TritonBackend:
    name = "triton"
    dtypes = DTYPES

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

    run = staticmethod(run)


triton_backend = _TritonBackend()


def get_backend(name: str) -> _TritonBackend:
    if name != "triton":
        raise ValueError(f"belm_kernels.triton_kernels provides the 'triton' backend, not {name!r}")
    return triton_backend
