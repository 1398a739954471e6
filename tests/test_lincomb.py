"""The K-term op, ``lincomb_`` / ``lincomb_inverse_`` / ``lincomb``, on every backend.

Runs for every (device, backend) pair as tests/test_ops.py does (which covers the three-term
``lincomb3_`` in depth: layouts, aliasing, compile, autograd, CUDA graphs); here the number of
terms K (1 to MAX_TERMS), the number of outputs M (1 to MAX_OUTPUTS), each term's and each
output's own dtype, out-of-place outputs and their checks.

Error bounds, against a float64 reference computed from the inputs as the op sees them (terms and
coef rounded to the compute dtype, then widened exactly). With S = sum_k |c_k t_k| over the K+1
inputs (forward) and S = (|x| + sum_{k>=1} |c_k t_k|) / |c_0| (inverse), a result in the compute
dtype makes at most 2K+1 roundings of relative size eps/2 on quantities bounded by S (a multiply
and an add per term, or a fused multiply-add; the division), so

* outputs at least as wide as the math (float32 / float64 of float32 math, float64 of float64
  math):  |out - ref| <= (K + 2) * eps * S
* narrower outputs (float16 / bfloat16; float32 of float64 math): within one ulp of the
  correctly rounded reference, plus that arithmetic term (test_ops.py's bound, with its
  reasons).

The compiled kernels get more on top: sizes around their vector widths and blocks for every K,
every dtype per term and per output, unaligned views, per-sample rows of many lengths, empty,
0-d and batch-1 tensors, non-contiguous outputs, and direct calls of the extension op
(``belm::lincomb_ext``) with bad arguments on its own device.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import (
    _FORMAT,
    DTYPES,
    assert_bitwise_equal,
    compute_dtype,
    device_params,
    parametrize_backends,
    rand,
    round_exact,
    supports,
    ulp,
)

import belm_kernels as bk
from belm_kernels import ops

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def make_coef(shape, x, gen, inverse=False):
    """Coefficients of ``shape`` in float64 (the op converts them), leading ones away from 0."""
    c = torch.randn(shape, generator=gen, dtype=torch.float64)
    if inverse:  # |c_0| in [0.5, 1.5), either sign
        sign = torch.where(torch.rand(shape[:-1], generator=gen) < 0.3, -1.0, 1.0).double()
        c[..., 0] = (0.5 + torch.rand(shape[:-1], generator=gen, dtype=torch.float64)) * sign
    return c.to(x.device)


def reference(x, terms, coef_rows, inverse):
    """float64 result and error scale for one output; coef_rows (K+1,) or (B, K+1)."""
    ct = compute_dtype(x.dtype)
    c = coef_rows.to(ct).double()
    if c.dim() == 2:
        c = c.reshape((c.shape[0],) + (1,) * (x.dim() - 1) + c.shape[-1:])
    cols = c.unbind(-1)
    wide = [t.to(ct).double() for t in (x, *terms)]
    products = [col * t for col, t in zip(cols[1:], wide[1:], strict=True)]
    if inverse:
        ref = (wide[0] - sum(products)) / cols[0]
        scale = (wide[0].abs() + sum(p.abs() for p in products)) / cols[0].abs()
    else:
        ref = cols[0] * wide[0] + sum(products)
        scale = (cols[0] * wide[0]).abs() + sum(p.abs() for p in products)
    return ref, scale


def assert_close(out, ref, scale, k, what, x_dtype=F32):
    """out within the bound of the module docstring; the math is in x_dtype's compute dtype."""
    out, ref, scale = out.cpu(), ref.cpu(), scale.cpu()
    ct = compute_dtype(x_dtype)
    arith = (k + 2) * torch.finfo(ct).eps * scale
    if out.dtype in _FORMAT or out.dtype.itemsize < ct.itemsize:
        # torch rounds float64 -> float32 once, to nearest even; float16/bfloat16 exactly here.
        rounded = round_exact(ref, out.dtype) if out.dtype in _FORMAT else ref.to(out.dtype)
        err, tol = (out.double() - rounded.double()).abs(), ulp(rounded) + arith
    else:
        err, tol = (out.double() - ref).abs(), arith
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements outside the bound, "
                           f"worst error {(err - tol).max().item():.3g} over it")


