"""The compiled extensions: the C++ CPU kernel, the CUDA C++ kernel and their loader.

The generic per-backend correctness suites are tests/test_ops.py and tests/test_lincomb.py (they
run on the "cpu" and, with a GPU, "cuda" backends automatically). This file covers what is
particular to the extensions' op ``belm::lincomb_ext(out, x, terms, coef, inverse)``:

* the CPU extension builds, registers its kernel and heads ``available_backends("cpu")``;
* its results are the correctly rounded fused result (exact rational reference), for 1 to 6
  terms and 1 to 3 outputs, each operand in its own dtype; identical between its AVX-512, AVX2
  and scalar code (for operands of one dtype, of one dtype but the last term, and of any mix),
  between contiguous and strided layouts, and across the thread chunks and per-sample rows of a
  large tensor;
* direct calls through ``torch.ops.belm.lincomb_ext`` validate their arguments;
* the CUDA kernels' own code (csrc/lincomb_cuda_kernels.cuh: path planning, coefficient rows,
  128-bit packs, tails, strided offsets, roundings) run on the host gives bit-identical results
  to the CPU extension, so the CUDA arithmetic is checked without a GPU (compiled by nvcc: without
  nvcc these tests skip, and fail where BELM_KERNELS_REQUIRE_NVCC=1, as in CI); what nvcc makes
  of the device code for sm_80/sm_90 is tests/test_codegen.py's;
* the fallback: a failed build warns once, "auto" still works through torch, an explicit
  backend="cpu" raises BackendUnavailableError naming the build log (in subprocesses, since the
  load-once state is per process);
* bad input to the loader, each with one warning naming cause and fix and no hang: a broken or
  missing compiler, no ninja, a read-only or full build cache, the stale lock of a killed build,
  another process building (wait for it, or give up after BELM_KERNELS_BUILD_TIMEOUT), an
  ahead-of-time wheel without the CUDA kernel on a CUDA machine (tests/test_packaging.py covers
  the prebuilt library itself);
* on a GPU machine: the CUDA extension loads, matches the CPU extension bit for bit, and a
  captured CUDA graph replays with new coefficient values (skipped without a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from test_codegen import CPP_EXTENSION_NVCC_FLAGS

import belm_kernels as bk
from belm_kernels import extension, ops

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)
DNAME = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}


def ext_op(out, x, terms, coef, inverse=False):
    """The raw op; returns the outputs."""
    torch.ops.belm.lincomb_ext(out, x, terms, coef, inverse)
    return out


def signature_id(x_dtype, term_dtypes, out_dtypes) -> str:
    outs = "in_place" if out_dtypes is None else ".".join(DNAME[d] for d in out_dtypes)
    return f"x_{DNAME[x_dtype]}-t_{'.'.join(DNAME[d] for d in term_dtypes)}-o_{outs}"


def make_operands(shape, x_dtype, term_dtypes, out_dtypes, per_sample, seed=0, inverse=False):
    """(out, x, terms, coef) of the raw op. out_dtypes None: the in-place update (out = [x], x
    None); else new outputs filled with NaN. coef in the compute dtype, (M, K+1) or (B, M, K+1),
    leading coefficients away from 0 for the inverse."""
    g = torch.Generator().manual_seed(seed)

    def rand(dtype):
        return torch.randn(shape, generator=g).to(dtype)

    x = rand(x_dtype)
    terms = [rand(d) for d in term_dtypes]
    m = 1 if out_dtypes is None else len(out_dtypes)
    rows = (shape[0],) if per_sample else ()
    coef = torch.rand(rows + (m, len(terms) + 1), generator=g, dtype=torch.float64) * 1.5 - 0.5
    if inverse:
        coef[..., 0] = coef[..., 0].abs() + 0.25
    coef = coef.to(ops.compute_dtype(x_dtype))
    if out_dtypes is None:
        return [x], None, terms, coef
    return [torch.full(shape, float("nan"), dtype=d) for d in out_dtypes], x, terms, coef


def run_clone(out, x, terms, coef, inverse=False):
    """The raw op on copies of the outputs (the in-place x included); returns them."""
    return ext_op([o.clone() for o in out], x, terms, coef, inverse)


@pytest.fixture(scope="module")
def cpu_ext():
    reason = extension.get_backend("cpu").unavailable_reason(torch.device("cpu"))
    assert reason is None, f"the CPU extension did not build: {reason}"
    return torch.ops.belm.lincomb_ext


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``code`` in a fresh interpreter (the extension state is per process); returns the
    JSON object it prints on its last line."""
    return run_python_with_stderr(code, env, timeout)[0]


def run_python_with_stderr(code: str, env: dict[str, str] | None = None, timeout: int = 600,
                           prefix: tuple[str, ...] = ()) -> tuple[dict, str]:
    """run_python, also returning the subprocess's stderr; ``prefix`` goes before the
    interpreter on the command line (e.g. ``unshare ...``)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BELM_KERNELS_")}
    full_env.update(env or {})
    proc = subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=str(REPO))
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _bits(t: torch.Tensor) -> np.ndarray:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view).numpy().copy()


def assert_bits_equal(got, want, what=""):
    assert len(got) == len(want), what
    for m, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, m)
        np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=f"{what} output {m}")


# --------------------------------------------------------------------------------------------
# The CPU extension.


def test_cpu_extension_builds_and_is_preferred(cpu_ext):
    assert bk.available_backends("cpu")[0] == "cpu"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("belm::lincomb_ext", "CPU")
    assert extension.log_file("cpu").is_file()
    out, _, terms, coef = make_operands((2, 5), F32, (F32, F16), None, False)
    expected = run_clone(out, None, terms, coef)[0]
    got = bk.lincomb3_(out[0].clone(), *terms, coef[0])  # "auto" picks the extension
    assert torch.equal(got, expected)


def test_build_reports_per_extension():
    result = extension.build(verbose=False)
    assert set(result) == {"cpu", "cuda"}
    assert result["cpu"] is None
    if torch.version.cuda is None:
        assert "CPU build" in result["cuda"]
    elif HAS_CUDA:
        assert result["cuda"] is None


def test_cuda_backend_says_why_not_on_this_machine():
    reason = extension.get_backend("cuda").unavailable_reason(torch.device("cuda"))
    if torch.version.cuda is None:
        assert "CPU build" in reason
    elif not HAS_CUDA:
        assert "no CUDA device" in reason
    assert "cpu tensors only" in extension.get_backend("cpu").unavailable_reason(
        torch.device("cuda"))
    assert "cuda tensors only" in extension.get_backend("cuda").unavailable_reason(
        torch.device("cpu"))


# Exact reference: each operation computed in rationals and rounded once to the compute format,
# each output rounded once from it to its own format.

def _round_binary(q: Fraction, mant_bits: int, min_exp: int) -> Fraction:
    """q rounded to nearest-even with mant_bits significant bits, min_exp the exponent of the
    smallest normal (subnormals keep that exponent's spacing). No overflow handling."""
    if q == 0:
        return Fraction(0)
    sign = -1 if q < 0 else 1
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, min_exp)
    ulp = Fraction(2) ** (e - mant_bits + 1)
    m = a / ulp
    fl = m.numerator // m.denominator
    rem = m - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        fl += 1
    return sign * fl * ulp


