"""The compiled extensions: the C++ CPU kernel, the CUDA C++ kernel and their loader.

The generic per-backend correctness suite is tests/test_ops.py (it runs on the "cpu" and, with
a GPU, "cuda" backends automatically). This file covers what is particular to the extensions:

* the CPU extension builds, registers its kernel and heads ``available_backends("cpu")``;
* its results are the correctly rounded fused result (exact rational reference), identical
  between its AVX-512, AVX2 and scalar code, between contiguous and strided layouts, and across
  the thread chunks and per-sample rows of a large tensor;
* direct calls through ``torch.ops.belm.lincomb3_ext`` validate their arguments;
* the CUDA kernels' own code (csrc/lincomb3_cuda_kernels.cuh: path planning, coefficient rows,
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
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DNAME = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


def ext_op(x, y, z, coef, inverse=False):
    torch.ops.belm.lincomb3_ext(x, y, z, coef, inverse)
    return x


@pytest.fixture(scope="module")
def cpu_ext():
    reason = extension.get_backend("cpu").unavailable_reason(torch.device("cpu"))
    assert reason is None, f"the CPU extension did not build: {reason}"
    return torch.ops.belm.lincomb3_ext


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


def make_inputs(shape, dtype, zdtype, per_sample, seed=0, inverse=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randn(shape, generator=g).to(dtype)
    z = torch.randn(shape, generator=g).to(zdtype)
    ct = ops.compute_dtype(dtype)
    rows = shape[0] if per_sample else None
    coef = torch.rand((rows, 3) if per_sample else (3,), generator=g, dtype=torch.float64)
    coef = (coef * 1.5 - 0.5).to(ct)
    if inverse:
        coef[..., 0] = coef[..., 0].abs() + 0.25
    return x, y, z, coef


# --------------------------------------------------------------------------------------------
# The CPU extension.


def test_cpu_extension_builds_and_is_preferred(cpu_ext):
    assert bk.available_backends("cpu")[0] == "cpu"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("belm::lincomb3_ext", "CPU")
    assert extension.log_file("cpu").is_file()
    x, y, z, coef = make_inputs((2, 5), torch.float32, torch.float32, False)
    expected = ops.torch_backend
    ref = x.clone()
    expected.run(ref, y, z, coef, False)
    out = bk.lincomb3_(x.clone(), y, z, coef)  # "auto" picks the extension
    torch.testing.assert_close(out, ref)


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


# Exact reference: each operation computed in rationals and rounded once to the compute format.

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


FORMATS = {torch.float32: (24, -126), torch.float64: (53, -1022)}


def exact_reference(x, y, z, coef, inverse):
    """The contract's arithmetic done exactly: compute-dtype roundings after every operation,
    then one rounding to x's dtype."""
    ct = ops.compute_dtype(x.dtype)
    r = lambda q: _round_binary(q, *FORMATS[ct])  # noqa: E731
    out = []
    rows = coef.reshape(-1, 3).tolist()
    per = coef.dim() == 2
    inner = x.numel() // (x.shape[0] if per else 1)
    for i, (xv, yv, zv) in enumerate(zip(x.reshape(-1).tolist(), y.reshape(-1).tolist(),
                                         z.to(ct).reshape(-1).tolist(), strict=True)):
        a, b, c = (Fraction(v) for v in rows[i // inner if per else 0])
        xv, yv, zv = Fraction(xv), Fraction(yv), Fraction(zv)
        if inverse:
            t = r(xv - b * yv)
            t = r(t - c * zv)
            t = r(t / a)
        else:
            t = r(a * xv)
            t = r(b * yv + t)
            t = r(c * zv + t)
        out.append(float(t))
    res = torch.tensor(out, dtype=torch.float64).to(ct)
    return res.to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("zdtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_cpu_is_correctly_rounded(cpu_ext, dtype, zdtype, inverse):
    # 2 rows of 37: the vector body (16 and 8 lanes) and the scalar tail, per-sample rows.
    x, y, z, coef = make_inputs((2, 37), dtype, zdtype, True, seed=1, inverse=inverse)
    # Heavy cancellation in a few lanes: where a non-fused or twice-rounded result differs.
    y[0, :5] = (x[0, :5].to(torch.float64) * 0.999).to(dtype)
    expected = exact_reference(x, y, z, coef, inverse)
    out = ext_op(x.clone(), y, z, coef, inverse)
    assert torch.equal(out, expected), (out - expected).abs().max()


def _bits(t: torch.Tensor) -> np.ndarray:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view).numpy().copy()


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_simd_and_scalar_code_agree_bitwise(cpu_ext, tmp_path, isa):
    """BELM_KERNELS_CPU_ISA caps the kernel's instruction set (scalar loop, AVX2; the default is
    the best available, AVX-512 where there is one); results must be bit-identical (large
    tensors: several threads, per-sample rows, vector bodies and tails)."""
    cases = []
    for i, (dt, zt) in enumerate([(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                  (torch.float32, torch.float16), (torch.float32, torch.float64),
                                  (torch.float64, torch.bfloat16)]):
        for inverse in (False, True):
            x, y, z, coef = make_inputs((3, 70001), dt, zt, True, seed=10 + i, inverse=inverse)
            path = tmp_path / f"case{len(cases)}.pt"
            torch.save({"x": x, "y": y, "z": z, "coef": coef, "inverse": inverse}, path)
            cases.append((path, ext_op(x.clone(), y, z, coef, inverse)))
    code = f"""
        import json, torch
        from belm_kernels import extension
        assert extension.get_backend("cpu").unavailable_reason(torch.device("cpu")) is None
        for i in range({len(cases)}):
            d = torch.load(r"{tmp_path}/case%d.pt" % i)
            torch.ops.belm.lincomb3_ext(d["x"], d["y"], d["z"], d["coef"], d["inverse"])
            torch.save(d["x"], r"{tmp_path}/out%d.pt" % i)
        print(json.dumps({{"ok": True}}))
    """
    run_python(code, env={"BELM_KERNELS_CPU_ISA": isa})
    for i, (_, fast) in enumerate(cases):
        slow = torch.load(tmp_path / f"out{i}.pt")
        np.testing.assert_array_equal(_bits(fast), _bits(slow), err_msg=f"case {i}")


def _layouts(shape, dtype):
    """(name, make) pairs: make(t) returns a tensor equal to t in the named memory layout."""

    def transposed(t):
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def channels_last(t):
        return t.contiguous(memory_format=torch.channels_last)

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

    return [("contiguous", lambda t: t.clone()), ("transposed", transposed),
            ("channels_last", channels_last), ("sliced", sliced), ("unaligned", unaligned)]


@pytest.mark.parametrize("dtype,zdtype", [(torch.float16, torch.float32),
                                          (torch.bfloat16, torch.float16),
                                          (torch.float32, torch.float32),
                                          (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cpu_layouts_match_contiguous_bitwise(cpu_ext, dtype, zdtype, per_sample):
    shape = (3, 4, 9, 21)
    x, y, z, coef = make_inputs(shape, dtype, zdtype, per_sample, seed=3)
    expected = ext_op(x.clone(), y, z, coef)
    for xname, xmake in _layouts(shape, dtype):
        for yname, ymake in _layouts(shape, dtype):
            xs = xmake(x)
            before = xs.clone()
            ext_op(xs, ymake(y), ymake(z), coef)
            assert torch.equal(xs, expected), (xname, yname)
            assert not torch.equal(xs, before)


def test_cpu_large_tensor_row_and_chunk_boundaries(cpu_ext):
    # Rows of an odd length so the thread chunks (parallel_for) split inside rows.
    shape = (5, 200003)
    x, y, z, coef = make_inputs(shape, torch.float32, torch.bfloat16, True, seed=4)
    ref = x.clone()
    ops.torch_backend.run(ref, y, z, coef, False)
    out = ext_op(x.clone(), y, z, coef)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-5)
    # Row by row against single-row calls with the row's coefficients broadcast.
    for i in range(shape[0]):
        row = ext_op(x[i].clone(), y[i], z[i], coef[i].contiguous())
        assert torch.equal(out[i], row)


def test_cpu_coef_any_float_dtype_and_layout(cpu_ext):
    x, y, z, coef = make_inputs((4, 33), torch.float32, torch.float32, True, seed=5)
    expected = ext_op(x.clone(), y, z, coef)
    wide = torch.zeros(4, 6, dtype=torch.float64)
    wide[:, ::2] = coef.double()
    assert torch.equal(ext_op(x.clone(), y, z, wide[:, ::2]), expected)


def test_cpu_empty_and_zero_dim(cpu_ext):
    e = torch.empty(0, 4)
    ext_op(e, e.clone(), e.clone(), torch.ones(3))
    ext_op(e, e.clone(), e.clone(), torch.ones(0, 3))
    x = torch.tensor(2.0)
    ext_op(x, torch.tensor(3.0), torch.tensor(5.0, dtype=torch.float16), torch.tensor([1.0, 2, 3]))
    assert x.item() == 2 + 6 + 15


def _bad_cases():
    x = torch.randn(2, 8)
    ok = dict(x=x, y=torch.randn(2, 8), z=torch.randn(2, 8), coef=torch.ones(3), inverse=False)
    exp = torch.randn(1, 8).expand(2, 8)
    base = torch.randn(32)
    yield "y shape", {**ok, "y": torch.randn(2, 7)}, "y must have x's shape"
    yield "z shape", {**ok, "z": torch.randn(8, 2)}, "z must have x's shape"
    yield "y dtype", {**ok, "y": torch.randn(2, 8, dtype=torch.float64)}, "y must have x's dtype"
    yield "x int", {**ok, "x": torch.ones(2, 8, dtype=torch.int32),
                    "y": torch.ones(2, 8, dtype=torch.int32)}, "x must be float16"
    yield "z int", {**ok, "z": torch.ones(2, 8, dtype=torch.int64)}, "z must be float16"
    yield "coef shape", {**ok, "coef": torch.ones(4)}, "coef must have shape"
    yield "coef rows", {**ok, "coef": torch.ones(3, 3)}, "coef must have shape"
    yield "coef int", {**ok, "coef": torch.ones(3, dtype=torch.int64)}, "coef must be a float"
    yield "x expanded", {**ok, "x": exp}, "more than one element"
    yield "x is y", {**ok, "y": x}, "refer to a single memory location"
    yield "x overlaps z", {**ok, "x": base[:16].view(2, 8), "z": base[8:24].view(2, 8)}, \
        "single memory location"
    yield "coef in x", {**ok, "coef": x[0, :3]}, "single memory location"


BAD_CASES = list(_bad_cases())


@pytest.mark.parametrize("name,kwargs,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_cpu_direct_call_validates(cpu_ext, name, kwargs, match):
    x = kwargs["x"]
    before = x.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.belm.lincomb3_ext(kwargs["x"], kwargs["y"], kwargs["z"], kwargs["coef"],
                                    kwargs["inverse"])
    assert torch.equal(x, before)


def test_cpu_raw_inverse_with_zero_leading_coefficient_gives_inf(cpu_ext):
    # Not a memory-safety matter: the raw op computes (x - b*y - c*z) / 0 like the CUDA kernel;
    # the public functions reject it where coef is on the CPU (tests/test_ops.py).
    x = torch.ones(2, 8)
    ext_op(x, torch.zeros(2, 8), torch.zeros(2, 8), torch.tensor([0.0, 1, 1]), inverse=True)
    assert torch.isinf(x).all()


def test_cpu_op_passes_opcheck(cpu_ext):
    x, y, z, coef = make_inputs((2, 3, 8), torch.float32, torch.float16, True, seed=6)
    torch.library.opcheck(torch.ops.belm.lincomb3_ext.default, (x, y, z, coef, False))
    torch.library.opcheck(torch.ops.belm.lincomb3_ext.default, (x, y, z, coef.abs() + 1, True))


# --------------------------------------------------------------------------------------------
# CUDA sources: nvcc compiles them here; their kernels run on the host.


HARNESS = r"""
// Host-only driver: runs belm_cuda's planning and per-element/per-pack kernel code on the CPU.
#include "lincomb3_cuda_kernels.cuh"
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
static int esize(int t) { return t == 0 || t == 1 ? 2 : t == 2 ? 4 : 8; }

int main(int argc, char** argv) {
  for (int c = 1; c < argc; ++c) {
    std::string dir = argv[c];
    std::ifstream meta(dir + "/meta.txt");
    int xt, zt, per_sample, inverse, ndim;
    meta >> xt >> zt >> per_sample >> inverse >> ndim;
    std::vector<int64_t> sizes(ndim), sx(ndim), sy(ndim), sz(ndim);
    for (auto& v : sizes) meta >> v;
    for (auto& v : sx) meta >> v;
    for (auto& v : sy) meta >> v;
    for (auto& v : sz) meta >> v;
    int64_t ox, oy, oz;
    meta >> ox >> oy >> oz;
    std::vector<char> xb = read_file(dir + "/x.bin"), yb = read_file(dir + "/y.bin"),
                      zb = read_file(dir + "/z.bin"), cb = read_file(dir + "/coef.bin");
    char *xp = aligned_copy(xb), *yp = aligned_copy(yb), *zp = aligned_copy(zb),
         *cp = aligned_copy(cb);
    Problem pr{};
    pr.xt = static_cast<DType>(xt);
    pr.zt = static_cast<DType>(zt);
    pr.x = xp + ox * esize(xt);
    pr.y = yp + oy * esize(xt);
    pr.z = zp + oz * esize(zt);
    pr.coef = cp;
    pr.per_sample = per_sample;
    pr.inverse = inverse;
    const char* err = plan(&pr, ndim, sizes.data(), sx.data(), sy.data(), sz.data());
    std::ofstream res(dir + "/result.txt");
    if (err) {
      res << "error " << err << "\n";
      continue;
    }
    run_on_host(pr);
    const char* path = pr.path == Path::kRowsVec ? "rows_vec" : pr.path == Path::kRows ? "rows"
                                                                                      : "strided";
    res << "ok path=" << path << " ndim=" << pr.layout.ndim << " rows=" << pr.rows
        << " inner=" << pr.inner << "\n";
    std::ofstream(dir + "/x_out.bin", std::ios::binary).write(xp, xb.size());
  }
  return 0;
}
"""

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


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
    """cases: list of (x, y, z, coef, inverse, offsets). Returns per case (result line, x buffer
    after the host run, x buffer after the CPU extension)."""
    dirs, expected = [], []
    for k, (x, y, z, coef, inverse, offs) in enumerate(cases):
        d = tmp_path / f"case{k}"
        d.mkdir()
        bufs = []
        for t, off, name in ((x, offs[0], "x"), (y, offs[1], "y"), (z, offs[2], "z")):
            buf, view = _storage_view(t, off)
            bufs.append((buf, view))
            (d / f"{name}.bin").write_bytes(_bits(buf).tobytes())
        (d / "coef.bin").write_bytes(coef.contiguous().numpy().tobytes())
        meta = [DTYPE_CODE[x.dtype], DTYPE_CODE[z.dtype], int(coef.dim() == 2), int(inverse),
                x.dim(), *x.shape, *bufs[0][1].stride(), *bufs[1][1].stride(),
                *bufs[2][1].stride(), *offs]
        (d / "meta.txt").write_text(" ".join(map(str, meta)))
        xbuf = bufs[0][0].clone()
        xview = xbuf.as_strided(x.shape, bufs[0][1].stride(), offs[0])
        ext_op(xview, bufs[1][1], bufs[2][1], coef, inverse)
        expected.append(xbuf)
        dirs.append(str(d))
    proc = subprocess.run([str(exe), *dirs], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = []
    for d, xbuf in zip(dirs, expected, strict=True):
        line = Path(d, "result.txt").read_text().strip()
        out = None
        if line.startswith("ok"):
            raw = np.frombuffer(Path(d, "x_out.bin").read_bytes(), dtype=_bits(xbuf).dtype)
            out = raw.copy()
        results.append((line, out, _bits(xbuf)))
    return results


def _cuda_cases():
    """(id, shape, x/y/z layouts, offsets, per_sample, expected path)."""
    yield "aligned", (3, 37), ("c", "c", "c"), (0, 0, 0), False, "path=rows_vec rows=1"
    # Per-sample rows of 2056 elements: at least 256 packs for every dtype, a whole number of
    # packs (8, 4 or 2 elements), so no tail; 2051 breaks the packs.
    yield "long_rows", (3, 2056), ("c", "c", "c"), (0, 0, 0), True, "path=rows_vec rows=3"
    yield "long_rows_not_pack_multiple", (3, 2051), ("c", "c", "c"), (0, 0, 0), True, \
        "path=rows rows=3 inner=2051"
    yield "long_rows_unaligned_z", (2, 2056), ("c", "c", "c"), (0, 0, 3), True, "path=rows rows=2"
    yield "short_rows", (4, 64), ("c", "c", "c"), (0, 0, 0), True, "path=strided ndim=1"
    yield "unaligned_x", (2, 45), ("c", "c", "c"), (1, 0, 0), False, "path=rows rows=1"
    yield "transposed_x", (6, 10), ("t", "c", "c"), (0, 0, 0), True, "path=strided ndim=2"
    yield "strided_yz", (2, 3, 4, 5), ("c", "t", "s"), (0, 2, 1), True, "path=strided"
    # NHWC strides (60, 1, 15, 3): W merges into H, C stays apart -> 3 dimensions.
    yield "channels_last", (2, 3, 4, 5), ("cl", "cl", "cl"), (0, 0, 0), True, \
        "path=strided ndim=3"
    yield "one_element", (1,), ("c", "c", "c"), (0, 0, 0), False, "path=rows_vec"
    yield "zero_dim", (), ("c", "c", "c"), (0, 0, 0), False, "path=rows_vec"


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


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("zdtype", DTYPES, ids=DNAME.get)
def test_cuda_kernel_code_on_host_matches_cpu_extension(cpu_ext, cuda_host_harness, tmp_path,
                                                        dtype, zdtype):
    cases, ids = [], []
    for case_id, shape, layouts, offs, per_sample, path in _cuda_cases():
        for inverse in (False, True):
            x, y, z, coef = make_inputs(shape, dtype, zdtype, per_sample and len(shape) > 0,
                                        seed=len(cases), inverse=inverse)
            x, y, z = (_layout(t, k) for t, k in zip((x, y, z), layouts, strict=True))
            cases.append((x, y, z, coef, inverse, offs))
            ids.append((case_id, inverse, path))
    for (case_id, inverse, path), (line, out, expected) in zip(
            ids, _run_harness(cuda_host_harness, tmp_path, cases), strict=True):
        assert line.startswith("ok"), (case_id, line)
        for part in path.split():
            assert part in line, (case_id, line)
        np.testing.assert_array_equal(out, expected, err_msg=f"{case_id} inverse={inverse}")


def test_cuda_plan_rejects_too_many_strided_dims(cpu_ext, cuda_host_harness, tmp_path):
    shape = (2,) * 9
    x, y, z, coef = make_inputs(shape, torch.float32, torch.float32, False)
    x = x.permute(*reversed(range(9))).contiguous().permute(*reversed(range(9)))
    ok = x[..., :1]  # the size-1 dimension is dropped: 8 strided dimensions remain
    results = _run_harness(cuda_host_harness, tmp_path, [
        (x, y, z, coef, False, (0, 0, 0)),
        (ok, y[..., :1].contiguous(), z[..., :1].contiguous(), coef, False, (0, 0, 0))])
    assert results[0][0].startswith("error") and "at most 8 strided" in results[0][0]
    assert results[1][0].startswith("ok path=strided ndim=8"), results[1][0]
    np.testing.assert_array_equal(results[1][1], results[1][2])


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
    src = broken / "lincomb3_cpu.cpp"
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
    return torch.ops.belm.lincomb3_ext


@pytest.mark.gpu
def test_cuda_extension_loads_and_is_preferred(cuda_ext):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("belm::lincomb3_ext", "CUDA")
    assert bk.available_backends("cuda")[0] == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("zdtype", DTYPES, ids=DNAME.get)
def test_cuda_matches_cpu_extension_bitwise(cpu_ext, cuda_ext, dtype, zdtype):
    for case_id, shape, layouts, offs, per_sample, _ in _cuda_cases():
        for inverse in (False, True):
            x, y, z, coef = make_inputs(shape, dtype, zdtype, per_sample and len(shape) > 0,
                                        seed=7, inverse=inverse)
            x, y, z = (_layout(t, k) for t, k in zip((x, y, z), layouts, strict=True))
            bufs = [_storage_view(t, o) for t, o in zip((x, y, z), offs, strict=True)]
            expected = ext_op(bufs[0][1].clone(), bufs[1][1], bufs[2][1], coef, inverse)
            gbufs = [b.cuda() for b, _ in bufs]
            gviews = [g.as_strided(v.shape, v.stride(), o)
                      for g, (_, v), o in zip(gbufs, bufs, offs, strict=True)]
            ext_op(gviews[0], gviews[1], gviews[2], coef.cuda(), inverse)
            torch.cuda.synchronize()
            assert torch.equal(gviews[0].cpu(), expected), (case_id, inverse)
            # The whole buffer: x's view updated, nothing outside it written.
            view = bufs[0][1]
            expected_buf = bufs[0][0].clone()
            expected_buf.as_strided(view.shape, view.stride(), offs[0]).copy_(expected)
            assert torch.equal(gbufs[0].cpu(), expected_buf), (case_id, inverse)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,inner", [(7, 3 * 2 ** 20), (7, 3 * 2 ** 20 + 5), (70001, 2048),
                                        (70001, 24)],
                         ids=["vector_rows", "scalar_rows", "more_rows_than_grid_y", "short_rows"])
def test_cuda_large_and_many_rows(cpu_ext, cuda_ext, rows, inner):
    # Long rows a multiple of the pack length take the vector kernel, others the scalar one;
    # more than 65535 rows make the blocks stride over rows; short rows go the strided way.
    x, y, z, coef = make_inputs((rows, inner), torch.bfloat16, torch.float32, True)
    expected = ext_op(x.clone(), y, z, coef)
    out = ext_op(x.cuda(), y.cuda(), z.cuda(), coef.cuda()).cpu()
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_graph_replays_with_new_coefficients(cuda_ext, per_sample):
    x0, y, z, coef = make_inputs((4, 4096), torch.float16, torch.float32, per_sample, seed=8)
    x, y, z, coef = x0.cuda(), y.cuda(), z.cuda(), coef.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        bk.lincomb3_(x.clone(), y, z, coef, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bk.lincomb3_(x, y, z, coef, backend="cuda")
    for step in range(3):
        new = torch.rand_like(coef) + 0.5
        coef.copy_(new)
        x.copy_(x0.cuda())
        graph.replay()
        torch.cuda.synchronize()
        expected = ext_op(x0.clone(), y.cpu(), z.cpu(), new.cpu())
        assert torch.equal(x.cpu(), expected), step
