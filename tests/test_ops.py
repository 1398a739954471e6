"""The op test suite shared by every backend of ``lincomb3_`` / ``lincomb3_inverse_``.

Each test runs for every (device, backend) pair that ``belm_kernels.available_backends`` lists:
on CPU "torch", "cpu" (C++ extension, once built) and "triton" (through the Triton interpreter,
which tests/conftest.py switches on where there is no GPU); on CUDA, when a GPU is present,
"torch", "triton" and "cuda". Without a GPU the CUDA cases skip with a reason.

Error bounds, against a float64 reference computed here from the inputs as the op sees them
(y, z and coef rounded to the compute dtype first, then widened exactly to float64). With
S = |a x| + |b y| + |c z| for the forward op and S = (|x| + |b y| + |c z|) / |a| for the inverse:

* float32 x:          |out - ref| <= 4 * eps32 * S
* float64 x:          |out - ref| <= 8 * eps64 * S   (the float64 reference rounds too)
* float16/bfloat16 x: |out - round(ref)| <= ulp(round(ref)) + 4 * eps32 * S, where round() is
  the correctly rounded (round-to-nearest-even) conversion computed exactly here. That is
  "within 1 ulp of the correctly rounded result"; the second term only matters under heavy
  cancellation, where the float32 arithmetic the contract prescribes cannot do better. The
  1-ulp slack also covers the Triton interpreter, which truncates float32 -> bfloat16 stores.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

import belm_kernels as bk
from belm_kernels import ops

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
OPS = {"forward": bk.lincomb3_, "inverse": bk.lincomb3_inverse_}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Number of mantissa bits (including the implicit one) and the exponent (as torch.frexp
# reports it) of the smallest normal number, for the exact rounding of the reference.
_FORMAT = {torch.float16: (11, -13), torch.bfloat16: (8, -125)}
COEF_LIST = [1.07, -0.45, 0.21]


def device_params(cases, devices=("cpu", "cuda"), width=1):
    """pytest params (device, *values) for each (id, values) in cases(device). CUDA params carry
    the "gpu" mark; without a GPU one skipped placeholder stands for all of them."""
    params = []
    for device in devices:
        if device == "cuda" and not HAS_CUDA:
            marks = [pytest.mark.gpu, pytest.mark.skip(reason=NO_CUDA)]
            params.append(pytest.param("cuda", *(None,) * width, id="cuda", marks=marks))
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        params += [pytest.param(device, *values, id=f"{device}-{case_id}", marks=marks)
                   for case_id, values in cases(device)]
    return params


def _available(device):
    return [(b, (b,)) for b in bk.available_backends(device)]


def _unavailable(device):
    available = bk.available_backends(device)
    return [(b, (b,)) for b in ops.BACKENDS if b not in available]


DEVICE_BACKENDS = device_params(_available)
parametrize_backends = pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
parametrize_cpu_backends = pytest.mark.parametrize(
    "device,backend", device_params(_available, ("cpu",)))
parametrize_cuda_backends = pytest.mark.parametrize(
    "device,backend", device_params(_available, ("cuda",)))
parametrize_ops = pytest.mark.parametrize("op", list(OPS))


# --------------------------------------------------------------------------------------------
# Helpers.


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def supports(backend: str, dtype: torch.dtype) -> bool:
    return backend == "auto" or dtype in ops.get_backend(backend).dtypes


def rand(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def make(shape, dtype, device, gen, layout="contiguous"):
    """A tensor of ``shape`` laid out as ``layout`` inside a larger base; returns (view, base)."""
    shape = tuple(shape)
    if layout == "contiguous":
        base = rand(shape, dtype, device, gen)
        return base, base
    if layout == "transposed":  # all dimensions reversed
        base = rand(shape[::-1], dtype, device, gen)
        return base.permute(*reversed(range(len(shape)))), base
    if layout == "step":  # every other sample
        base = rand((2 * shape[0],) + shape[1:], dtype, device, gen)
        return base[::2], base
    if layout == "column":  # a column slice of the last dimension
        base = rand(shape[:-1] + (shape[-1] + 3,), dtype, device, gen)
        return base[..., 1:shape[-1] + 1], base
    if layout == "offset":  # contiguous, one element into its storage: not 16-byte aligned
        base = rand((math.prod(shape) + 2,), dtype, device, gen)
        return base[1:-1].view(shape), base
    raise ValueError(layout)


def make_coef(kind, x, gen):
    """The coef argument: a shared (3,) tensor, per-sample (B, 3) distinct rows, or a list."""
    ct = compute_dtype(x.dtype)
    if kind == "list":
        return list(COEF_LIST)
    if kind == "shared":  # float64 on purpose: the op converts it to the compute dtype
        return torch.tensor([0.93, 0.31, -0.27], dtype=torch.float64, device=x.device)
    assert kind == "per_sample"
    batch = x.shape[0]
    sign = torch.where(torch.rand(batch, generator=gen) < 0.3, -1.0, 1.0)
    a = (0.5 + torch.rand(batch, generator=gen)) * sign
    b, c = 0.8 * torch.randn(2, batch, generator=gen)
    return torch.stack([a, b, c], dim=1).to(ct).to(x.device)


def coef_columns(coef, x):
    """(a, b, c) in float64, as the op uses them (rounded to the compute dtype first)."""
    c = coef if isinstance(coef, torch.Tensor) else torch.tensor(coef, dtype=torch.float64)
    c = c.to(device=x.device, dtype=compute_dtype(x.dtype)).double()
    if c.dim() == 2:
        c = c.reshape((c.shape[0],) + (1,) * (x.dim() - 1) + (3,))
    return c.unbind(-1)


def reference(x, y, z, coef, inverse):
    """float64 result and error scale S (see the module docstring)."""
    a, b, c = coef_columns(coef, x)
    ct = compute_dtype(x.dtype)
    xd, yd, zd = (t.to(ct).double() for t in (x, y, z))
    if inverse:
        return (xd - b * yd - c * zd) / a, (xd.abs() + (b * yd).abs() + (c * zd).abs()) / a.abs()
    return a * xd + b * yd + c * zd, (a * xd).abs() + (b * yd).abs() + (c * zd).abs()


def round_exact(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> float16/bfloat16 rounded to nearest even in one step (torch's own conversion
    from float64 goes through float32 and can double-round)."""
    digits, min_exp = _FORMAT[dtype]
    _, exp = torch.frexp(ref)
    spacing = torch.ldexp(torch.ones_like(ref), exp.clamp(min=min_exp) - digits)
    return (torch.round(ref / spacing) * spacing).to(dtype)  # exact: representable already