FORMATS = {F16: (11, -14), BF16: (8, -126), F32: (24, -126), F64: (53, -1022)}


def exact_reference(out_dtypes, first, terms, coef, inverse):
    """The contract's arithmetic done exactly: inputs rounded to the compute dtype (float64 terms
    of float32 math to nearest even), compute-dtype roundings after every operation, then one
    rounding to each output's dtype."""
    ct = ops.compute_dtype(first.dtype)
    r = lambda q: _round_binary(q, *FORMATS[ct])  # noqa: E731
    n_in, m_out = len(terms) + 1, len(out_dtypes)
    table = coef.double().reshape(-1, m_out, n_in).tolist()
    inner = first.numel() // len(table)
    inputs = [t.to(ct).reshape(-1).tolist() for t in (first, *terms)]
    values = [[] for _ in out_dtypes]
    for i, elements in enumerate(zip(*inputs, strict=True)):
        v = [Fraction(e) for e in elements]
        for m, dtype in enumerate(out_dtypes):
            c = [Fraction(e) for e in table[i // inner][m]]
            if inverse:
                acc = v[0]
                for cj, tj in zip(c[1:], v[1:], strict=True):
                    acc = r(acc - cj * tj)
                acc = r(acc / c[0])
            else:
                acc = r(c[0] * v[0])
                for cj, tj in zip(c[1:], v[1:], strict=True):
                    acc = r(cj * tj + acc)
            values[m].append(float(_round_binary(acc, *FORMATS[dtype])))
    # Every value is representable in its dtype: the conversions below are exact.
    return [torch.tensor(v, dtype=torch.float64).to(d).reshape(first.shape)
            for v, d in zip(values, out_dtypes, strict=True)]


# Signatures (x dtype, term dtypes, output dtypes; None: in place): the three-term update for
# every (x, last term) pair, then more terms, more outputs and their dtypes.
THREE_TERM = [(x, (x, z), None) for x in DTYPES for z in DTYPES]
MORE = [(F32, (F16,), None), (BF16, (F32, BF16, F64), None),
        (F32, (F32, F16, BF16, F64, F32, F16), None), (F64, (F16, F32, BF16, F64, F16, F32), None),
        (F32, (F16, F32), (F32, BF16)), (F16, (F16, F64, BF16), (F16, F32, F64)),
        (F64, (F32, F16), (F16, BF16, F32)), (BF16, (BF16,) * 6, (BF16, BF16, BF16))]
SIGNATURES = THREE_TERM + MORE


def _params(signatures):
    return [pytest.param(*s, id=signature_id(*s)) for s in signatures]


@pytest.mark.parametrize("x_dtype,term_dtypes,out_dtypes", _params(SIGNATURES))
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_cpu_is_correctly_rounded(cpu_ext, x_dtype, term_dtypes, out_dtypes, inverse):
    # 2 rows of 37: the vector bodies (16 and 8 lanes) and the scalar tails, per-sample rows.
    out, x, terms, coef = make_operands((2, 37), x_dtype, term_dtypes, out_dtypes, True, seed=1,
                                        inverse=inverse)
    first = out[0] if x is None else x
    # Heavy cancellation in a few lanes: where a non-fused or twice-rounded result differs.
    terms[0][0, :5] = (first[0, :5].double() * 0.999).to(terms[0].dtype)
    expected = exact_reference([o.dtype for o in out], first, terms, coef, inverse)
    assert_bits_equal(run_clone(out, x, terms, coef, inverse), expected)


def test_cpu_rounds_float64_results_once_to_16_bits(cpu_ext):
    """float64 math into float16/bfloat16 outputs: values just above a tie between two 16-bit
    numbers, which a rounding to float32 first would make the tie (and round to even). One
    correct rounding is expected, by the vector and the scalar code (40 elements)."""
    x = torch.tensor([1 + 2.0 ** -11 + 2.0 ** -40, 1 + 2.0 ** -8 + 2.0 ** -40] * 20, dtype=F64)
    terms = [torch.zeros(40, dtype=F64)]
    coef = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)  # both outputs: x, exactly
    out = ext_op([torch.empty(40, dtype=F16), torch.empty(40, dtype=BF16)], x, terms, coef)
    once = [torch.tensor([1 + 2.0 ** -10, 1 + 2.0 ** -8] * 20, dtype=F16),
            torch.tensor([1.0, 1 + 2.0 ** -7] * 20, dtype=BF16)]
    twice = [x.float().to(F16), x.float().to(BF16)]
    for got, want, wrong in zip(out, once, twice, strict=True):
        assert torch.equal(got, want) and not torch.equal(got, wrong)
    assert_bits_equal(out, exact_reference([F16, BF16], x, terms, coef, False))


# Signatures for the bit-for-bit comparisons between code paths: one dtype everywhere, one dtype
# but the last term (the two kinds with dtypes fixed at compile time), and mixes (read at run
# time), float64 math into 16-bit outputs among them.
PATH_SIGNATURES = [(F32, (F32, F32), None), (BF16, (BF16, BF16), None), (F16, (F16, F32), None),
                   (F32, (F32, F16), None), (F64, (F64, BF16), None),
                   (F32, (F16, BF16, F64), (F32, BF16)), (F64, (F32, F16), (F64, F16, BF16)),
                   (F16, (F16,) * 6, (F16, F16, F16))]


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_simd_and_scalar_code_agree_bitwise(cpu_ext, tmp_path, isa):
    """BELM_KERNELS_CPU_ISA caps the kernel's instruction set (scalar loop, AVX2; the default is
    the best available, AVX-512 where there is one); results must be bit-identical (large
    tensors: several threads, per-sample rows, vector bodies and tails)."""
    cases = []
    for i, signature in enumerate(PATH_SIGNATURES):
        for inverse in (False, True) if signature[2] is None else (False,):
            operands = make_operands((3, 70001), *signature, True, seed=10 + i, inverse=inverse)
            path = tmp_path / f"case{len(cases)}.pt"
            torch.save({"operands": operands, "inverse": inverse}, path)
            cases.append(run_clone(*operands, inverse))
    code = f"""
        import json, torch
        from belm_kernels import extension
        assert extension.get_backend("cpu").unavailable_reason(torch.device("cpu")) is None
        for i in range({len(cases)}):
            d = torch.load(r"{tmp_path}/case%d.pt" % i)
            out, x, terms, coef = d["operands"]
            torch.ops.belm.lincomb_ext(out, x, terms, coef, d["inverse"])
            torch.save(out, r"{tmp_path}/out%d.pt" % i)
        print(json.dumps({{"ok": True}}))
    """
    run_python(code, env={"BELM_KERNELS_CPU_ISA": isa})
    for i, fast in enumerate(cases):
        assert_bits_equal(torch.load(tmp_path / f"out{i}.pt"), fast, f"case {i}")


def _layouts():
    """name -> make(t): a tensor equal to t in the named memory layout."""

    def transposed(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def sliced(t):
        big = torch.zeros(t.shape[:-1] + (t.shape[-1] * 2,), dtype=t.dtype)
        view = big[..., ::2]
        view.copy_(t)
        return view

    def unaligned(t):
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    return {"contiguous": lambda t: t.clone(), "transposed": transposed,
            "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
            "sliced": sliced, "unaligned": unaligned}


@pytest.mark.parametrize("x_dtype,term_dtypes,out_dtypes",
                         _params([PATH_SIGNATURES[i] for i in (0, 2, 5, 6)]))
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cpu_layouts_match_contiguous_bitwise(cpu_ext, x_dtype, term_dtypes, out_dtypes,
                                              per_sample):
    """Every operand group (x, the terms, the outputs) in every layout: the strided path
    (TensorIterator, its dense inner runs on the vector code) gives the contiguous bits, and
    writes nothing outside the outputs' views."""
    out, x, terms, coef = make_operands((3, 4, 9, 21), x_dtype, term_dtypes, out_dtypes,
                                        per_sample, seed=3)
    expected = run_clone(out, x, terms, coef)
    layouts = _layouts()
    for xname, xmake in layouts.items():
        for tname, tmake in layouts.items():
            # The outputs in the terms' layout; in place, x's layout is the output's.
            got = [xmake(o) if x is None else tmake(o) for o in out]
            ext_op(got, None if x is None else xmake(x), [tmake(t) for t in terms], coef)
            assert_bits_equal(got, expected, f"x {xname}, terms/outputs {tname}")


def test_cpu_strided_output_writes_only_its_view(cpu_ext):
    out, x, terms, coef = make_operands((6, 33), F32, (F16, F32), (F32, BF16), True, seed=4)
    expected = run_clone(out, x, terms, coef)
    bases = [torch.full((12, 33), 7.0, dtype=o.dtype) for o in out]
    ext_op([b[::2] for b in bases], x, terms, coef)
    for b, e in zip(bases, expected, strict=True):
        assert_bits_equal([b[::2]], [e])
        assert (b[1::2] == 7).all()


def test_cpu_large_tensor_row_and_chunk_boundaries(cpu_ext):
    # Rows of an odd length so the thread chunks (parallel_for) split inside rows.
    shape = (5, 200003)
    out, x, terms, coef = make_operands(shape, F32, (BF16, F32), (F32, F16), True, seed=4)
    got = run_clone(out, x, terms, coef)
    # Row by row against single-row calls with the row's coefficients shared.
    for i in range(shape[0]):
        row = ext_op([o[i].clone() for o in out], x[i], [t[i] for t in terms],
                     coef[i].contiguous())
        assert_bits_equal([g[i] for g in got], row, f"row {i}")


def test_cpu_coef_any_float_dtype_and_layout(cpu_ext):
    out, x, terms, coef = make_operands((4, 33), F32, (F32, F16), (F32, F32), True, seed=5)
    expected = run_clone(out, x, terms, coef)
    wide = torch.zeros(4, 2, 6, dtype=F64)
    wide[..., ::2] = coef.double()
    assert_bits_equal(run_clone(out, x, terms, wide[..., ::2]), expected)
    # Size-1 dimensions may be left out: (B, K+1) for one output, (K+1,) shared.
    out1, x1, terms1, coef1 = make_operands((4, 33), F32, (F16,), None, True, seed=6)
    assert_bits_equal(run_clone(out1, x1, terms1, coef1[:, 0]),
                      run_clone(out1, x1, terms1, coef1))
    assert_bits_equal(run_clone(out1, x1, terms1, coef1[0, 0]),
                      run_clone(out1, x1, terms1, coef1[:1].expand(4, 1, 2).contiguous()))


def test_cpu_empty_and_zero_dim(cpu_ext):
    e = torch.empty(0, 4)
    ext_op([e], None, [e.clone(), e.clone()], torch.ones(3))
    ext_op([e.clone(), e.clone()], e, [e.clone()], torch.ones(0, 2, 2))
    x = torch.tensor(2.0)
    out = [torch.tensor(0.0), torch.tensor(0.0, dtype=F16)]
    ext_op(out, x, [torch.tensor(3.0), torch.tensor(5.0, dtype=F16)],
           torch.tensor([[1.0, 2, 3], [0.5, 0, 1]]))
    assert out[0].item() == 2 + 6 + 15 and out[1].item() == 1 + 5


def _bad_cases():
    """(name, call(), message regex): each raises before anything is written."""
    x, y, z = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    o = torch.randn(2, 8)
    c2 = torch.ones(3)
    exp = torch.randn(1, 8).expand(2, 8)
    base = torch.randn(32)
    int16 = torch.ones(2, 8, dtype=torch.int16)
    yield "no outputs", lambda: ext_op([], x, [y], torch.ones(2)), "out must hold 1 to 3"
    yield "four outputs", lambda: ext_op([o] * 4, x, [y], torch.ones(4, 2)), "out must hold 1 to 3"
    yield "no terms", lambda: ext_op([o], x, [], torch.ones(1)), "terms must hold 1 to 6"
    yield "seven terms", lambda: ext_op([o], x, [y] * 7, torch.ones(8)), "terms must hold 1 to 6"
    yield "term shape", lambda: ext_op([x], None, [y, torch.randn(2, 7)], c2), \
        r"terms\[1\] must have x's shape"
    yield "out shape", lambda: ext_op([o, torch.randn(8, 2)], x, [y], torch.ones(2, 2)), \
        r"out\[1\] must have x's shape"
    yield "x int", lambda: ext_op([int16], None, [y, z], c2), r"out\[0\] \(x, updated in " \
        r"place\) must be float16"
    yield "term int", lambda: ext_op([x], None, [y, int16], c2), r"terms\[1\] must be float16"
    yield "out int", lambda: ext_op([int16], x, [y], torch.ones(2)), r"out\[0\] must be float16"
    yield "coef shape", lambda: ext_op([x], None, [y, z], torch.ones(4)), "coef must hold"
    yield "coef rows", lambda: ext_op([x], None, [y, z], torch.ones(3, 3)), "coef must hold"
    yield "coef per output", lambda: ext_op([o, o.clone()], x, [y, z], c2), "coef must hold"
    yield "coef int", lambda: ext_op([x], None, [y, z], torch.ones(3, dtype=torch.int64)), \
        "coef must be a float"
    yield "x expanded", lambda: ext_op([exp], None, [y, z], c2), "more than one element"
    yield "out expanded", lambda: ext_op([exp], x, [y], torch.ones(2)), "more than one element"
    yield "x is a term", lambda: ext_op([x], None, [x, z], c2), "single memory location"
    yield "out overlaps a term", lambda: ext_op([base[:16].view(2, 8)], x,
                                                [base[8:24].view(2, 8)], torch.ones(2)), \
        "single memory location"
    yield "out is x", lambda: ext_op([x], x, [y], torch.ones(2)), "single memory location"
    yield "outputs overlap", lambda: ext_op([o, o], x, [y], torch.ones(2, 2)), \
        "single memory location"
    yield "coef in out", lambda: ext_op([x], None, [y, z], x[0, :3]), "single memory location"


BAD_CASES = list(_bad_cases())


@pytest.mark.parametrize("name,call,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_cpu_direct_call_validates(cpu_ext, name, call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_cpu_direct_call_writes_nothing_before_failing(cpu_ext):
    """The checks run before any write: a call whose second output is bad leaves the first and
    the in-place x untouched."""
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    first, x0 = torch.randn(2, 8), x.clone()
    kept = first.clone()
    with pytest.raises(RuntimeError, match=r"out\[1\] must have x's shape"):
        ext_op([first, torch.randn(8, 2)], x, [y], torch.ones(2, 2))
    with pytest.raises(RuntimeError, match=r"terms\[1\] must be float16"):
        ext_op([x], None, [y, torch.ones(2, 8, dtype=torch.int32)], torch.ones(3))
    assert torch.equal(first, kept) and torch.equal(x, x0)


def test_cpu_raw_inverse_with_zero_leading_coefficient_gives_inf(cpu_ext):
    # Not a memory-safety matter: the raw op computes (x - b*y - c*z) / 0 like the CUDA kernel;
    # the public functions reject it where coef is on the CPU (tests/test_ops.py).
    x = torch.ones(2, 8)
    ext_op([x], None, [torch.zeros(2, 8), torch.zeros(2, 8)], torch.tensor([0.0, 1, 1]),
           inverse=True)
    assert torch.isinf(x).all()


def test_cpu_op_passes_opcheck(cpu_ext):
    out, x, terms, coef = make_operands((2, 3, 8), F32, (F16, F32, BF16), (F32, BF16), True,
                                        seed=6)
    torch.library.opcheck(torch.ops.belm.lincomb_ext.default, (out, x, terms, coef, False))
    out, x, terms, coef = make_operands((2, 3, 8), F32, (F16,), None, True, seed=7, inverse=True)
    torch.library.opcheck(torch.ops.belm.lincomb_ext.default, (out, x, terms, coef, True))


# --------------------------------------------------------------------------------------------
# CUDA sources: nvcc compiles them here; their kernels run on the host.


HARNESS = r"""
// Host-only driver: runs belm_cuda's planning and per-element/per-pack kernel code on the CPU.
// Per case directory: meta.txt, one buffer file per operand (in<j>.bin, out<m>.bin; in place:
// out 0 is in 0) and coef.bin; writes result.txt and out<m>_result.bin.
#include "lincomb_cuda_kernels.cuh"
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>
using namespace belm_cuda;

static std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
static char* aligned_copy(const std::vector<char>& v) {
  size_t n = (v.size() + 64) / 64 * 64;
  char* p = static_cast<char*>(std::aligned_alloc(64, n));
  std::copy(v.begin(), v.end(), p);
  return p;
}

int main(int argc, char** argv) {
  for (int c = 1; c < argc; ++c) {
    std::string dir = argv[c];
    std::ifstream meta(dir + "/meta.txt");
    int nin, nout, per_sample, inverse, in_place, ndim;
    meta >> nin >> nout >> per_sample >> inverse >> in_place >> ndim;
    const int nops = nin + nout;
    std::vector<int> dt(nops);
    for (auto& v : dt) meta >> v;
    std::vector<int64_t> sizes(ndim), strides(static_cast<size_t>(nops) * ndim), offs(nops);
    for (auto& v : sizes) meta >> v;
    for (auto& v : strides) meta >> v;
    for (auto& v : offs) meta >> v;
    std::vector<std::vector<char>> files(nops);
    std::vector<char*> bufs(nops);
    for (int k = 0; k < nops; ++k) {
      if (in_place && k == nin) {  // out 0 is x
        bufs[k] = bufs[0];
        continue;
      }
      files[k] = read_file(dir + (k < nin ? "/in" + std::to_string(k)
                                          : "/out" + std::to_string(k - nin)) + ".bin");
      bufs[k] = aligned_copy(files[k]);
    }
    char* cp = aligned_copy(read_file(dir + "/coef.bin"));
    Problem pr{};
    pr.ops.nin = nin;
    pr.nout = nout;
    pr.ct = dt[0] == 3 ? DType::kDouble : DType::kFloat;
    pr.coef = cp;
    pr.per_sample = per_sample;
    pr.inverse = inverse;
    std::vector<const int64_t*> slot_strides(kMaxOperands, nullptr);
    for (int k = 0; k < nops; ++k) {
      const DType t = static_cast<DType>(dt[k]);
      char* p = bufs[k] + offs[k] * dtype_size(t);
      const int slot = k < nin ? k : output_slot(k - nin);
      slot_strides[slot] = strides.data() + static_cast<size_t>(k) * ndim;
      if (k < nin) {
        pr.ops.in[k] = p;
        pr.ops.in_t[k] = t;
      } else {
        pr.ops.out[k - nin] = p;
        pr.ops.out_t[k - nin] = t;
      }
    }
    const char* err = plan(&pr, ndim, sizes.data(), slot_strides.data());
    std::ofstream res(dir + "/result.txt");
    if (err) {
      res << "error " << err << "\n";
      continue;
    }
    run_on_host(pr);
    const char* path = pr.path == Path::kRowsVec ? "rows_vec" : pr.path == Path::kRows ? "rows"
                                                                                      : "strided";
    res << "ok path=" << path << " ndim=" << pr.layout.ndim << " rows=" << pr.rows
        << " inner=" << pr.inner << " pack=" << pr.pack << "\n";
    for (int m = 0; m < nout; ++m) {
      const int k = nin + m;
      const size_t size = in_place && m == 0 ? files[0].size() : files[k].size();
      std::ofstream(dir + "/out" + std::to_string(m) + "_result.bin", std::ios::binary)
          .write(bufs[k], size);
    }
  }
  return 0;
}
"""

DTYPE_CODE = {F16: 0, BF16: 1, F32: 2, F64: 3}


@pytest.fixture(scope="module")
def cuda_host_harness(nvcc, tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_harness")
    (d / "harness.cu").write_text(HARNESS)
    exe = d / "harness"
    cmd = [nvcc, "-std=c++17", "-O1", "-arch=sm_80", *CPP_EXTENSION_NVCC_FLAGS,
           f"-I{CSRC}", str(d / "harness.cu"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return exe


def _storage_view(t: torch.Tensor, offset_elems: int = 0):
    """A copy of t living at element offset offset_elems of a fresh 1-D buffer, with t's strides
    (as a strided view of its own buffer); returns (buffer, view)."""
    reach = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    span = 1 + reach if t.numel() else 0
    buf = torch.zeros(offset_elems + max(span, 1), dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), offset_elems)
    view.copy_(t)
    return buf, view


def _run_harness(exe, tmp_path, cases):
    """cases: (out, x, terms, coef, inverse, offsets) with offsets[k] the element offset of
    operand k (inputs x/out[0], terms..., then outputs) in a fresh buffer of its own. Returns per
    case (result line, output buffers after the host run, output buffers after the CPU
    extension on the same layout)."""
    dirs, expected = [], []
    for n, (out, x, terms, coef, inverse, offsets) in enumerate(cases):
        d = tmp_path / f"case{n}"
        d.mkdir()
        in_place = x is None
        inputs = [out[0] if in_place else x, *terms]
        operands = inputs + out
        views = {}
        for k, t in enumerate(operands):
            if in_place and k == len(inputs):
                views[k] = views[0]
                continue
            buf, view = _storage_view(t, offsets[k])
            views[k] = (buf, view)
            name = f"in{k}" if k < len(inputs) else f"out{k - len(inputs)}"
            (d / f"{name}.bin").write_bytes(_bits(buf).tobytes())
        (d / "coef.bin").write_bytes(coef.contiguous().numpy().tobytes())
        first = views[0][1]
        per_sample = coef.numel() > len(out) * len(inputs)
        meta = [len(inputs), len(out), int(per_sample), int(inverse), int(in_place), first.dim(),
                *(DTYPE_CODE[t.dtype] for t in operands), *first.shape,
                *(s for k in range(len(operands)) for s in views[k][1].stride()), *offsets]
        (d / "meta.txt").write_text(" ".join(map(str, meta)))
        # The CPU extension on copies of the same buffers and views.
        bufs = [views[k][0].clone() for k in range(len(operands))]
        if in_place:
            bufs[len(inputs)] = bufs[0]
        as_view = [b.as_strided(views[k][1].shape, views[k][1].stride(), offsets[k])
                   for k, b in enumerate(bufs)]
        ext_op(as_view[len(inputs):], None if in_place else as_view[0],
               as_view[1:len(inputs)], coef, inverse)
        expected.append([_bits(b) for b in bufs[len(inputs):]])
        dirs.append(str(d))
    proc = subprocess.run([str(exe), *dirs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = []
    for d, want in zip(dirs, expected, strict=True):
        line = Path(d, "result.txt").read_text().strip()
        got = None
        if line.startswith("ok"):
            got = [np.frombuffer(Path(d, f"out{m}_result.bin").read_bytes(), dtype=w.dtype)
                   for m, w in enumerate(want)]
        results.append((line, got, want))
    return results


def _cuda_cases():
    """(id, shape, layouts of x / terms / outputs, offsets of x / first term / first output,
    per_sample, expected path)."""
    c = ("c", "c", "c")
    yield "aligned", (3, 37), c, (0, 0, 0), False, "path=rows_vec rows=1"
    # Per-sample rows of 2056 elements: at least 256 packs for every pack length, a whole number
    # of packs (8, 4 or 2 elements), so no tail; 2051 breaks the packs.
    yield "long_rows", (3, 2056), c, (0, 0, 0), True, "path=rows_vec rows=3"
    yield "long_rows_not_pack_multiple", (3, 2051), c, (0, 0, 0), True, \
        "path=rows rows=3 inner=2051"
    yield "long_rows_unaligned_term", (2, 2056), c, (0, 3, 0), True, "path=rows rows=2"
    yield "short_rows", (4, 64), c, (0, 0, 0), True, "path=strided ndim=1"
    yield "unaligned_x", (2, 45), c, (1, 0, 0), False, "path=rows rows=1"
    yield "unaligned_output", (2, 45), c, (0, 0, 5), False, "path=rows rows=1"
    yield "transposed_x", (6, 10), ("t", "c", "c"), (0, 0, 0), True, "path=strided ndim=2"
    yield "strided_terms", (2, 3, 4, 5), ("c", "t", "s"), (0, 2, 1), True, "path=strided"
    yield "sliced_outputs", (2, 3, 4, 5), ("c", "c", "s"), (0, 0, 0), False, "path=strided"
    # NHWC strides (60, 1, 15, 3): W merges into H, C stays apart -> 3 dimensions.
    yield "channels_last", (2, 3, 4, 5), ("cl", "cl", "cl"), (0, 0, 0), True, \
        "path=strided ndim=3"
    yield "one_element", (1,), c, (0, 0, 0), False, "path=rows_vec"
    yield "zero_dim", (), c, (0, 0, 0), False, "path=rows_vec"


# Cases about the outputs' own layout (in place, the output is x).
OUTPUT_CASES = {"unaligned_output", "sliced_outputs"}


def _layout(t, kind):
    if kind == "t":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "s":  # every other element of a wider last dimension
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t.contiguous()


def _laid_out(operands, layouts, offsets_of_groups):
    """The operands of a case in its layouts, and every operand's buffer offset."""
    out, x, terms, coef = operands
    lx, lt, lo = layouts
    ox, ot, oo = offsets_of_groups
    if x is None:  # in place: x's layout and offset are out[0]'s
        out = [_layout(out[0], lx)]
        terms = [_layout(t, lt) for t in terms]
        offsets = [ox] + [ot if k == 0 else 0 for k in range(len(terms))] + [ox]
        return (out, None, terms, coef), offsets
    x = _layout(x, lx)
    terms = [_layout(t, lt) for t in terms]
    out = [_layout(o, lo) for o in out]
    offsets = ([ox] + [ot if k == 0 else 0 for k in range(len(terms))]
               + [oo if m == 0 else 0 for m in range(len(out))])
    return (out, x, terms, coef), offsets


# The harness signatures: every three-term pair, more terms, more outputs (float64 math into
# 16-bit outputs among them: packs of 8 doubles).
HARNESS_SIGNATURES = THREE_TERM + [MORE[i] for i in (2, 3, 4, 5, 6)]


@pytest.mark.parametrize("x_dtype,term_dtypes,out_dtypes", _params(HARNESS_SIGNATURES))
def test_cuda_kernel_code_on_host_matches_cpu_extension(cpu_ext, cuda_host_harness, tmp_path,
                                                        x_dtype, term_dtypes, out_dtypes):
    cases, ids = [], []
    for case_id, shape, layouts, offsets, per_sample, path in _cuda_cases():
        if out_dtypes is None and case_id in OUTPUT_CASES:
            continue
        for inverse in (False, True) if out_dtypes is None else (False,):
            operands = make_operands(shape, x_dtype, term_dtypes, out_dtypes,
                                     per_sample and len(shape) > 0, seed=len(cases),
                                     inverse=inverse)
            (out, x, terms, coef), offs = _laid_out(operands, layouts, offsets)
            cases.append((out, x, terms, coef, inverse, offs))
            ids.append((case_id, inverse, path))
    for (case_id, inverse, path), (line, got, want) in zip(
            ids, _run_harness(cuda_host_harness, tmp_path, cases), strict=True):
        assert line.startswith("ok"), (case_id, line)
        for part in path.split():
            assert part in line, (case_id, line)
        for m, (g, w) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_array_equal(g, w, err_msg=f"{case_id} inverse={inverse} out {m}")


def test_cuda_plan_pack_length(cpu_ext, cuda_host_harness, tmp_path):
    """P is 16 bytes of the narrowest of x and the outputs, whatever the terms."""
    cases = []
    for signature in [(F32, (F16,), None), (F64, (F16,), None), (F16, (F64,), None),
                      (F64, (F32,), (F64, F32)), (F32, (F64,), (F64, BF16))]:
        operands = make_operands((2, 64), *signature, False)
        cases.append((*operands, False, [0] * (len(operands[2]) + 1 + len(operands[0]))))
    lines = [line for line, _, _ in _run_harness(cuda_host_harness, tmp_path, cases)]
    assert [line.split("pack=")[1] for line in lines] == ["4", "2", "8", "4", "8"], lines


def test_cuda_plan_rejects_too_many_strided_dims(cpu_ext, cuda_host_harness, tmp_path):
    shape = (2,) * 9
    out, _, terms, coef = make_operands(shape, F32, (F32, F32), None, False)
    x = out[0].permute(*reversed(range(9))).contiguous().permute(*reversed(range(9)))
    ok = x[..., :1]  # the size-1 dimension is dropped: 8 strided dimensions remain
    results = _run_harness(cuda_host_harness, tmp_path, [
        ([x], None, terms, coef, False, [0, 0, 0, 0]),
        ([ok], None, [t[..., :1].contiguous() for t in terms], coef, False, [0, 0, 0, 0])])
    assert results[0][0].startswith("error") and "at most 8 strided" in results[0][0]
    assert results[1][0].startswith("ok path=strided ndim=8"), results[1][0]
    np.testing.assert_array_equal(results[1][1][0], results[1][2][0])


# --------------------------------------------------------------------------------------------
# Fallback paths and bad input to the loader (subprocesses: the load-once state is per process).
# Each must give one warning naming the cause and the fix, keep "auto" working through torch,
# make an explicit backend="cpu" raise with the reason, and never hang (every subprocess runs
# under a timeout).


FALLBACK_SCRIPT = """
    import json, warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import belm_kernels as bk
        from belm_kernels import extension
        listed = bk.available_backends("cpu")
        listed_again = bk.available_backends("cpu")
        x, y, z = torch.randn(2, 9), torch.randn(2, 9), torch.randn(2, 9)
        ref = 0.5 * x + 0.25 * y - 2.0 * z
        out = bk.lincomb3_(x.clone(), y, z, [0.5, 0.25, -2.0])   # "auto"
        error = None
        try:
            bk.lincomb3_(x.clone(), y, z, [0.5, 0.25, -2.0], backend="cpu")
        except bk.BackendUnavailableError as exc:
            error = str(exc)
        build = extension.build(verbose=False)
    ours = [str(w.message) for w in caught if "belm_kernels" in str(w.message)]
    print(json.dumps({"listed": listed, "listed_again": listed_again,
                      "auto_ok": bool(torch.allclose(out, ref, atol=1e-5)), "error": error,
                      "warnings": ours, "log": str(extension.log_file("cpu")),
                      "origin": extension.origin("cpu"), "build": build}))
"""
COMPILING = "compiling the cpu extension"


def assert_falls_back(result, *cause):
    """The cpu backend is unavailable, "auto" works, and the one warning, the error of an
    explicit request and build() all carry the same reason, which contains every ``cause``."""
    assert "cpu" not in result["listed"] and "torch" in result["listed"]
    assert result["listed_again"] == result["listed"]
    assert result["auto_ok"]
    assert len(result["warnings"]) == 1, result["warnings"]
    reason = result["build"]["cpu"]
    assert reason is not None and reason in result["warnings"][0] and reason in result["error"]
    for text in cause:
        assert text in reason, (text, reason)


def test_build_failure_warns_once_and_falls_back(tmp_path):
    broken = tmp_path / "csrc"
    shutil.copytree(CSRC, broken)
    src = broken / "lincomb_cpu.cpp"
    src.write_text(src.read_text() + "\n#error deliberately broken for the fallback test\n")
    result, stderr = run_python_with_stderr(
        FALLBACK_SCRIPT, env={"BELM_KERNELS_CSRC_DIR": str(broken),
                              "BELM_KERNELS_BUILD_DIR": str(tmp_path / "b")})
    assert_falls_back(result, "building the cpu extension failed", "build log", result["log"])
    assert "deliberately broken" in Path(result["log"]).read_text()
    # The JIT build announced itself once, with its log, before the compiler's silent minute.
    notices = [line for line in stderr.splitlines() if COMPILING in line]
    assert len(notices) == 1 and result["log"] in notices[0], stderr


def test_disabled_by_environment():
    result = run_python(FALLBACK_SCRIPT, env={"BELM_KERNELS_NO_EXTENSION": "1"})
    assert "cpu" not in result["listed"]
    assert result["auto_ok"]
    assert result["warnings"] == []
    assert "BELM_KERNELS_NO_EXTENSION" in result["error"]


def test_missing_sources_say_so(tmp_path):
    result = run_python(FALLBACK_SCRIPT, env={"BELM_KERNELS_CSRC_DIR": str(tmp_path / "none"),
                                              "BELM_KERNELS_BUILD_DIR": str(tmp_path / "b")})
    assert_falls_back(result, "sources not found", "BELM_KERNELS_CSRC_DIR")


@pytest.mark.parametrize("case", ["CXX=/bin/false", "no compiler on PATH", "no ninja"])
def test_broken_toolchain_says_which_and_how_to_fix(tmp_path, case):
    bin_dir = str(Path(sys.executable).parent)  # python and the ninja package, no compiler
    assert shutil.which("c++", path=bin_dir) is None
    env = {"BELM_KERNELS_BUILD_DIR": str(tmp_path / "b"),
           **{"CXX=/bin/false": {"CXX": "/bin/false"},
              "no compiler on PATH": {"PATH": bin_dir},
              "no ninja": {"PATH": str(tmp_path / "empty")}}[case]}
    result, stderr = run_python_with_stderr(FALLBACK_SCRIPT, env=env, timeout=120)
    expected = {"CXX=/bin/false": ("/bin/false does not work", "set CXX"),
                "no compiler on PATH": ("'c++' was not found", "set CXX"),
                "no ninja": ("ninja is not installed", "pip install ninja")}[case]
    assert_falls_back(result, *expected)
    assert COMPILING not in stderr  # a build that cannot start is not announced


def _private_tmpfs(options: str) -> tuple[str, ...]:
    """Command prefix that mounts a tmpfs with ``options`` on $BELM_KERNELS_BUILD_DIR in a
    private mount namespace (gone with the process), or skips where that is not allowed."""
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs -o "$0" tmpfs "$BELM_KERNELS_BUILD_DIR" && exec "$@"', options)
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30,
                           env={**os.environ, "BELM_KERNELS_BUILD_DIR": "/mnt"}) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("simulating this file system needs `unshare --mount` and tmpfs mounts "
                    "(root or CAP_SYS_ADMIN)")
    return prefix


def test_read_only_build_cache_says_so(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes through permission bits: mount a read-only file system
        prefix = _private_tmpfs("ro")
    else:
        cache.chmod(0o555)
    result, _ = run_python_with_stderr(FALLBACK_SCRIPT, env={"BELM_KERNELS_BUILD_DIR": str(cache)},
                                       timeout=120, prefix=prefix)
    assert_falls_back(result, "is not writable", "BELM_KERNELS_BUILD_DIR")


def test_full_build_cache_says_so(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    result, stderr = run_python_with_stderr(
        FALLBACK_SCRIPT, env={"BELM_KERNELS_BUILD_DIR": str(cache)}, timeout=120,
        prefix=_private_tmpfs("size=16k"))
    assert_falls_back(result, "is full", "free some space", "BELM_KERNELS_BUILD_DIR")
    assert COMPILING not in stderr


@pytest.fixture
def built_cache(cpu_ext, tmp_path):
    """A copy of this session's CPU build directory, as BELM_KERNELS_BUILD_DIR would hold it:
    (the root to point BELM_KERNELS_BUILD_DIR at, the extension's directory in it)."""
    root = tmp_path / "cache"
    directory = root / extension.build_dir("cpu").name
    shutil.copytree(extension.build_dir("cpu"), directory)
    return root, directory


def test_stale_torch_lock_of_a_killed_build_does_not_hang(built_cache):
    # A build killed mid-way leaves torch's lock file behind, and torch waits for it to vanish
    # forever. The next process must remove it (it holds our flock, so nobody else is building).
    root, directory = built_cache
    (directory / "lock").touch()
    result, stderr = run_python_with_stderr(
        FALLBACK_SCRIPT, env={"BELM_KERNELS_BUILD_DIR": str(root)}, timeout=120)
    assert result["listed"][0] == "cpu" and result["warnings"] == []
    assert result["origin"].startswith(f"built just in time in {directory}")
    assert not (directory / "lock").exists()
    assert "left behind by an interrupted build" in (directory / "build.log").read_text()
    assert COMPILING not in stderr  # the cached library was up to date


def _hold_build_lock(directory: Path):
    """Take the build lock of ``directory`` as another building process would (pid 4242)."""
    import fcntl

    handle = open(directory / "belm.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("4242\n")
    handle.flush()
    return handle


def test_waits_for_another_process_building_then_loads(built_cache):
    root, directory = built_cache
    handle = _hold_build_lock(directory)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FALLBACK_SCRIPT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO), env={**os.environ, "BELM_KERNELS_BUILD_DIR": str(root)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("waiting for another process (pid 4242)" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, f"no wait: {lines}"
            time.sleep(0.1)
    finally:
        handle.close()  # the other process is done: ours goes on
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, lines
    result = json.loads(out.strip().splitlines()[-1])
    assert result["listed"][0] == "cpu" and result["warnings"] == []


def test_gives_up_waiting_for_a_hung_build_with_a_clear_reason(built_cache):
    root, directory = built_cache
    with _hold_build_lock(directory):
        started = time.monotonic()
        result = run_python(FALLBACK_SCRIPT, timeout=120, env={
            "BELM_KERNELS_BUILD_DIR": str(root), "BELM_KERNELS_BUILD_TIMEOUT": "1"})
        took = time.monotonic() - started
    assert_falls_back(result, "another process (pid 4242)", "BELM_KERNELS_BUILD_TIMEOUT")
    assert took < 60


@pytest.mark.slow  # about one CPU build (30-60 s on two shared cores): the real scenario
def test_killed_build_then_two_processes_at_once(tmp_path):
    """The issue's scenario end to end: a build is SIGKILLed while torch's lock file exists;
    then two processes start at once. Neither hangs: one compiles (once), the other waits for
    it, and both load the library."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BELM_KERNELS_")},
           "BELM_KERNELS_BUILD_DIR": str(tmp_path / "cache")}
    directory = tmp_path / "cache" / extension.build_dir("cpu").name

    def start():
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(FALLBACK_SCRIPT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=str(REPO), env=env, start_new_session=True)

    def wait_for(condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    killed = start()
    wait_for(lambda: (directory / "lock").exists(), "torch's lock file")
    os.killpg(killed.pid, signal.SIGKILL)  # the whole group: python, ninja and the compiler
    killed.communicate()
    assert (directory / "lock").exists()  # left behind: this used to hang every later process

    first = start()
    lock = directory / "belm.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid),
             "the first build to start")
    second = start()  # while the first one builds
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    for proc, (out, err) in zip((first, second), outputs, strict=True):
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["listed"][0] == "cpu" and result["warnings"] == [], (result, err)
    assert COMPILING in outputs[0][1] and COMPILING not in outputs[1][1]
    assert f"waiting for another process (pid {first.pid})" in outputs[1][1]


def test_cuda_wheel_without_cuda_kernel_on_a_cuda_machine_says_why(monkeypatch):
    """An ahead-of-time wheel built where torch had no CUDA, installed on a CUDA machine without
    a CUDA toolkit: the cuda backend is unavailable with one warning naming both causes and
    both fixes. Simulated in process: the CUDA checks and the package's build record are
    patched; nothing is loaded."""
    from torch.utils import cpp_extension

    info = {"torch": torch.__version__, "torch_cuda": None, "built": {"cpu": "x.so"},
            "skipped": {"cuda": "torch 2.13.0+cpu is a CPU build"}}
    monkeypatch.delenv("BELM_KERNELS_NO_EXTENSION", raising=False)
    monkeypatch.setattr(extension, "_results", {})
    monkeypatch.setattr(extension, "_prebuilt_info", lambda: info)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.warns(RuntimeWarning) as caught:
        reason = extension._load("cuda")
    assert len(caught) == 1 and reason in str(caught[0].message)
    for text in ("built ahead of time without the cuda kernel", "CPU build",
                 "BELM_KERNELS_AOT=1", "CUDA toolkit (nvcc) was not found", "CUDA_HOME"):
        assert text in reason, (text, reason)
    assert extension._load("cuda") == reason  # once per process


# --------------------------------------------------------------------------------------------
# GPU only.


@pytest.fixture(scope="module")
def cuda_ext():
    if not HAS_CUDA:
        pytest.skip(NO_CUDA)
    reason = extension.get_backend("cuda").unavailable_reason(torch.device("cuda"))
    assert reason is None, f"the CUDA extension did not build: {reason}"
    return torch.ops.belm.lincomb_ext


@pytest.mark.gpu
def test_cuda_extension_loads_and_is_preferred(cuda_ext):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("belm::lincomb_ext", "CUDA")
    assert bk.available_backends("cuda")[0] == "cuda"


def _placed(out, x, terms, offsets, device):
    """The operands copied into fresh buffers on ``device`` with their layouts and buffer
    offsets (in place: out[0] is x); returns (out views, x view or None, term views, output
    buffers)."""
    in_place = x is None
    inputs = [out[0] if in_place else x, *terms]
    views, buffers = [], []
    for k, t in enumerate(inputs + out):
        if in_place and k == len(inputs):
            views.append(views[0])
            buffers.append(buffers[0])
            continue
        buf, view = _storage_view(t, offsets[k])
        buf = buf.to(device)
        buffers.append(buf)
        views.append(buf.as_strided(view.shape, view.stride(), offsets[k]))
    n = len(inputs)
    return views[n:], None if in_place else views[0], views[1:n], buffers[n:]


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,term_dtypes,out_dtypes", _params(HARNESS_SIGNATURES))
def test_cuda_matches_cpu_extension_bitwise(cpu_ext, cuda_ext, x_dtype, term_dtypes, out_dtypes):
    for case_id, shape, layouts, offsets, per_sample, _ in _cuda_cases():
        if out_dtypes is None and case_id in OUTPUT_CASES:
            continue
        for inverse in (False, True) if out_dtypes is None else (False,):
            operands = make_operands(shape, x_dtype, term_dtypes, out_dtypes,
                                     per_sample and len(shape) > 0, seed=7, inverse=inverse)
            (out, x, terms, coef), offs = _laid_out(operands, layouts, offsets)
            c_out, c_x, c_terms, c_bufs = _placed(out, x, terms, offs, "cpu")
            ext_op(c_out, c_x, c_terms, coef, inverse)
            g_out, g_x, g_terms, g_bufs = _placed(out, x, terms, offs, "cuda")
            ext_op(g_out, g_x, g_terms, coef.cuda(), inverse)
            torch.cuda.synchronize()
            # The whole buffers: the views updated, nothing outside them written.
            assert_bits_equal([b.cpu() for b in g_bufs], c_bufs, f"{case_id} {inverse}")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inner", [(7, 3 * 2 ** 20), (7, 3 * 2 ** 20 + 5), (70001, 2048),
                                        (70001, 24)],
                         ids=["vector_rows", "scalar_rows", "more_rows_than_grid_y", "short_rows"])
@pytest.mark.parametrize("x_dtype,term_dtypes,out_dtypes",
                         _params([(BF16, (BF16, F32), None), (F32, (F16, BF16, F32),
                                                              (F32, BF16, F64))]))
def test_cuda_large_and_many_rows(cpu_ext, cuda_ext, rows, inner, x_dtype, term_dtypes,
                                  out_dtypes):
    # Long rows a multiple of the pack length take the vector kernel, others the scalar one;
    # more than 65535 rows make the blocks stride over rows; short rows go the strided way.
    out, x, terms, coef = make_operands((rows, inner), x_dtype, term_dtypes, out_dtypes, True)
    expected = run_clone(out, x, terms, coef)
    got = ext_op([o.cuda() for o in out], None if x is None else x.cuda(),
                 [t.cuda() for t in terms], coef.cuda())
    assert_bits_equal([g.cpu() for g in got], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_graph_replays_with_new_coefficients(cuda_ext, per_sample):
    """The in-place three-term update and a two-output update, captured once, replayed with new
    coefficient values written into coef."""
    in_place = make_operands((4, 4096), F16, (F16, F32), None, per_sample, seed=8)
    two = make_operands((4, 4096), F32, (F16, F32), (F32, BF16), per_sample, seed=9)
    x0 = in_place[0][0]
    g_x, g_two = x0.cuda(), [o.cuda() for o in two[0]]
    g_terms = [[t.cuda() for t in in_place[2]], [t.cuda() for t in two[2]]]
    g_coef = [in_place[3].cuda(), two[3].cuda()]
    g_src = two[1].cuda()

    def step():
        bk.lincomb_(g_x, g_terms[0], g_coef[0][..., 0, :], backend="cuda")
        bk.lincomb(g_src, g_terms[1], g_coef[1], out=g_two, backend="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        new = [torch.rand_like(c) + 0.5 for c in g_coef]
        for c, n in zip(g_coef, new, strict=True):
            c.copy_(n)
        g_x.copy_(x0.cuda())
        graph.replay()
        torch.cuda.synchronize()
        want = run_clone([x0], None, in_place[2], new[0].cpu())
        assert_bits_equal([g_x.cpu()], want, f"in place, replay {replay}")
        want = run_clone(two[0], two[1], two[2], new[1].cpu())
        assert_bits_equal([o.cpu() for o in g_two], want, f"two outputs, replay {replay}")
