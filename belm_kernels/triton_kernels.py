"""Triton backend of the K-term update (``lincomb_``, ``lincomb``, ``lincomb3_``, their inverses):
kernel, launch plan and launcher.

    forward:  out[m] <- c[m,0]*x + c[m,1]*t_1 + ... + c[m,K]*t_K
              acc = c0*x; acc = fma(c1, t1, acc); ...; acc = fma(cK, tK, acc)
    inverse:  out[0] <- (x - c[0,1]*t_1 - ... - c[0,K]*t_K) / c[0,0]
              acc = x; acc = fma(-c1, t1, acc); ...; acc = div_rn(acc, c0)

One kernel for any K <= MAX_TERMS terms and M <= MAX_OUTPUTS outputs: K and M are constexprs and
the terms and outputs are tuples of pointers, each with its own dtype (Triton specialises the
kernel on each), so a call compiles exactly the loads and stores it needs. Every input of a block
is loaded before any output is stored (the in-place update passes x as outs[0] too). Math in
float32 (float64 for float64 x), one IEEE rounding per operation (compiled with
``enable_fp_fusion=False``: no contraction), a correctly rounded division (``div_rn``; Triton's
plain ``/`` on float32 is the approximate ``div.full.f32`` on NVIDIA GPUs), and one rounding per
output to its own dtype on the store (see _narrow). The coefficients are read from device
memory, never passed as Python floats, so a captured CUDA graph replays with whatever values were
last written into the coef tensor. All element offsets are 64-bit.

Shape of the work. Every program updates one block of BLOCK consecutive elements of contiguous
operands; a full block takes the mask-free body, whose loads and stores are 128-bit vectors
whenever every operand is 16-byte aligned (Triton specialises the kernel on that), whatever the
element count: only a partial block is masked. VEC, the elements per vector, is 16 bytes of the
narrowest of x and the outputs: x and every output move in 128-bit accesses (a wider one in
several), a narrower term in pieces holding as many elements (64 bits of float16 next to a
float32 x). How a program finds its coefficients (the ROWS constexpr; coef is (rows, M, K+1)):

* "shared": one row set, M * (K+1) scalar loads;
* "long": per-sample rows of at least LONG_ROWS_MIN elements. One program per block of a row, so
  the row costs one 32-bit division per program and M * (K+1) scalar loads. Each row's body
  starts at its first element whose offset is a multiple of VEC, so 16-byte alignment holds for
  any row length; the up to VEC - 1 elements before it are done, masked, by the row's first
  program;
* "short": shorter per-sample rows (many small samples). One program per block of elements; each
  lane finds its row with a 32-bit division and gathers its coefficients from the (cached)
  table.

An unaligned pointer (a view at an odd offset) gets Triton's unaligned specialisation, correct
with narrower accesses. tests/test_codegen.py compiles a representative set of variants for sm_80
and sm_90 and checks the PTX (vector widths, the division, 64-bit offsets, no spills or shared
memory).

Launch configuration. Without autotuning every launch uses DEFAULT_CONFIG, 1024 elements per
program with 4 warps: 8 elements per thread, i.e. at least one 16-byte access of x and of every
output per thread for every dtype. That is used for tensors below AUTOTUNE_MIN_NUMEL elements
(their time is launch latency), for per-sample rows shorter than LONG_ROWS_MIN, in the
interpreter, during CUDA-graph capture (autotuning times the kernel, which capture forbids: warm
up before capturing) and with BELM_TRITON_AUTOTUNE=0. Larger tensors on a GPU are autotuned per
call signature (dtypes, K, M, in place or not) and power-of-two size bucket over
``autotune_configs``; an in-place x is restored after each timed run. None of these
configurations was timed on a GPU when this was written: the GPU benchmark under bench/ must
confirm them.

The launcher, ``run``, takes already validated arguments (belm_kernels.ops checks them): it is
the "triton" backend's kernel (``ops.Backend.run``). On CPU tensors it runs through Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported). Importing this module
never fails: without triton, ``unavailable_reason`` says why.
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
# Bytes of the narrowest of x and the outputs each thread moves per program: one or two 128-bit
# accesses; no operand moves more than _MAX_BYTES_PER_THREAD (registers: tests/test_codegen.py).
_BYTES_PER_THREAD = (16, 32)
_MAX_BYTES_PER_THREAD = 64
_WARPS = (4, 8)


def _autotune_enabled() -> bool:
    return os.environ.get("BELM_TRITON_AUTOTUNE", "1") != "0"


def vector_length(x_dtype: torch.dtype, out_dtypes) -> int:
    """VEC: elements in 16 bytes of the narrowest of x and the outputs."""
    return 16 // min(d.itemsize for d in (x_dtype, *out_dtypes))


def autotune_configs(x_dtype: torch.dtype, term_dtypes, out_dtypes,
                     inverse: bool = False) -> list[tuple[int, int]]:
    """(BLOCK, num_warps) candidates for autotuning: each thread moves 16 or 32 bytes of the
    narrowest of x and the outputs, with 4 or 8 warps, where no operand then moves more than 64
    bytes per thread (a float64 term next to float16 x gets the 16-byte configurations only) and,
    for the inverse, no thread divides more than 8 elements (the correctly rounded division
    calls a slow-path subroutine, across which every other element's value stays live: 16
    spill). tests/test_codegen.py compiles them for sm_80/sm_90: none spills
    (bench/results/codegen_sm80_sm90.md)."""
    vec = vector_length(x_dtype, out_dtypes)
    widest = max(d.itemsize for d in (x_dtype, *term_dtypes, *out_dtypes))
    configs = []
    for nbytes in _BYTES_PER_THREAD:
        per_thread = nbytes // 16 * vec
        if per_thread * widest > _MAX_BYTES_PER_THREAD or (inverse and per_thread > 8):
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

    # Short rows gather up to this many coefficients per element before the update (what the
    # three-term update needs), more each where it is used (register pressure).
    GATHER_AHEAD_MAX = tl.constexpr(4)

    @triton.jit
    def _coefficients(coef_ptr, row, K: tl.constexpr, M: tl.constexpr):
        """The M * (K+1) coefficients of ``row`` (a scalar, or one row per lane: a gather), as
        a tuple ordered (m, j)."""
        c = ()
        for i in tl.static_range(M * (K + 1)):
            c = c + (tl.load(coef_ptr + (row * (M * (K + 1)) + i)),)
        return c

    @triton.jit
    def _weight(c, coef_ptr, rows_of_lanes, mask, i: tl.constexpr, K: tl.constexpr,
                M: tl.constexpr, GATHER: tl.constexpr):
        """Coefficient i (= m * (K+1) + j): from the preloaded tuple c, or (GATHER: short rows)
        gathered for each lane's row where it is used, so that no more than one is live."""
        if GATHER:
            w = tl.load(coef_ptr + rows_of_lanes * (M * (K + 1)) + i, mask=mask)
        else:
            w = c[i]
        return w

    @triton.jit
    def _narrow(r, dtype: tl.constexpr):
        """r (compute dtype) rounded once to ``dtype``. A float64 result goes to float16 /
        bfloat16 through float32 rounded to odd (truncated, the last bit set when inexact),
        which makes the two conversions one correct rounding (a direct conversion is not one
        everywhere: sm_80 has no float64 -> bfloat16 instruction, the interpreter none at all)."""
        if r.dtype == tl.float64 and dtype.primitive_bitwidth == 16:
            f = r.to(tl.float32)
            back = f.to(tl.float64)
            bits = f.to(tl.int32, bitcast=True)
            bits -= (tl.abs(back) > tl.abs(r)).to(tl.int32)  # rounded away from zero: back off
            bits |= (back != r).to(tl.int32)
            r = bits.to(tl.float32, bitcast=True)
        return r.to(dtype)

    @triton.jit
    def _update(outs, x_ptr, terms, offs, mask, c, coef_ptr, rows_of_lanes, K: tl.constexpr,
                M: tl.constexpr, INVERSE: tl.constexpr, GATHER: tl.constexpr):
        """One block of the update; mask None: the full, unmasked body. Every input is loaded
        before any output is stored. Coefficients: see _weight."""
        ct = coef_ptr.dtype.element_ty  # compute dtype: float32, or float64 for float64 x
        xv = tl.load(x_ptr + offs, mask=mask).to(ct)
        acc = ()
        for m in tl.static_range(M):
            if INVERSE:
                acc = acc + (xv,)
            else:
                c0 = _weight(c, coef_ptr, rows_of_lanes, mask, m * (K + 1), K, M, GATHER)
                acc = acc + (c0 * xv,)
        for k in tl.static_range(K):
            tv = tl.load(terms[k] + offs, mask=mask).to(ct)
            new = ()
            for m in tl.static_range(M):
                w = _weight(c, coef_ptr, rows_of_lanes, mask, m * (K + 1) + k + 1, K, M, GATHER)
                if INVERSE:
                    w = -w
                new = new + (tl.fma(w, tv, acc[m]),)
            acc = new
        for m in tl.static_range(M):
            r = acc[m]
            if INVERSE:
                c0 = _weight(c, coef_ptr, rows_of_lanes, mask, m * (K + 1), K, M, GATHER)
                if ct == tl.float64:
                    r = r / c0  # float64 division is IEEE round-to-nearest
                else:
                    r = tl.math.div_rn(r, c0)
            tl.store(outs[m] + offs, _narrow(r, outs[m].dtype.element_ty), mask=mask)

    # Sizes are typed int64 and not specialised (no value-1 or divisible-by-16 variants: the body
    # is unmasked by construction); coef's alignment does not matter, the operands' does.
    @triton.jit(do_not_specialize=["n", "inner", "rows", "n_bucket"],
                do_not_specialize_on_alignment=["coef_ptr"])
    def _lincomb_kernel(
        outs,            # M pointers (outs[0] is x for the in-place update), each its own dtype
        x_ptr,           # x, read
        terms,           # K pointers, each its own dtype
        coef_ptr,        # rows x M x (K+1), compute dtype
        n: tl.int64,     # elements
        inner: tl.int64,  # elements per coefficient row (n when coef is shared)
        rows: tl.int64,  # coefficient rows (1 when shared)
        n_bucket: tl.int64,  # autotuning key only
        K: tl.constexpr,
        M: tl.constexpr,
        INVERSE: tl.constexpr,
        ROWS: tl.constexpr,  # "shared", "long" or "short" (see launch_plan)
        VEC: tl.constexpr,   # elements in 16 bytes of the narrowest of x and the outputs
        BLOCK: tl.constexpr,
    ):
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
            c = _coefficients(coef_ptr, row, K, M)
            rows_of_lanes = row
            if block == 0:
                head = tl.minimum(body - row_start, inner).to(tl.int32)
                if head > 0:  # a block of its own (VEC lanes): its layout stays apart
                    head_lanes = tl.arange(0, VEC)
                    _update(outs, x_ptr, terms, row_start + head_lanes, head_lanes < head, c,
                            coef_ptr, rows_of_lanes, K, M, INVERSE, False)
            start = body + block.to(tl.int64) * BLOCK
            left = row_start + inner - start  # elements of the row from start on
        else:
            # One program per BLOCK elements. start is a multiple of BLOCK; the compiler is told
            # only that it is one of VEC: knowing more, it would give a term narrower than x
            # (float16 next to float32) wider vectors than x, and convert between the two
            # layouts through shared memory.
            start = tl.multiple_of(pid.to(tl.int64) * BLOCK, VEC)
            left = n - start
            if ROWS == "shared":
                c = _coefficients(coef_ptr, 0, K, M)
                rows_of_lanes = 0
            else:
                # Rows shorter than LONG_ROWS_MIN: each lane finds its row and gathers its
                # coefficients from the (cached) table: all at once when they are few, else
                # each where it is used (c empty), so that no more than one set is live. 32-bit
                # divisions only: with pid = q * inner + r, start // inner = q * BLOCK +
                # r * BLOCK // inner, and r * BLOCK, the lanes' offsets from row0's start and
                # inner stay below 2^23.
                inner32 = inner.to(tl.int32)
                q = pid // inner32
                row0 = q.to(tl.int64) * BLOCK + ((pid - q * inner32) * BLOCK) // inner32
                first = (start - row0 * inner).to(tl.int32)  # where the block starts in row0
                row = row0 + ((first + lanes) // inner32).to(tl.int64)
                rows_of_lanes = tl.minimum(row, rows - 1)  # lanes past the end: the last row
                if M * (K + 1) <= GATHER_AHEAD_MAX:
                    c = _coefficients(coef_ptr, rows_of_lanes, K, M)
                else:
                    c = ()
        offs = start + lanes.to(tl.int64)
        gather: tl.constexpr = ROWS == "short" and M * (K + 1) > GATHER_AHEAD_MAX
        if left >= BLOCK:
            _update(outs, x_ptr, terms, offs, None, c, coef_ptr, rows_of_lanes, K, M, INVERSE,
                    gather)
        else:
            _update(outs, x_ptr, terms, offs, lanes < left, c, coef_ptr, rows_of_lanes, K, M,
                    INVERSE, gather)

    # True when triton.jit saw TRITON_INTERPRET=1 (i.e. it was set before triton was imported):
    # the decorator then returns an InterpretedFunction that runs on CPU tensors.
    _INTERPRETED = type(_lincomb_kernel).__name__ == "InterpretedFunction"

    @functools.cache
    def _tuned_kernel(x_dtype: torch.dtype, term_dtypes: tuple, out_dtypes: tuple,
                      in_place: bool, inverse: bool):
        """The kernel autotuned for one call signature (the dtypes inside the tuples of pointers
        are not part of the autotuner's own key), keyed on the size bucket and the rows."""
        configs = autotune_configs(x_dtype, term_dtypes, out_dtypes, inverse)
        return triton.autotune(
            configs=[triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in configs],
            key=["n_bucket", "ROWS"],
            # Benchmarking runs the kernel many times: an in-place x must be restored.
            restore_value=["x_ptr"] if in_place else [],
        )(_lincomb_kernel)
else:
    _INTERPRETED = False


def _launch(outs: list[torch.Tensor], x: torch.Tensor, terms: list[torch.Tensor],
            coef: torch.Tensor, inverse: bool) -> None:
    """Run the kernel on contiguous, non-empty operands and a contiguous coef of rows x M x (K+1)
    values (outs[0] is x for the in-place update)."""
    k, m = len(terms), len(outs)
    plan = launch_plan(x.numel(), coef.numel() // (m * (k + 1)))
    args = (tuple(outs), x, tuple(terms), coef, plan["n"], plan["inner"], plan["rows"],
            plan["n_bucket"])
    flags = dict(K=k, M=m, INVERSE=bool(inverse), ROWS=plan["ROWS"],
                 VEC=vector_length(x.dtype, [o.dtype for o in outs]))
    if not _INTERPRETED:
        flags["enable_fp_fusion"] = False
    # Short rows (many small samples) keep the default: their lookups, not the block, set the pace.
    tune = (not _INTERPRETED and x.numel() >= AUTOTUNE_MIN_NUMEL and x.is_cuda
            and plan["ROWS"] != "short" and _autotune_enabled()
            and not torch.cuda.is_current_stream_capturing())
    if tune:
        kernel = _tuned_kernel(x.dtype, tuple(t.dtype for t in terms),
                               tuple(o.dtype for o in outs), outs[0] is x, bool(inverse))
        kernel[lambda meta: (programs(plan, meta["BLOCK"]),)](*args, **flags)
    else:
        block, warps = DEFAULT_CONFIG
        _lincomb_kernel[(programs(plan, block),)](*args, **flags, BLOCK=block, num_warps=warps)


def run(out, x, terms, coef, inverse) -> None:
    """The backend's kernel (belm_kernels.ops.Backend.run), CPU (interpreter) or CUDA.

    Contiguous operands are used as they are. A non-contiguous input is read through a
    contiguous copy (``.contiguous()``), and a non-contiguous output is computed into a
    contiguous temporary and copied into the view (extra passes, but correct for every strided
    layout and never touching memory outside the view). x None: in place on out[0].
    """
    first = out[0] if x is None else x
    if first.numel() == 0:
        return
    written = [o if o.is_contiguous() else
               torch.empty_like(o, memory_format=torch.contiguous_format) for o in out]
    if x is None:
        if written[0] is not out[0]:
            written[0].copy_(out[0])
        source = written[0]
    else:
        source = x.contiguous()
    terms = [t.contiguous() for t in terms]
    coef = coef.contiguous()
    if first.is_cuda:
        with torch.cuda.device(first.device):  # Triton launches on the current device
            _launch(written, source, terms, coef, inverse)
    else:
        _launch(written, source, terms, coef, inverse)
    for o, w in zip(out, written, strict=True):
        if w is not o:
            o.copy_(w)


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