# --------------------------------------------------------------------------------------------
# Correctness.

SHAPES = [(1,), (7,), (1025,), (3, 1031), (2, 4, 16, 16), (0,), ()]


@parametrize_backends
@pytest.mark.parametrize("k", range(1, ops.MAX_TERMS + 1))
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_in_place_matches_reference(device, backend, k, inverse, dtype, per_sample):
    gen = torch.Generator().manual_seed(k)
    shape = (3, 1031)
    x = rand(shape, dtype, device, gen)
    # Each term in its own dtype, cycling through all four.
    terms = [rand(shape, DTYPES[(i + DTYPES.index(dtype)) % 4], device, gen) for i in range(k)]
    coef = make_coef((3, k + 1) if per_sample else (k + 1,), x, gen, inverse)
    x0, kept = x.clone(), [t.clone() for t in terms]
    op = bk.lincomb_inverse_ if inverse else bk.lincomb_
    if not supports(backend, dtype):
        with pytest.raises(TypeError, match="supports x dtypes"):
            op(x, terms, coef, backend=backend)
        return
    ref, scale = reference(x0, terms, coef, inverse)
    assert op(x, terms, coef, backend=backend) is x
    assert_close(x, ref, scale, k, f"{backend} K={k} {dtype}", dtype)
    for t, t0 in zip(terms, kept, strict=True):
        assert_bitwise_equal(t, t0, "a term")


@parametrize_backends
@pytest.mark.parametrize("m", range(1, ops.MAX_OUTPUTS + 1))
@pytest.mark.parametrize("k", [1, 3, ops.MAX_TERMS])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_several_outputs_in_one_pass(device, backend, m, k, shape, per_sample):
    """Each output from the same inputs with its own row, in its own dtype; inputs untouched."""
    if per_sample and not shape:
        pytest.skip("a 0-d tensor has no batch dimension for per-sample rows")
    gen = torch.Generator().manual_seed(10 * m + k)
    x = rand(shape, F32, device, gen)
    terms = [rand(shape, (F16, F32, BF16)[i % 3], device, gen) for i in range(k)]
    coef = make_coef((shape[0], m, k + 1) if per_sample else (m, k + 1), x, gen)
    out_dtypes = (F32, BF16, F64)[:m]
    outs = [torch.full(shape, float("nan"), dtype=d, device=device) for d in out_dtypes]
    kept = [t.clone() for t in (x, *terms)]
    got = bk.lincomb(x, terms, coef, out=outs, backend=backend)
    assert isinstance(got, tuple) and all(g is o for g, o in zip(got, outs, strict=True))
    for i, o in enumerate(outs):
        ref, scale = reference(x, terms, coef[..., i, :], False)
        assert_close(o, ref, scale, k, f"output {i} of {m}")
    for t, t0 in zip((x, *terms), kept, strict=True):
        assert_bitwise_equal(t, t0, "an input")


@parametrize_backends
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_new_output_and_inverse_out_of_place(device, backend, inverse):
    gen = torch.Generator().manual_seed(3)
    x, t1 = (rand((2, 4, 8, 8), F16, device, gen) for _ in range(2))
    t2 = rand((2, 4, 8, 8), F32, device, gen)
    coef = make_coef((2, 3), x, gen, inverse)
    x0 = x.clone()
    out = bk.lincomb(x, [t1, t2], coef, inverse=inverse, backend=backend)
    assert out.dtype == F16 and out.is_contiguous() and out.data_ptr() != x.data_ptr()
    assert_bitwise_equal(x, x0, "x")
    ref, scale = reference(x, [t1, t2], coef, inverse)
    assert_close(out, ref, scale, 2, "new output", F16)
    if not inverse:  # None entries of a list are new tensors too
        rows = coef.unsqueeze(1).expand(2, 2, 3).contiguous()
        first, second = bk.lincomb(x, [t1, t2], rows, out=[None, torch.empty_like(t2)],
                                   backend=backend)
        assert torch.equal(first, out) and first.dtype == F16 and second.dtype == F32


