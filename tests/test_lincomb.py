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

* float32 / float64 outputs of float32 / float64 math:  |out - ref| <= (K + 2) * eps * S
* float16 / bfloat16 outputs: within one ulp of the correctly rounded reference, plus that
  arithmetic term (test_ops.py's bound, with its reasons).
"""

from __future__ import annotations

import pytest
import torch
from test_ops import (
    _FORMAT,
    DTYPES,
    assert_bitwise_equal,
    compute_dtype,
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
    if out.dtype in _FORMAT:
        rounded = round_exact(ref, out.dtype)
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