def ulp(r: torch.Tensor) -> torch.Tensor:
    """Distance from |r| to the next larger value of r's dtype, in float64."""
    mag = r.abs()
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def assert_close(out, ref, scale, what=""):
    dtype = out.dtype
    out, ref, scale = out.cpu(), ref.cpu(), scale.cpu()
    ct = compute_dtype(dtype)
    arith = (4 if ct == torch.float32 else 8) * torch.finfo(ct).eps * scale
    if dtype in _FORMAT:
        rounded = round_exact(ref, dtype)
        err, tol = (out.double() - rounded.double()).abs(), ulp(rounded) + arith
    else:
        err, tol = (out.double() - ref).abs(), arith
    bad = ~(err <= tol)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside the bound; first at flat "
            f"index {i}: got {out.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r}, "
            f"error {err.flatten()[i].item():.3g} > bound {tol.flatten()[i].item():.3g}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(bits(a), bits(b)), f"{what} was modified"


def view_mask(view, base):
    """Boolean tensor over base, True at the elements that view covers."""
    mask = torch.zeros(base.shape, dtype=torch.bool, device=base.device)
    offset = view.storage_offset() - base.storage_offset()
    mask.as_strided(view.shape, view.stride(), offset).fill_(True)
    return mask


def run_checked(op, x, y, z, coef, backend):
    """Run the op and check that it returns x and leaves y and z bitwise untouched."""
    y0, z0 = y.clone(), z.clone()
    assert OPS[op](x, y, z, coef, backend=backend) is x
    assert_bitwise_equal(y, y0, "y")
    assert_bitwise_equal(z, z0, "z")


def check_op(device, backend, op, shape, dtype, zdtype=None, coef_kind="shared",
             x_layout="contiguous", yz_layout="contiguous", seed=0):
    """Run one op on fresh data and check it against the float64 reference; memory of x's base
    outside the view must stay untouched. A dtype the backend lacks must raise TypeError."""
    gen = torch.Generator().manual_seed(seed)
    x, xbase = make(shape, dtype, device, gen, x_layout)
    y, _ = make(shape, dtype, device, gen, yz_layout)
    z, _ = make(shape, zdtype or dtype, device, gen, yz_layout)
    coef = make_coef(coef_kind, x, gen)
    base0, x0 = xbase.clone(), x.clone()
    if not supports(backend, dtype):
        with pytest.raises(TypeError, match="supports x dtypes"):
            OPS[op](x, y, z, coef, backend=backend)
        assert_bitwise_equal(xbase, base0, "x after a rejected call")
        return
    ref, scale = reference(x0, y, z, coef, op == "inverse")
    run_checked(op, x, y, z, coef, backend)
    assert_close(x, ref, scale, f"{backend} {op} {dtype} {shape}")
    outside = ~view_mask(x, xbase)
    assert torch.equal(bits(xbase[outside]), bits(base0[outside])), "x's base written outside x"


# --------------------------------------------------------------------------------------------
# Correctness.

# Around the Triton kernel's default block of 1024 elements (body / masked tail), the 16-byte
# vector lengths (2 to 8 elements) and the CPU kernel's vector bodies; one element; empty.
SHAPES = [(1,), (7,), (1023,), (1024,), (1025,), (4099,), (2, 4, 64, 64), (0,), (0, 4)]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample", "list"])
def test_matches_reference(device, backend, op, dtype, shape, coef_kind):
    check_op(device, backend, op, shape, dtype, coef_kind=coef_kind)