@parametrize_backends
@pytest.mark.parametrize("layout", ["transposed", "step"])
def test_non_contiguous_inputs_and_outputs(device, backend, layout):
    """Strided views in and out: only the outputs' own elements are written."""
    gen = torch.Generator().manual_seed(4)
    bases = []

    def make(dtype):
        base = rand((9, 5) if layout == "transposed" else (10, 9), dtype, device, gen)
        bases.append(base)
        return base.t() if layout == "transposed" else base[::2]

    x, t1, t2, t3 = make(F32), make(BF16), make(F32), make(F16)
    coef = make_coef((5, 2, 4), x, gen)
    outs = [make(F32), make(F16)]
    kept = [b.clone() for b in bases]
    bk.lincomb(x, (t1, t2, t3), coef, out=outs, backend=backend)
    for i, o in enumerate(outs):
        ref, scale = reference(x, (t1, t2, t3), coef[:, i], False)
        assert_close(o, ref, scale, 3, f"{layout} output {i}")
    if layout == "step":  # the rows between the outputs' rows
        for base, base0 in zip(bases[4:], kept[4:], strict=True):
            assert_bitwise_equal(base[1::2], base0[1::2], "memory between an output's rows")
    for base, base0 in zip(bases[:4], kept[:4], strict=True):
        assert_bitwise_equal(base, base0, "an input")
    x0 = x.clone()
    bk.lincomb_(x, [t1, t2, t3], coef[:, 0], backend=backend)
    ref, scale = reference(x0, (t1, t2, t3), coef[:, 0], False)
    assert_close(x, ref, scale, 3, f"{layout} in place")


@parametrize_backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 4])
def test_round_trip(device, backend, dtype, k):
    """lincomb_inverse_(lincomb_(x)) == x up to both roundings to x's dtype (the first amplified
    by 1/|c_0|) and the arithmetic of both steps."""
    if not supports(backend, dtype):
        pytest.skip(f"backend {backend!r} does not support {dtype} (rejection is tested above)")
    gen = torch.Generator().manual_seed(5)
    x0 = rand((5, 1031), dtype, device, gen)
    terms = [rand((5, 1031), dtype, device, gen) for _ in range(k)]
    coef = make_coef((5, k + 1), x0, gen, inverse=True)
    x = x0.clone()
    bk.lincomb_(x, terms, coef, backend=backend)
    x1 = x.clone()
    _, s_fwd = reference(x0, terms, coef, False)
    _, s_inv = reference(x1, terms, coef, True)
    bk.lincomb_inverse_(x, terms, coef, backend=backend)
    a = coef[:, :1].to(compute_dtype(dtype)).double().abs().cpu()
    eps_x, eps_c = torch.finfo(dtype).eps, torch.finfo(compute_dtype(dtype)).eps
    x0d, x1d = x0.double().cpu(), x1.double().cpu()
    bound = 2 * eps_x * (x0d.abs() + x1d.abs() / a) + (k + 2) * eps_c * (
        s_inv.cpu() + s_fwd.cpu() / a)
    assert ((x.double().cpu() - x0d).abs() <= bound).all()


@parametrize_backends
def test_lincomb3_is_the_two_term_case(device, backend):
    gen = torch.Generator().manual_seed(6)
    x, y = (rand((4, 300), BF16, device, gen) for _ in range(2))
    z = rand((4, 300), F32, device, gen)
    coef = make_coef((4, 3), x, gen, inverse=True)
    for three, general in ((bk.lincomb3_, bk.lincomb_),
                           (bk.lincomb3_inverse_, bk.lincomb_inverse_)):
        a, b = x.clone(), x.clone()
        three(a, y, z, coef, backend=backend)
        general(b, (y, z), coef, backend=backend)
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# What the compiled kernels need on top: their vector widths and blocks, every dtype mix,
# alignment, per-sample rows, degenerate shapes, strided outputs, direct calls.

# Around the CPU kernel's vectors (8 or 16 float lanes, two per step), the CUDA kernel's packs
# (2, 4 or 8 elements) and the Triton kernel's block (1024 elements).
EDGE_SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1023, 1024, 1025]


def check_lincomb(device, backend, shape, x_dtype, term_dtypes, out_dtypes, per_sample, inverse,
                  gen, what, views=None):
    """Run one update on fresh data and check every output against the float64 reference.
    out_dtypes None: in place. views(t) -> the tensor to pass for t (same values; a strided or
    unaligned view, say): applied to every operand. Inputs must stay bitwise untouched."""
    views = views or (lambda t: t)
    x = rand(shape, x_dtype, device, gen)
    terms = [rand(shape, d, device, gen) for d in term_dtypes]
    m = 1 if out_dtypes is None else len(out_dtypes)
    rows = (shape[0],) if per_sample else ()
    coef = make_coef(rows + ((m,) if out_dtypes is not None else ()) + (len(terms) + 1,), x,
                     gen, inverse)
    if not supports(backend, x_dtype):
        return
    x0 = x.clone()
    terms = [views(t) for t in terms]
    kept = [t.clone() for t in terms]
    if out_dtypes is None:
        target = views(x)
        op = bk.lincomb_inverse_ if inverse else bk.lincomb_
        assert op(target, terms, coef, backend=backend) is target
        ref, scale = reference(x0, terms, coef, inverse)
        assert_close(target, ref, scale, len(terms), what, x_dtype)
    else:
        source = views(x)
        outs = [views(torch.full(shape, float("nan"), dtype=d, device=device))
                for d in out_dtypes]
        got = bk.lincomb(source, terms, coef, out=outs, inverse=inverse, backend=backend)
        assert all(g is o for g, o in zip(got, outs, strict=True))
        for i, o in enumerate(outs):
            ref, scale = reference(x0, terms, coef[..., i, :], inverse)
            assert_close(o, ref, scale, len(terms), f"{what} output {i}", x_dtype)
        assert_bitwise_equal(source, views(x0), "x")
    for t, t0 in zip(terms, kept, strict=True):
        assert_bitwise_equal(t, t0, "a term")


@parametrize_backends
@pytest.mark.parametrize("k", range(1, ops.MAX_TERMS + 1))
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_sizes_around_vector_widths_and_blocks(device, backend, k, inverse):
    """Every K at every edge size, x in each dtype in turn (so every pack length), the terms
    cycling through the dtypes."""
    gen = torch.Generator().manual_seed(20 + k)
    for i, n in enumerate(EDGE_SIZES):
        x_dtype = DTYPES[i % 4]
        terms = [DTYPES[(i + j) % 4] for j in range(1, k + 1)]
        check_lincomb(device, backend, (n,), x_dtype, terms, None, False, inverse, gen,
                      f"K={k} n={n} x {x_dtype}")


@parametrize_backends
@pytest.mark.parametrize("m", range(1, ops.MAX_OUTPUTS + 1))
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_every_dtype_per_term_and_per_output(device, backend, m, x_dtype):
    """Outputs of every dtype next to every x dtype (wider and narrower ones: 16-bit outputs of
    float64 math among them), three terms of the other dtypes, odd per-sample rows."""
    gen = torch.Generator().manual_seed(30 + m)
    for r in range(4):
        out_dtypes = [DTYPES[(r + i) % 4] for i in range(m)]
        terms = [DTYPES[(r + i + 1) % 4] for i in range(3)]
        check_lincomb(device, backend, (3, 67), x_dtype, terms, out_dtypes, True, False, gen,
                      f"outputs {out_dtypes}")
    check_lincomb(device, backend, (3, 67), x_dtype, [DTYPES[r] for r in range(4)],
                  [DTYPES[(DTYPES.index(x_dtype) + 1) % 4]], True, True, gen, "inverse")