F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
MIXED = [(F32, F16), (F32, BF16), (BF16, F32), (F16, F32), (F16, BF16), (F32, F64), (F64, F32)]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("dtype,zdtype", MIXED, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample"])
def test_mixed_z_dtype(device, backend, op, dtype, zdtype, coef_kind):
    check_op(device, backend, op, (3, 1031), dtype, zdtype, coef_kind)


LAYOUTS = [("transposed", "contiguous"), ("step", "contiguous"), ("column", "contiguous"),
           ("contiguous", "transposed"), ("contiguous", "step"), ("contiguous", "column"),
           ("transposed", "column"), ("column", "step"), ("offset", "contiguous"),
           ("contiguous", "offset"), ("offset", "offset")]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_layout,yz_layout", LAYOUTS, ids=lambda s: s)
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample"])
def test_noncontiguous(device, backend, op, dtype, x_layout, yz_layout, coef_kind):
    check_op(device, backend, op, (6, 5, 33), dtype, None, coef_kind, x_layout, yz_layout)


# Per-sample rows. Short ones (the Triton kernel looks each lane's row up): one element, a
# block, not a multiple of any vector length. Long ones (4096 elements or more: a program per
# block of a row, whose first elements up to a 16-byte boundary are a masked head): whole
# vectors for every dtype (4096: no head), for float32/float64 only (4100: a head for 16-bit
# dtypes), for none (4099: a head for every row but the first), two blocks and a tail (8195).
INNER = [1, 1024, 1031, 4096, 4099, 4100, 8195]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("dtype,zdtype", [(F16, F32), (BF16, BF16), (F32, F16), (F64, F32)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
def test_per_sample_rows(device, backend, op, dtype, zdtype, inner, layout):
    check_op(device, backend, op, (3, inner), dtype, zdtype, "per_sample", layout, layout)


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_dim(device, backend, op, dtype):
    check_op(device, backend, op, (), dtype, coef_kind="shared")


@parametrize_backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample", "list"])
def test_round_trip(device, backend, dtype, coef_kind):
    """inverse(forward(x)) == x up to: the rounding of both results to x's dtype, amplified by
    1/|a| for the first, plus the float32/64 arithmetic error of both steps."""
    if not supports(backend, dtype):
        pytest.skip(f"backend {backend!r} does not support {dtype} (rejection is tested elsewhere)")
    gen = torch.Generator().manual_seed(1)
    x0, y, z = (rand((5, 1031), dtype, device, gen) for _ in range(3))
    coef = make_coef(coef_kind, x0, gen)
    a = coef_columns(coef, x0)[0].abs()
    x = x0.clone()
    run_checked("forward", x, y, z, coef, backend)
    x1 = x.clone()
    _, s_fwd = reference(x0, y, z, coef, inverse=False)
    _, s_inv = reference(x1, y, z, coef, inverse=True)
    run_checked("inverse", x, y, z, coef, backend)
    ct = compute_dtype(dtype)
    eps_x, eps_c = torch.finfo(dtype).eps, torch.finfo(ct).eps
    x0d, x1d = x0.double(), x1.double()
    bound = 2 * eps_x * (x0d.abs() + x1d.abs() / a) + 8 * eps_c * (s_inv + s_fwd / a)
    err = (x.double() - x0d).abs()
    assert (err <= bound).all(), f"round trip error {(err - bound).max().item():.3g} over the bound"


@pytest.mark.parametrize("device", device_params(lambda d: [("auto", ())], width=0))
def test_auto_backend_and_listing(device):
    names = bk.available_backends(device)
    assert "torch" in names and set(names) <= set(ops.BACKENDS)
    check_op(device, "auto", "forward", (3, 100), torch.float32, coef_kind="per_sample")


# --------------------------------------------------------------------------------------------
# Aliasing.


def _alias_cases(device):
    """(name, x, y, z) where x shares memory with y or z."""
    base = torch.randn(12, device=device)
    other = torch.randn(6, device=device)
    x = base[:6]
    return [
        ("y-is-x", x, x, other),
        ("z-is-x", x, other, x),
        ("y-overlaps-x", x, base[4:10], other),
        ("z-view-of-x", x, other, x.view(2, 3).reshape(6)),
    ]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("case", range(4))
def test_x_aliasing_y_or_z_raises(device, backend, op, case):
    name, x, y, z = _alias_cases(device)[case]
    before = x.clone()
    with pytest.raises(ValueError, match="share memory"):
        OPS[op](x, y, z, [0.9, 0.2, 0.3], backend=backend)
    assert_bitwise_equal(x, before, f"x ({name})")


@parametrize_backends
@parametrize_ops
def test_coef_sharing_memory_with_x_raises(device, backend, op):
    """A coef that is a view into x: the kernels would read coefficients already overwritten."""
    gen = torch.Generator().manual_seed(2)
    x, y, z = (rand((2, 8), torch.float32, device, gen) for _ in range(3))
    for coef in (x.view(-1)[5:8], x.view(-1)[:6].view(2, 3)):
        expect_rejected((x, y, z, coef), {}, ValueError, "x must not share memory with coef", op,
                        backend)


# (sizes, strides) of views that hit one address twice in ways torch's own check cannot classify
# (torch._debug_has_internal_overlap says "too hard"), and one it can (an expanded dimension).
SELF_OVERLAPPING = [((4, 4), (2, 1)), ((3, 3), (1, 1)), ((2, 5), (3, 1)), ((3, 2, 2), (1, 2, 2)),
                    ((4, 3), (1, 0))]


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("sizes,strides", SELF_OVERLAPPING, ids=str)
def test_x_overlapping_itself_raises(device, backend, op, sizes, strides):
    gen = torch.Generator().manual_seed(2)
    base = rand((64,), torch.float32, device, gen)
    x = base.as_strided(sizes, strides, 1)
    y, z = (rand(sizes, torch.float32, device, gen) for _ in range(2))
    before = base.clone()
    with pytest.raises(ValueError, match="internally overlapping"):
        OPS[op](x, y, z, COEF_LIST, backend=backend)
    assert_bitwise_equal(base, before, "x's storage")


def _distinct_addresses(sizes, strides) -> bool:
    index = torch.arange(256.0).as_strided(sizes, strides)
    return index.unique().numel() == index.numel()


def test_self_overlap_check_proves_overlap_and_only_overlap():
    """The stride check never rejects a view whose elements are distinct (addresses enumerated
    here), detects the cases above, and misses the documented three-dimension collision."""
    for sizes, strides in [((2, 3), (3, 2)), ((3, 4), (1, 3)), ((2, 2, 2), (4, 1, 2)),
                           ((5, 3), (7, 2)), ((3, 3, 3), (1, 3, 9)), ((2, 3, 4), (1, 2, 6)),
                           ((4, 1, 3), (3, 1, 1))]:
        assert _distinct_addresses(sizes, strides), (sizes, strides)
        assert not ops._overlaps_itself(torch.zeros(256).as_strided(sizes, strides))
    for sizes, strides in SELF_OVERLAPPING:
        assert not _distinct_addresses(sizes, strides), (sizes, strides)
        assert ops._overlaps_itself(torch.zeros(256).as_strided(sizes, strides))
    undetected = ((2, 2, 2), (2, 3, 5))  # 2 + 3 = 5
    assert not _distinct_addresses(*undetected)
    assert not ops._overlaps_itself(torch.zeros(256).as_strided(*undetected))


@parametrize_backends
@parametrize_ops
def test_y_z_aliasing_and_shared_storage_work(device, backend, op):
    gen = torch.Generator().manual_seed(2)
    base = rand((2, 3, 40), torch.float32, device, gen)
    x, y = base[0], base[1]  # one storage, disjoint halves: allowed
    for z in (y, y.view(120).view(3, 40)):  # y and z aliasing each other: allowed
        x0 = x.clone()
        ref, scale = reference(x0, y, z, COEF_LIST, op == "inverse")
        run_checked(op, x, y, z, COEF_LIST, backend)
        assert_close(x, ref, scale, "aliased y/z")


# --------------------------------------------------------------------------------------------
# Bad input: each raises before x is written.


def _bad_inputs():
    """name -> (exception, message regex, edit) where edit(args) -> (bad args, bad kwargs)."""
    def arg(i, fn):  # argument i of (x, y, z, coef) replaced by fn(argument)
        return lambda args: (args[:i] + (fn(args[i]),) + args[i + 1:], {})

    def coef(value):
        return arg(3, lambda c: value(c.device) if callable(value) else value)

    def ones(*shape, dtype=torch.float32):  # a coef of that shape on x's device
        return lambda device: torch.ones(shape, dtype=dtype, device=device)

    def backend(name):
        return lambda args: (args, {"backend": name})

    return {
        "y-shape": (ValueError, "y must have x's shape", arg(1, lambda t: t[:, :-1])),
        "z-shape": (ValueError, "z must have x's shape", arg(2, lambda t: t.reshape(-1))),
        "y-dtype": (TypeError, "y must have x's dtype", arg(1, lambda t: t.double())),
        "y-device": (ValueError, "y must be on x's device", arg(1, lambda t: t.to("meta"))),
        "z-device": (ValueError, "z must be on x's device", arg(2, lambda t: t.to("meta"))),
        "x-int": (TypeError, "x must have a float dtype", arg(0, lambda t: t.to(torch.int32))),
        "x-bool": (TypeError, "x must have a float dtype", arg(0, lambda t: t > 0)),
        "y-int": (TypeError, "y must have a float dtype", arg(1, lambda t: t.to(torch.int64))),
        "z-bool": (TypeError, "z must have a float dtype", arg(2, lambda t: t > 0)),
        "x-expanded": (ValueError, "internally overlapping", arg(0, lambda t: t[:1].expand_as(t))),
        "coef-4": (ValueError, "coef must have shape", coef(ones(4))),
        "coef-B-by-2": (ValueError, "coef must have shape", coef(ones(3, 2))),
        "coef-wrong-B": (ValueError, "coef must have shape", coef(ones(4, 3))),
        "coef-3-by-1": (ValueError, "coef must have shape", coef(ones(3, 1))),
        "coef-int": (TypeError, "coef must be a float tensor", coef(ones(3, dtype=torch.int32))),
        "coef-device": (ValueError, "coef must be on x's", coef(torch.ones(3, device="meta"))),
        "coef-list-2": (TypeError, "sequence of 3 floats", coef([1.0, 2.0])),
        "coef-list-str": (TypeError, "sequence of 3 floats", coef([1.0, 2.0, "3"])),
        "coef-list-bool": (TypeError, "sequence of 3 floats", coef([True, 0.5, 0.5])),
        "coef-none": (TypeError, "sequence of 3 floats", coef(None)),
        "backend-unknown": (ValueError, "backend must be one of", backend("nope")),
        "backend-not-str": (TypeError, "backend must be a string", backend(3)),
        "all-meta": (ValueError, "meta tensors .*no data",
                     lambda args: (tuple(t.to("meta") for t in args), {})),
        "x-sparse": (TypeError, r"x must be a dense \(strided\) tensor, got layout torch.sparse",
                     arg(0, lambda t: t.to_sparse())),
        "z-sparse": (TypeError, r"z must be a dense \(strided\) tensor",
                     arg(2, lambda t: t.to_sparse())),
    }


BAD_INPUTS = _bad_inputs()


def expect_rejected(args, kwargs, exc, match, op, backend):
    """The call raises exc and leaves x, y and z bitwise unchanged."""
    before = [t.clone() for t in args[:3]]
    with pytest.raises(exc, match=match):
        OPS[op](*args, **{"backend": backend, **kwargs})
    for name, t, t0 in zip("xyz", args[:3], before, strict=True):
        if t.device.type != "meta" and t.layout == torch.strided:
            assert_bitwise_equal(t, t0, f"{name} after a rejected call")


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_writing(device, backend, op, case):
    exc, match, edit = BAD_INPUTS[case]
    gen = torch.Generator().manual_seed(3)
    x, y, z = (rand((3, 8), torch.float32, device, gen) for _ in range(3))
    args, kwargs = edit((x, y, z, torch.tensor([0.9, 0.2, 0.3], device=device)))
    expect_rejected(args, kwargs, exc, match, op, backend)


@parametrize_backends
def test_non_tensor_x_raises(device, backend):
    y = torch.zeros(3, device=device)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bk.lincomb3_([0.0, 0.0, 0.0], y, y, COEF_LIST, backend=backend)


ZERO_A_ROWS = [[1.0, 0.1, 0.1], [0.0, 0.2, 0.2], [0.5, 0.3, 0.3]]
# Leading coefficients that are 0 in float32, the compute dtype of the float32 x used below
# (1e-300 is nonzero as a Python float and in float64, and rounds to 0).
ZERO_A = {"list": [0.0, 1.0, 1.0], "list-1e-300": [1e-300, 1.0, 1.0],
          "list-2^-150": [2.0 ** -150, 1.0, 1.0],  # a tie between 0 and 2^-149: to even, 0
          "shared": torch.tensor([0.0, 1.0, 1.0]),
          "shared-float64-1e-300": torch.tensor([1e-300, 1.0, 1.0], dtype=torch.float64),
          "per_sample": torch.tensor(ZERO_A_ROWS)}


@parametrize_cpu_backends  # the check runs only for CPU coef: on a GPU it would cost a sync
@pytest.mark.parametrize("coef", list(ZERO_A.values()), ids=list(ZERO_A))
def test_inverse_zero_leading_coefficient_raises(device, backend, coef):
    gen = torch.Generator().manual_seed(4)
    x, y, z = (rand((3, 8), torch.float32, device, gen) for _ in range(3))
    expect_rejected((x, y, z, coef), {}, ValueError, "must be nonzero", "inverse", backend)
    run_checked("forward", x, y, z, coef, backend)  # a = 0 is fine for the forward op


@parametrize_backends
@pytest.mark.parametrize("coef", [ZERO_A["list"], ZERO_A["list-1e-300"]], ids=["0", "1e-300"])
def test_inverse_zero_leading_coefficient_in_a_list_raises_on_every_device(device, backend, coef):
    """A sequence of floats is checked on the host, before it moves to x's device."""
    gen = torch.Generator().manual_seed(4)
    x, y, z = (rand((3, 8), torch.float32, device, gen) for _ in range(3))
    expect_rejected((x, y, z, coef), {}, ValueError, "must be nonzero", "inverse", backend)


@parametrize_cpu_backends
def test_inverse_tiny_leading_coefficient_is_fine_in_float64(device, backend):
    gen = torch.Generator().manual_seed(4)
    x, y, z = (rand((3, 8), torch.float64, device, gen) for _ in range(3))
    coef = torch.tensor([1e-300, 0.0, 0.0], dtype=torch.float64)
    run_checked("inverse", x, y, z, coef, backend)
    assert torch.isfinite(x).all()  # |x| <= ~4 times 1e300 stays below float64's max


@pytest.mark.parametrize("device,backend", device_params(_unavailable))
@parametrize_ops
def test_unavailable_backend_says_why(device, backend, op):
    x, y, z = (torch.ones(4, device=device) for _ in range(3))
    match = f"backend '{backend}' is not available on {device}: .+"
    expect_rejected((x, y, z, COEF_LIST), {}, bk.BackendUnavailableError, match, op, backend)


def test_triton_on_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1 the triton backend is unavailable on CPU, with the reason."""
    pytest.importorskip("triton")
    code = ("import torch, belm_kernels as bk\n"
            "assert 'triton' not in bk.available_backends('cpu')\n"
            "try:\n"
            "    t = torch.ones(3)\n"
            "    bk.lincomb3_(t, t.clone(), t.clone(), [1., 1., 1.], backend='triton')\n"
            "except bk.BackendUnavailableError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------
# torch.library.opcheck on the registered ops.

OPCHECK_CASES = [  # shape, x dtype, z dtype, coef kind, inverse
    ((7,), torch.float32, torch.float32, "shared", False),
    ((2, 4, 8, 8), torch.bfloat16, torch.float32, "per_sample", True),
    ((3, 1031), torch.float16, torch.bfloat16, "per_sample", False),
    ((5, 3), torch.float64, torch.float64, "shared", True),
]


@parametrize_backends
@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(device, backend, case):
    """belm::lincomb_ (in place) and belm::lincomb (out of place, with its backward: the inputs
    require grad) on the three-term update, running this backend's kernel, and the C++/CUDA op
    itself."""
    shape, dtype, zdtype, coef_kind, inverse = OPCHECK_CASES[case]
    gen = torch.Generator().manual_seed(5)
    x, y = (rand(shape, dtype, device, gen) for _ in range(2))
    z = rand(shape, zdtype, device, gen)
    coef = make_coef(coef_kind, x, gen).to(compute_dtype(dtype)).contiguous()
    torch.library.opcheck(torch.ops.belm.lincomb_, ([x], None, [y, z], coef, inverse, backend))
    grads = [t.clone().requires_grad_() for t in (x, y, z, coef)]
    torch.library.opcheck(torch.ops.belm.lincomb,
                          (grads[0], grads[1:3], grads[3], inverse, backend, None))
    if backend in ("cpu", "cuda"):
        torch.library.opcheck(torch.ops.belm.lincomb_ext, ([x], None, [y, z], coef, inverse))


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True).


@parametrize_backends
def test_torch_compile_fullgraph(device, backend):
    """One compiled function: forward with a per-sample coef tensor and inverse with a list, both
    mutating graph inputs in place; results checked against the reference."""
    torch._dynamo.reset()

    def step(x, x2, y, z, coef):
        bk.lincomb3_(x, y, z, coef, backend=backend)
        bk.lincomb3_inverse_(x2, y, z, COEF_LIST, backend=backend)

    gen = torch.Generator().manual_seed(6)
    x, x2, y = (rand((4, 3, 16), torch.float32, device, gen) for _ in range(3))
    z = rand((4, 3, 16), torch.bfloat16, device, gen)
    coef = make_coef("per_sample", x, gen)
    ref1, scale1 = reference(x, y, z, coef, inverse=False)
    ref2, scale2 = reference(x2, y, z, COEF_LIST, inverse=True)
    torch.compile(step, fullgraph=True)(x, x2, y, z, coef)
    assert_close(x, ref1, scale1, "compiled forward")
    assert_close(x2, ref2, scale2, "compiled inverse")


def _compile_caches_off():
    """In torch 2.13 a compiled function whose run raised for inputs that overlap each other was
    later served, with its synthetic-base wrapper, to disjoint inputs (same process through the
    dynamo cache, another process through the FX-graph / AOT-autograd caches), failing there.
    Compile such graphs apart: a fresh dynamo state and no on-disk caches."""
    torch._dynamo.reset()
    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    stack.callback(torch._dynamo.reset)
    return stack


def _compiled_inverse(backend):
    def inverse(x, y, z, coef):
        bk.lincomb3_inverse_(x, y, z, coef, backend=backend)

    return torch.compile(inverse, fullgraph=True)


@parametrize_backends
def test_torch_compile_keeps_the_overlap_check(device, backend):
    """The checks that need storage run inside the op, at run time, compiled or not: x
    overlapping y by one element (at a block edge of the Triton kernel) raises before x is
    written."""
    gen = torch.Generator().manual_seed(6)
    base = rand((2 * 1024 + 1,), torch.float32, device, gen)
    x, y = base[:1025], base[1024:]
    z = rand((1025,), torch.float32, device, gen)
    before = base.clone()
    match = r"x must not share memory with terms\[0\]"  # y is lincomb_'s terms[0]
    with _compile_caches_off(), pytest.raises(ValueError, match=match):
        _compiled_inverse(backend)(x, y, z, torch.tensor([2.0, 0.5, 0.25], device=device))
    assert_bitwise_equal(base, before, "x and y's storage")


@parametrize_cpu_backends
def test_torch_compile_keeps_the_zero_coefficient_check(device, backend):
    gen = torch.Generator().manual_seed(6)
    x, y, z = (rand((1025,), torch.float32, device, gen) for _ in range(3))
    x0 = x.clone()
    with _compile_caches_off(), pytest.raises(ValueError, match="must be nonzero"):
        _compiled_inverse(backend)(x, y, z, torch.tensor([0.0, 0.5, 0.25]))
    assert_bitwise_equal(x, x0, "x")


# --------------------------------------------------------------------------------------------
# Autograd: the update is linear in x, y, z and coef; gradients must be right on every backend.


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample"])
def test_gradcheck(device, backend, op, coef_kind):
    """Analytical gradients (the registered backward) against finite differences, float64."""
    gen = torch.Generator().manual_seed(8)
    x, y, z = (rand((2, 3), torch.float64, device, gen).requires_grad_() for _ in range(3))
    coef = make_coef(coef_kind, x, gen).requires_grad_()

    def update(x, y, z, coef):
        return OPS[op](x.clone(), y, z, coef, backend=backend)

    assert torch.autograd.gradcheck(update, (x, y, z, coef))


def _reference_grads(op, w, y, z, coef, weight):
    """Gradients of sum(weight * update(w, ...)) by torch's own autograd of the formula in
    float64, and the scale of the coefficient gradients' float32 sums: per coefficient row,
    sum |weight * t| over its elements (t = w, y, z), divided by |a| for the inverse."""
    w, y, z, coef = (t.detach().clone().requires_grad_() for t in (w, y, z, coef))
    a, b, c = coef_columns(coef, w)
    wd, yd, zd = w.double(), y.double(), z.double()
    out = (wd - b * yd - c * zd) / a if op == "inverse" else a * wd + b * yd + c * zd
    (out * weight.double()).sum().backward()
    dims = tuple(range(1 if coef.dim() == 2 else 0, w.dim()))
    first = out if op == "inverse" else wd
    sums = [(weight.double() * t).abs().sum(dim=dims) for t in (first, yd, zd)]
    scale = torch.stack(sums, dim=-1)
    if op == "inverse":
        scale = scale / coef.detach().double()[..., :1].abs()
    return (w.grad, y.grad, z.grad, coef.grad), scale.detach()


@parametrize_backends
@parametrize_ops
@pytest.mark.parametrize("coef_kind", ["shared", "per_sample"])
def test_gradients_of_a_non_leaf_x_mixed_dtypes(device, backend, op, coef_kind):
    """x = w * 1 updated in place (float32, z bfloat16, coef float64): dL/dw is a (not 1), and
    y, z and coef get their gradients, as torch's autograd of the formula gives them.

    Error model (float32 math on coef rounded to float32): dw, dy: at most 8 float32 roundings
    of their value; dz: that plus the rounding to bfloat16; dcoef: a float32 sum of n products,
    (n + 8) * eps32 * (sum of |products|)."""
    gen = torch.Generator().manual_seed(9)
    w, y = (rand((4, 6), torch.float32, device, gen).requires_grad_() for _ in range(2))
    z = rand((4, 6), torch.bfloat16, device, gen).requires_grad_()
    coef = make_coef(coef_kind, w, gen).double().requires_grad_()
    weight = rand((4, 6), torch.float32, device, gen)
    x = w * 1
    OPS[op](x, y, z, coef, backend=backend)
    (x * weight).sum().backward()
    want, scale = _reference_grads(op, w, y, z, coef, weight)
    eps32, eps_z = torch.finfo(torch.float32).eps, torch.finfo(torch.bfloat16).eps
    n = w.numel() // (coef.shape[0] if coef.dim() == 2 else 1)
    tols = (8 * eps32 * want[0].abs(), 8 * eps32 * want[1].abs(),
            (eps_z + 8 * eps32) * want[2].abs(), (n + 8) * eps32 * scale)
    for name, got, ref, tol in zip(("w", "y", "z", "coef"), (w.grad, y.grad, z.grad, coef.grad),
                                   want, tols, strict=True):
        assert got is not None and got.dtype == ref.dtype, name
        err = (got.double() - ref.double()).abs()
        assert (err <= tol.double()).all(), f"{name}: error {err.max():.3g} over the bound"


@parametrize_backends
def test_the_example_of_the_issue(device, backend):
    w = torch.ones(3, device=device, requires_grad=True)
    y = torch.ones(3, device=device, requires_grad=True)
    x = w * 1
    bk.lincomb3_(x, y, torch.ones(3, device=device), [0.5, 2.0, 3.0], backend=backend)
    x.sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 0.5))
    assert torch.equal(y.grad, torch.full_like(y, 2.0))


@parametrize_backends
def test_an_update_in_place_is_seen_by_autograd(device, backend):
    """Every backend marks what it writes as modified in place (the compiled kernels write through
    pointers): a tensor saved for a backward pass and then updated makes that backward fail, as
    with any torch in-place op, instead of giving wrong gradients."""
    w = torch.ones(3, device=device, requires_grad=True)
    x, y, z = (torch.randn(3, device=device) for _ in range(3))
    saved = w * x  # saves x for its backward
    before = x._version
    bk.lincomb3_(x, y, z, [0.5, 0.25, 0.125], backend=backend)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    out = torch.empty(3, device=device)
    before = out._version
    bk.lincomb(y, [z], [0.5, 0.25], out=out, backend=backend)
    assert out._version > before


@parametrize_backends
def test_a_dispatch_mode_sees_the_op_eager_calls_equal_it(device, backend):
    """Eager calls run the op's implementation without its dispatcher round trip, but whatever
    may act on the op -- a dispatch mode here -- still sees belm::lincomb_ called, and both
    ways give the same bits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(5, 7, generator=g).to(device) for _ in range(3))
    coef = torch.tensor([0.5, 0.25, -0.125], device=device)
    eager = bk.lincomb3_(x.clone(), y, z, coef, backend=backend)
    seen = x.clone()
    with Recorder() as rec:
        bk.lincomb3_(seen, y, z, coef, backend=backend)
        out = bk.lincomb(x, [y, z], coef, backend=backend)
    assert rec.ops.count("belm.lincomb_.default") == 2, rec.ops
    assert torch.equal(seen, eager) and torch.equal(out, eager)


@parametrize_backends
@parametrize_ops
def test_leaf_that_requires_grad_raises_before_writing(device, backend, op):
    gen = torch.Generator().manual_seed(10)
    x = rand((3, 8), torch.float32, device, gen).requires_grad_()
    y, z = (rand((3, 8), torch.float32, device, gen) for _ in range(2))
    expect_rejected((x, y, z, COEF_LIST), {}, RuntimeError,
                    "leaf Variable that requires grad", op, backend)
    with torch.no_grad():  # where torch allows it, so does lincomb3_
        ref, scale = reference(x.detach(), y, z, COEF_LIST, op == "inverse")
        run_checked(op, x, y, z, COEF_LIST, backend)
    assert_close(x.detach(), ref, scale, "leaf updated under no_grad")


@parametrize_backends
@parametrize_ops
def test_inference_tensor_outside_inference_mode_raises_before_writing(device, backend, op):
    gen = torch.Generator().manual_seed(11)
    with torch.inference_mode():
        x = rand((3, 8), torch.float32, device, gen)
    y, z = (rand((3, 8), torch.float32, device, gen) for _ in range(2))
    expect_rejected((x, y, z, COEF_LIST), {}, RuntimeError, "inference tensor", op, backend)
    with torch.inference_mode():
        run_checked(op, x, y, z, COEF_LIST, backend)


@parametrize_backends
def test_torch_compile_gradients(device, backend):
    torch._dynamo.reset()

    def step(w, y, z, coef):
        x = w * 1
        bk.lincomb3_(x, y, z, coef, backend=backend)
        bk.lincomb3_inverse_(x, y, z, coef * 2, backend=backend)
        return x

    gen = torch.Generator().manual_seed(12)
    w, y, z = (rand((2, 16), torch.float64, device, gen).requires_grad_() for _ in range(3))
    coef = make_coef("per_sample", w, gen).requires_grad_()
    out = torch.compile(step, fullgraph=True)(w, y, z, coef)
    out.sum().backward()
    grads = [t.grad for t in (w, y, z, coef)]
    for t in (w, y, z, coef):
        t.grad = None
    step(w, y, z, coef).sum().backward()  # eager: checked against gradcheck above
    for name, got, t in zip("wyzc", grads, (w, y, z, coef), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# GPU only.

@parametrize_cuda_backends
@parametrize_ops
def test_cuda_graph_replay_with_new_coef(device, backend, op):
    gen = torch.Generator().manual_seed(7)
    x0, y = (rand((4, 2, 32, 32), torch.float16, device, gen) for _ in range(2))
    z = rand((4, 2, 32, 32), torch.float32, device, gen)
    coef = make_coef("per_sample", x0, gen)
    x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (kernel compilation, autotuning) outside capture
        OPS[op](x, y, z, coef, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS[op](x, y, z, coef, backend=backend)
    for _ in range(2):
        coef.copy_(make_coef("per_sample", x0, gen))
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        ref, scale = reference(x0, y, z, coef, op == "inverse")
        assert_close(x, ref, scale, f"graph replay {backend} {op}")


@parametrize_cuda_backends
@parametrize_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_tensor(device, backend, op, dtype):
    """2M elements: large enough for the Triton backend's autotuned launch path."""
    check_op(device, backend, op, (4, 1 << 19), dtype, torch.float16, "per_sample")


@parametrize_cuda_backends
def test_more_than_2_pow_31_elements(device, backend):
    """64-bit indexing: a per-sample update of 2^31 + 3000 float16 elements (about 13 GB)."""
    if backend == "torch":
        pytest.skip("64-bit indexing concerns the compiled kernels; torch would need ~50 GB here")
    n = 2 ** 31 + 3000
    x = torch.ones((2, n // 2), dtype=torch.float16, device=device)
    y = torch.ones_like(x)
    z = torch.ones_like(x)
    coef = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 0.25]], device=device)
    bk.lincomb3_(x, y, z, coef, backend=backend)
    for row, expected in ((0, 3.0), (1, 2.75)):
        for part in (x[row, :4096], x[row, -4096:]):
            assert torch.all(part == expected), (row, part.unique())
    assert torch.all(x[1] == 2.75).item()