def _unaligned(t):
    """t's values in a view one element into a fresh buffer: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


@parametrize_backends
@pytest.mark.parametrize("signature", [(F32, (F32, F16), None), (BF16, (BF16, F64, F16), None),
                                       (F32, (F16, BF16), (F32, BF16)),
                                       (F64, (F32,), (F64, F16, F32))], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_unaligned_views(device, backend, signature, per_sample):
    """Every operand one element off a 16-byte boundary: the kernels' narrower (unaligned)
    path, with vector-length tails."""
    gen = torch.Generator().manual_seed(40)
    for shape in [(2, 1031), (3, 4097)]:
        check_lincomb(device, backend, shape, *signature, per_sample, False, gen,
                      f"unaligned {shape}", views=_unaligned)


# Per-sample row lengths: single elements, around the vector widths, around 256 packs (the CUDA
# kernel's rows path needs kThreads packs per row), around 4096 (Triton's long rows) and more.
INNER = [1, 2, 7, 8, 9, 255, 256, 257, 2047, 2048, 2056, 4095, 4096, 4097, 8195]


@parametrize_backends
@pytest.mark.parametrize("inner", INNER)
def test_per_sample_rows_of_many_lengths(device, backend, inner):
    gen = torch.Generator().manual_seed(50 + inner)
    check_lincomb(device, backend, (3, inner), F16, (F16, F32), None, True, False, gen,
                  "in place, forward")
    check_lincomb(device, backend, (3, inner), F32, (BF16, F32, F16, F64), None, True, True,
                  gen, "in place, inverse, 4 terms")
    check_lincomb(device, backend, (3, inner), BF16, (F32,), (BF16, F32), True, False, gen,
                  "two outputs")


@parametrize_backends
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (), (1,), (1, 33), (1, 4, 8, 8)],
                         ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_empty_zero_dim_and_batch_one(device, backend, shape, per_sample):
    if per_sample and not shape:
        pytest.skip("a 0-d tensor has no batch dimension for per-sample rows")
    gen = torch.Generator().manual_seed(60)
    check_lincomb(device, backend, shape, F32, (F16, F32, BF16), None, per_sample, True, gen,
                  "in place")
    check_lincomb(device, backend, shape, BF16, (F32,), (BF16, F64, F16), per_sample, False,
                  gen, "three outputs")


@parametrize_backends
@pytest.mark.parametrize("layout", ["channels_last", "column", "unaligned"])
def test_non_contiguous_outputs(device, backend, layout):
    """Outputs of three dtypes as strided views of larger buffers, the inputs contiguous: each
    output right, nothing outside its view written."""
    gen = torch.Generator().manual_seed(70)
    shape = (2, 3, 5, 7)
    x = rand(shape, F32, device, gen)
    terms = [rand(shape, d, device, gen) for d in (F16, F32)]
    coef = make_coef((2, 3, 3), x, gen)
    bases, outs = [], []
    for d in (F32, BF16, F64):
        if layout == "channels_last":
            base = torch.full(shape, 7.0, dtype=d, device=device).contiguous(
                memory_format=torch.channels_last)
            view = base
        elif layout == "column":
            base = torch.full(shape[:-1] + (shape[-1] + 3,), 7.0, dtype=d, device=device)
            view = base[..., 1:shape[-1] + 1]
        else:
            base = torch.full((x.numel() + 2,), 7.0, dtype=d, device=device)
            view = base[1:-1].view(shape)
        bases.append(base)
        outs.append(view)
    bk.lincomb(x, terms, coef, out=outs, backend=backend)
    for i, (o, base) in enumerate(zip(outs, bases, strict=True)):
        ref, scale = reference(x, terms, coef[..., i, :], False)
        assert_close(o, ref, scale, 2, f"{layout} output {i}")
        mask = torch.ones(base.shape, dtype=torch.bool, device=device)
        mask.as_strided(o.shape, o.stride(), o.storage_offset() - base.storage_offset()).fill_(
            False)
        assert (base[mask] == 7).all(), f"{layout}: output {i} written outside its view"


def _extension_backends(device):
    return [(b, (b,)) for b in bk.available_backends(device) if b in ("cpu", "cuda")]


def _bad_extension_calls(device):
    """name -> (message regex, call()): direct calls of the extension op on ``device`` that its
    own checks must refuse before any write (the same on the CPU and CUDA kernels)."""
    def t(shape=(2, 8), dtype=F32):
        return torch.randn(shape, device=device).to(dtype)

    x, y, z, o = t(), t(), t(), t()
    c2 = torch.ones(3, device=device)
    c1 = torch.ones(2, device=device)
    base = t((32,))
    expanded = t((1, 8)).expand(2, 8)
    def op(out, x, terms, coef):
        torch.ops.belm.lincomb_ext(out, x, terms, coef, False)

    overlap = "must not share memory|single memory location"
    return {
        "no outputs": ("out must hold 1 to 3", lambda: op([], x, [y], c1)),
        "four outputs": ("out must hold 1 to 3",
                         lambda: op([o, t(), t(), t()], x, [y], torch.ones(4, 2, device=device))),
        "no terms": ("terms must hold 1 to 6", lambda: op([o], x, [], c1[:1])),
        "seven terms": ("terms must hold 1 to 6",
                        lambda: op([o], x, [y] * 7, torch.ones(8, device=device))),
        "term shape": (r"terms\[1\] must have x's shape", lambda: op([x], None, [y, t((2, 7))],
                                                                      c2)),
        "output shape": (r"out\[1\] must have x's shape",
                         lambda: op([o, t((8, 2))], x, [y], torch.ones(2, 2, device=device))),
        "integer term": (r"terms\[0\] must be float16",
                         lambda: op([x], None, [t(dtype=torch.int32), z], c2)),
        "coef shape": ("coef must hold", lambda: op([x], None, [y, z], c1)),
        "coef rows": ("coef must hold",
                      lambda: op([x], None, [y, z], torch.ones(3, 3, device=device))),
        "expanded output": ("overlapping memory|more than one element",
                            lambda: op([expanded], x, [y], c1)),
        "output is a term": (overlap, lambda: op([y], x, [y], c1)),
        "output is x": (overlap, lambda: op([x], x, [y], c1)),
        "outputs overlap": (overlap, lambda: op([base[:16].view(2, 8), base[8:24].view(2, 8)],
                                                x, [y], torch.ones(2, 2, device=device))),
        "coef inside the output": (overlap, lambda: op([x], None, [y, z], x.view(-1)[:3])),
    }


BAD_EXTENSION = list(_bad_extension_calls("cpu"))


@pytest.mark.parametrize("device,backend", device_params(_extension_backends))
@pytest.mark.parametrize("case", BAD_EXTENSION)
def test_extension_op_rejects_bad_arguments_before_writing(device, backend, case):
    match, call = _bad_extension_calls(device)[case]
    # Every tensor the call can reach, by identity: none may change.
    cells = [c.cell_contents for c in call.__closure__ or ()]
    tensors = [v for v in cells if isinstance(v, torch.Tensor)]
    before = [v.clone() for v in tensors]
    with pytest.raises(RuntimeError, match=match):
        call()
    for v, v0 in zip(tensors, before, strict=True):
        assert_bitwise_equal(v, v0, case)


# --------------------------------------------------------------------------------------------
# Bad input: each raises before anything is written.


def _bad_calls(device):
    """name -> (exception, message regex, call(x, terms, outs))."""
    f = torch.float32

    def like(shape=(3, 8), dtype=f, dev=device):
        return torch.zeros(shape, dtype=dtype, device=dev)

    c2 = [1.0, 0.5, 0.25]
    return {
        "terms-tensor": (TypeError, "terms must be a list or tuple",
                         lambda x, t, o: bk.lincomb_(x, t[0], c2)),
        "terms-empty": (ValueError, "terms must hold 1 to",
                        lambda x, t, o: bk.lincomb_(x, [], [1.0])),
        "terms-too-many": (ValueError, "terms must hold 1 to",
                           lambda x, t, o: bk.lincomb_(x, [t[0]] * (ops.MAX_TERMS + 1),
                                                       [1.0] * (ops.MAX_TERMS + 2))),
        "term-shape": (ValueError, r"terms\[1\] must have x's shape",
                       lambda x, t, o: bk.lincomb_(x, [t[0], like((3, 7))], c2)),
        "term-device": (ValueError, r"terms\[0\] must be on x's device",
                        lambda x, t, o: bk.lincomb_(x, [like(dev="meta"), t[1]], c2)),
        "term-int": (TypeError, r"terms\[1\] must have a float dtype",
                     lambda x, t, o: bk.lincomb_(x, [t[0], like(dtype=torch.int32)], c2)),
        "term-not-tensor": (TypeError, r"terms\[0\] must be a torch.Tensor",
                            lambda x, t, o: bk.lincomb_(x, [1.0, t[1]], c2)),
        "coef-length": (ValueError, r"coef must have shape \(3,\) or \(3, 3\)",
                        lambda x, t, o: bk.lincomb_(x, t, torch.ones(4, device=device))),
        "coef-list-length": (TypeError, "a sequence of 3 floats",
                             lambda x, t, o: bk.lincomb_(x, t, [1.0, 2.0])),
        "coef-several-shape": (ValueError, r"coef must have shape \(2, 3\) or \(3, 2, 3\)",
                               lambda x, t, o: bk.lincomb(x, t, torch.ones(3, 3, device=device),
                                                          out=o)),
        "coef-several-list": (TypeError, "2 sequences of 3 floats",
                              lambda x, t, o: bk.lincomb(x, t, c2, out=o)),
        "out-shape": (ValueError, r"out\[1\] must have x's shape",
                      lambda x, t, o: bk.lincomb(x, t, [c2, c2], out=[o[0], like((8, 3))])),
        "out-device": (ValueError, "out must be on x's device",
                       lambda x, t, o: bk.lincomb(x, t, c2, out=like(dev="meta"))),
        "out-int": (TypeError, "out must have a float dtype",
                    lambda x, t, o: bk.lincomb(x, t, c2, out=like(dtype=torch.int64))),
        "out-too-many": (ValueError, "out must hold 1 to",
                         lambda x, t, o: bk.lincomb(x, t, [c2] * 4, out=[None] * 4)),
        "inverse-several": (ValueError, "an inverse update has one output",
                            lambda x, t, o: bk.lincomb(x, t, [c2, c2], out=o, inverse=True)),
        "out-is-x": (ValueError, "out must not share memory with x",
                     lambda x, t, o: bk.lincomb(x, t, c2, out=x)),
        "out-is-a-term": (ValueError, r"out\[0\] must not share memory with terms\[1\]",
                          lambda x, t, o: bk.lincomb(x, t, [c2, c2], out=[t[1], o[1]])),
        "outs-overlap": (ValueError, r"out\[0\] must not share memory with out\[1\]",
                         lambda x, t, o: bk.lincomb(x, t, [c2, c2], out=[o[0], o[0]])),
        "out-expanded": (ValueError, "out has internally overlapping memory",
                         lambda x, t, o: bk.lincomb(x, t, c2, out=o[0][:1].expand(3, 8))),
        "coef-in-out": (ValueError, "out must not share memory with coef",
                        lambda x, t, o: bk.lincomb(x, t, o[0].view(-1)[:3], out=o[0])),
        "inverse-zero": (ValueError, "must be nonzero",
                         lambda x, t, o: bk.lincomb_inverse_(x, t, [0.0, 1.0, 1.0])),
    }


BAD = list(_bad_calls("cpu"))


@parametrize_backends
@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_before_writing(device, backend, case):
    exc, match, call = _bad_calls(device)[case]
    gen = torch.Generator().manual_seed(7)
    x = rand((3, 8), F32, device, gen)
    terms = [rand((3, 8), F32, device, gen), rand((3, 8), F16, device, gen)]
    outs = [rand((3, 8), F32, device, gen), rand((3, 8), F32, device, gen)]
    everything = [x, *terms, *outs]
    before = [t.clone() for t in everything]
    with pytest.raises(exc, match=match):
        call(x, terms, outs)
    for t, t0 in zip(everything, before, strict=True):
        assert_bitwise_equal(t, t0, case)


# --------------------------------------------------------------------------------------------
# The registered ops: opcheck, torch.compile, autograd.


@parametrize_backends
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_opcheck(device, backend, per_sample):
    gen = torch.Generator().manual_seed(8)
    shape = (3, 37)
    x = rand(shape, F32, device, gen)
    terms = [rand(shape, d, device, gen) for d in (F16, F32, BF16)]
    rows = make_coef((3, 2, 4) if per_sample else (2, 4), x, gen).float()
    outs = [rand(shape, F32, device, gen), rand(shape, BF16, device, gen)]
    torch.library.opcheck(torch.ops.belm.lincomb_, (outs, x, terms, rows, False, backend))
    torch.library.opcheck(torch.ops.belm.lincomb_,
                          ([x.clone()], None, terms, rows[..., 0, :].contiguous(), True,
                           backend))
    grads = [t.clone().requires_grad_() for t in (x, *terms)]
    torch.library.opcheck(torch.ops.belm.lincomb, (grads[0], grads[1:], rows[..., 0, :].clone()
                                                   .requires_grad_(), False, backend, None))


@parametrize_backends
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def step(x, terms, coef, outs):
        bk.lincomb(x, terms, coef, out=outs, backend=backend)
        bk.lincomb_inverse_(x, terms, [1.5, 0.25, -0.5, 0.125], backend=backend)

    gen = torch.Generator().manual_seed(9)
    x = rand((4, 3, 16), F32, device, gen)
    terms = [rand((4, 3, 16), d, device, gen) for d in (BF16, F32, F16)]
    coef = make_coef((4, 2, 4), x, gen).float()
    outs = [torch.empty_like(x), torch.empty_like(x, dtype=F16)]
    x0 = x.clone()
    torch.compile(step, fullgraph=True)(x, terms, coef, outs)
    for i, o in enumerate(outs):
        ref, scale = reference(x0, terms, coef[:, i], False)
        assert_close(o, ref, scale, 3, f"compiled output {i}")
    ref, scale = reference(x0, terms, torch.tensor([1.5, 0.25, -0.5, 0.125]), True)
    assert_close(x, ref, scale, 3, "compiled inverse")


@parametrize_backends
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_gradcheck(device, backend, inverse, per_sample):
    gen = torch.Generator().manual_seed(10)
    x, t1, t2, t3 = (rand((2, 3), F64, device, gen).requires_grad_() for _ in range(4))
    coef = make_coef((2, 4) if per_sample else (4,), x, gen, inverse=True).requires_grad_()

    def in_place(x, t1, t2, t3, coef):
        op = bk.lincomb_inverse_ if inverse else bk.lincomb_
        return op(x.clone(), [t1, t2, t3], coef, backend=backend)

    def two_outputs(x, t1, t2, t3, coef):
        rows = torch.stack([coef, coef.flip(-1)], dim=-2)
        return bk.lincomb(x, [t1, t2, t3], rows, out=[None, None], backend=backend)

    assert torch.autograd.gradcheck(in_place, (x, t1, t2, t3, coef))
    if not inverse:
        assert torch.autograd.gradcheck(two_outputs, (x, t1, t2, t3, coef))


@parametrize_backends
def test_gradient_into_an_output_of_another_dtype(device, backend):
    """With autograd recording, an output of another dtype than x is still rounded once."""
    gen = torch.Generator().manual_seed(11)
    x = rand((4, 9), F16, device, gen).requires_grad_()
    t = rand((4, 9), F32, device, gen)
    out = torch.empty(4, 9, dtype=F32, device=device)
    got = bk.lincomb(x, [t], [0.3, 0.7], out=out, backend=backend)
    ref, scale = reference(x.detach(), [t], torch.tensor([0.3, 0.7]), False)
    assert_close(got.detach(), ref, scale, 1, "float32 output of float16 x", F16)
    got.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.3))
