"""The GPU code, compiled for its real targets (sm_80, sm_90) on a machine without a GPU.

Triton. Every launch variant of ``belm_kernels.triton_kernels._lincomb3_kernel`` is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with the signature,
constexprs and pointer-alignment attributes Triton's launcher gives it at run time (checked
against Triton's own specialisation of real tensors where that private API is importable). This
runs in one subprocess with TRITON_INTERPRET=0, since tests/conftest.py switches the interpreter
on for the rest of the suite and an interpreted kernel has no compiler; the results are cached
per session. The variants (pruned: every kind of variant is compiled somewhere, the heavy and the
representative ones on both archs):

* every (x dtype, z dtype) pair, both directions, with the default launch configuration, for a
  shared coef and per-sample rows of at least 4096 elements (a program per block of a row),
  on both archs, and for shorter per-sample rows (a row lookup per lane) on sm_90;
* every autotuning configuration of each x dtype (shared and long rows are tuned), on sm_90 with
  z of x's dtype and with the z that costs the most registers in both directions, on sm_80 that
  heaviest corner (inverse, long rows, the heaviest z);
* unaligned pointers (Triton's other specialisation, correct with narrower accesses) for a few.

On each: compiles; the mask-free body's global accesses are exactly the expected vectors (128
bits for x and y, 16 bytes' worth of x's elements for z, e.g. 64 bits of float16 next to a
float32 x) plus the coefficient loads (aligned variants); the inverse divides with ``div.rn``
(never the approximate ``div.full``/``div.approx``) and the forward multiplies with ``mul.rn`` (no
contraction); every tensor of pointers is offset by 64-bit integers (TTIR); no local memory, no
stack (spills), no shared memory (no layout conversion), and at most MAX_REGISTERS registers.

CUDA C++. ``csrc/lincomb3_cuda.cu`` is compiled once by nvcc for both archs (without nvcc these
tests skip, and fail where BELM_KERNELS_REQUIRE_NVCC=1, as in CI); ptxas reports no spills for
any kernel, and the SASS (Triton's bundled cuobjdump) of every vector (rows) kernel keeps its
128-bit LDG/STG for x and y, the matching width for z, and no local loads/stores.

``python bench/codegen.py`` writes the per-variant tables (registers, access widths) to
bench/results/codegen_sm80_sm90.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16", "float32", "float64")
SIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
# A bound, not a target (the variants need 30 to 88, the most: float64 x with short rows, three
# float64 coefficients gathered per element): at 96 registers 21 warps per SM stay resident,
# plenty for a streaming kernel with 16 bytes or more in flight per tensor and thread.
MAX_REGISTERS = 96


def compute_dtype(x: str) -> str:
    return "float64" if x == "float64" else "float32"


# --------------------------------------------------------------------------------------------
# Triton variants.


@dataclasses.dataclass(frozen=True)
class Variant:
    arch: int
    x: str
    z: str
    inverse: bool
    rows: str  # the ROWS constexpr: "shared", "long" or "short"
    block: int
    warps: int
    aligned: bool = True  # x, y and z 16-byte aligned: Triton's pointer specialisation

    @property
    def id(self) -> str:
        return (f"sm{self.arch}-{self.x}-z_{self.z}-{'inverse' if self.inverse else 'forward'}-"
                f"{self.rows}-{self.block}x{self.warps}w"
                f"{'' if self.aligned else '-unaligned'}")

    @property
    def vector(self) -> int:  # elements of x in 16 bytes
        return 16 // SIZE[self.x]

    @property
    def per_thread(self) -> int:  # elements of x, y, z per thread and program
        return self.block // (32 * self.warps)


def _autotune_configs(x: str, z: str) -> list[tuple[int, int]]:
    import torch

    from belm_kernels import triton_kernels

    return triton_kernels.autotune_configs(getattr(torch, x), getattr(torch, z))


def triton_variants() -> list[Variant]:
    from belm_kernels.triton_kernels import DEFAULT_CONFIG

    found: dict[str, Variant] = {}

    def add(v: Variant) -> None:
        found.setdefault(v.id, v)

    def heaviest_z(x: str) -> str:  # the most registers: the widest z (float16 next to float64)
        return "float16" if x == "float64" else "float64"

    for arch in ARCHS:
        for x in DTYPES:
            for z in DTYPES:
                for inverse in (False, True):
                    # short rows (a gather per lane, arch-independent code) on sm_90 only
                    for rows in ("shared", "long") + (("short",) if arch == 90 else ()):
                        add(Variant(arch, x, z, inverse, rows, *DEFAULT_CONFIG))
            # Autotuning configs (shared and long rows are tuned): on sm_90 with z of x's dtype
            # and the heaviest z in both directions; on sm_80 the heaviest corner of each.
            for z in (x, heaviest_z(x)) if arch == 90 else (heaviest_z(x),):
                for inverse in (False, True) if arch == 90 else (True,):
                    for rows in ("shared", "long") if arch == 90 else ("long",):
                        for block, warps in _autotune_configs(x, z):
                            add(Variant(arch, x, z, inverse, rows, block, warps))
        for x, z, inverse, rows in (("float32", "float32", False, "shared"),
                                    ("bfloat16", "float16", True, "long"),
                                    ("float16", "float64", False, "short"),
                                    ("float64", "float32", True, "long")):
            add(Variant(arch, x, z, inverse, rows, *DEFAULT_CONFIG, aligned=False))
    return list(found.values())


def _signature(v: Variant):
    """(signature, constexprs, attrs) the Triton launcher gives this variant (see the kernel:
    sizes are int64 and not specialised, coef's alignment is not specialised)."""
    ct = TRITON_TYPE[compute_dtype(v.x)]
    signature = {"x_ptr": "*" + TRITON_TYPE[v.x], "y_ptr": "*" + TRITON_TYPE[v.x],
                 "z_ptr": "*" + TRITON_TYPE[v.z], "coef_ptr": "*" + ct,
                 "n": "i64", "inner": "i64", "rows": "i64", "n_bucket": "i64",
                 "INVERSE": "constexpr", "ROWS": "constexpr", "BLOCK": "constexpr"}
    constexprs = {"INVERSE": v.inverse, "ROWS": v.rows, "BLOCK": v.block}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)} if v.aligned else {}
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm) bundled with Triton."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} (Triton's bundled {name}) is missing")
    return str(path)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def _compile(v: Variant) -> dict:
    """Runs in the compiling subprocess (TRITON_INTERPRET=0)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from belm_kernels import triton_kernels

    signature, constexprs, attrs = _signature(v)
    try:
        kernel = triton.compile(
            ASTSource(fn=triton_kernels._lincomb3_kernel, signature=signature,
                      constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", v.arch, 32),
            options={"num_warps": v.warps, "enable_fp_fusion": False})
    except Exception as exc:  # reported by the test that looks at this variant
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"ptx": kernel.asm["ptx"], "ttir": kernel.asm["ttir"],
            **_resource_usage(kernel.asm["cubin"])}


def _runtime_specialisation() -> list[dict]:
    """Triton's own specialisation of real tensors (private API: None where it differs), for a
    few launches, next to what _signature says (runs in the compiling subprocess)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from belm_kernels import triton_kernels

    kernel = triton_kernels._lincomb3_kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    out = []
    for x, z, rows, offset in (("float16", "float32", 1, 0), ("float32", "float16", 3, 0),
                               ("float64", "bfloat16", 2, 1)):
        n = 3 * 4096
        xt = torch.zeros(n + 8, dtype=getattr(torch, x))[offset:offset + n]
        zt = torch.zeros(n + 8, dtype=getattr(torch, z))[offset:offset + n]
        # coef at an odd address: its alignment must not matter (not specialised)
        coef = torch.zeros(3 * rows + 1, dtype=getattr(torch, compute_dtype(x)))[1:]
        plan = triton_kernels.launch_plan(n, rows)
        kwargs = dict(INVERSE=True, ROWS=plan["ROWS"], BLOCK=1024, num_warps=4,
                      enable_fp_fusion=False)
        bound, spec, options = binder(xt, xt, zt, coef, plan["n"], plan["inner"], plan["rows"],
                                      plan["n_bucket"], **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
        v = Variant(90, x, z, True, plan["ROWS"], 1024, 4, aligned=offset == 0)
        ours = _signature(v)
        out.append({"variant": v.id, "runtime": [signature, sorted(constexprs.values(), key=str),
                                                 sorted(k for k, a in attrs.items() if a)],
                    "ours": [ours[0], sorted(ours[1].values(), key=str), sorted(ours[2])]})
    return json.loads(json.dumps(out, default=list))


def _compile_all(variants: list[Variant]) -> dict:
    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        compiled = pool.map(_compile, variants, chunksize=4)
        results = dict(zip((v.id for v in variants), compiled, strict=True))
    try:
        runtime = _runtime_specialisation()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        runtime = f"{type(exc).__name__}: {exc}"
    return {"variants": results, "runtime": runtime}


def compile_in_subprocess(out: Path, timeout: int = 1800) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # our launches pass enable_fp_fusion=False
    proc = subprocess.run([sys.executable, __file__, "--compile", str(out)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"compiling the Triton variants failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    return compile_in_subprocess(tmp_path_factory.mktemp("codegen") / "triton.json")


# --------------------------------------------------------------------------------------------
# What to look for in the PTX.

_ACCESS = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s", re.MULTILINE)


def global_accesses(ptx: str, predicated: bool) -> collections.Counter:
    """Counter of (op, bits) over the global loads/stores with (or without) a predicate."""
    found = collections.Counter()
    for pred, op, quals in _ACCESS.findall(ptx):
        if bool(pred) != predicated:
            continue
        vec = re.search(r"\.v(\d)", quals)
        bits = re.search(r"\.[bufs](\d+)$", quals)
        found[(op, (int(vec.group(1)) if vec else 1) * int(bits.group(1)))] += 1
    return found


def expected_body(v: Variant) -> collections.Counter:
    """The unpredicated accesses of the mask-free body: the coefficient loads (three scalars; for
    short rows three gathers per element), then per thread ``per_thread`` elements of x, y, z in
    pieces of ``vector`` elements (16 bytes of x), each piece split into 16-byte accesses where
    it is wider (a float64 z next to a float16 x)."""
    coefficient_loads = 3 * (v.per_thread if v.rows == "short" else 1)
    want = collections.Counter({("ld", 8 * SIZE[compute_dtype(v.x)]): coefficient_loads})
    for t, op in ((v.x, "ld"), (v.x, "ld"), (v.z, "ld"), (v.x, "st")):
        width = min(16, v.vector * SIZE[t])
        want[(op, 8 * width)] += v.per_thread * SIZE[t] // width
    return want


def _variant_params(aligned_body: bool | None = None):
    try:
        variants = triton_variants()
    except ImportError:  # triton or torch missing: the fixture skips with the reason
        return [pytest.param(None, id="no-triton")]
    if aligned_body is not None:
        variants = [v for v in variants if v.aligned == aligned_body]
    return [pytest.param(v, id=v.id) for v in variants]


def _result(triton_results, v: Variant) -> dict:
    result = triton_results["variants"][v.id]
    assert "error" not in result, f"{v.id} does not compile: {result['error']}"
    return result


@pytest.mark.slow  # the whole matrix compiles in about a minute on 2 cores, once per session
@pytest.mark.parametrize("v", _variant_params())
def test_triton_variant_compiles_without_spills(triton_results, v):
    r = _result(triton_results, v)
    usage = {k: r[k] for k in ("reg", "stack", "local", "shared")}
    assert r["stack"] == 0 and r["local"] == 0, f"{v.id}: local memory / spills: {usage}"
    assert not re.search(r"\.local\b|(ld|st)\.local", r["ptx"]), f"{v.id}: local memory in PTX"
    assert r["shared"] == 0, f"{v.id}: uses shared memory (a layout conversion?): {usage}"
    assert r["reg"] <= MAX_REGISTERS, f"{v.id}: {r['reg']} registers > {MAX_REGISTERS}"


@pytest.mark.slow
@pytest.mark.parametrize("v", _variant_params(aligned_body=True))
def test_triton_body_keeps_vector_width(triton_results, v):
    r = _result(triton_results, v)
    got = global_accesses(r["ptx"], predicated=False)
    assert got == expected_body(v), (
        f"{v.id}: unpredicated global accesses (op, bits) {dict(got)} != expected "
        f"{dict(expected_body(v))}")
    # The tail is the masked copy of the same block: every one of its accesses is predicated.
    assert global_accesses(r["ptx"], predicated=True), f"{v.id}: no masked tail"


@pytest.mark.slow
@pytest.mark.parametrize("v", _variant_params())
def test_triton_arithmetic_and_offsets(triton_results, v):
    r = _result(triton_results, v)
    bits = 8 * SIZE[compute_dtype(v.x)]
    divisions = re.findall(r"\bdiv(\.\w+)*\.f(32|64)\b", r["ptx"])
    assert not re.search(r"\bdiv\.(full|approx)\.", r["ptx"]), f"{v.id}: approximate division"
    if v.inverse:
        assert re.search(rf"\bdiv\.rn\.f{bits}\b", r["ptx"]), f"{v.id}: no div.rn.f{bits}"
        assert re.search(rf"\bfma\.rn\.f{bits}\b", r["ptx"]), f"{v.id}: no fma.rn.f{bits}"
    else:
        assert not divisions, f"{v.id}: the forward update divides"
        assert re.search(rf"\bmul\.rn\.f{bits}\b", r["ptx"]), f"{v.id}: no mul.rn.f{bits}"
        assert re.search(rf"\bfma\.rn\.f{bits}\b", r["ptx"]), f"{v.id}: no fma.rn.f{bits}"
    # 64-bit offsets: every addptr on a tensor of pointers by a computed offset takes i64 offsets
    # (TTIR; the constant +1, +2 of a coefficient gather may stay i32).
    offsets = [ty for operand, ty in re.findall(
        r"tt\.addptr %\S+, (%\S+) : tensor<[^>]*!tt\.ptr<\w+>>, tensor<\d+x(i\d+)>", r["ttir"])
        if not operand.startswith("%cst")]
    assert len(offsets) >= 6, f"{v.id}: expected the x, y, z addptrs of body and tail"
    assert set(offsets) == {"i64"}, f"{v.id}: offsets of types {set(offsets)}"


@pytest.mark.slow
def test_triton_variants_match_the_runtime_specialisation(triton_results):
    runtime = triton_results["runtime"]
    if isinstance(runtime, str):
        pytest.skip(f"this Triton's private specialisation API differs ({runtime}); the "
                    "signatures follow the kernel's annotations")
    for case in runtime:
        assert case["runtime"] == case["ours"], case["variant"]


def test_expected_body_counts_every_tensor():
    """The expectation itself: float16 x, float64 z, 8 elements per thread: one 128-bit access
    for x, y and the store, four for z, three float32 coefficient loads."""
    v = Variant(90, "float16", "float64", False, "long", 1024, 4)
    assert expected_body(v) == {("ld", 32): 3, ("ld", 128): 6, ("st", 128): 1}
    v = Variant(90, "float16", "float64", False, "short", 1024, 4)
    assert expected_body(v) == {("ld", 32): 24, ("ld", 128): 6, ("st", 128): 1}
    v = Variant(90, "float32", "float16", False, "shared", 2048, 8)
    assert expected_body(v) == {("ld", 32): 3, ("ld", 128): 4, ("ld", 64): 2, ("st", 128): 2}
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\t@%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\n"
           "\tst.global.v2.b64 [ %rd3 + 0 ], { %rd4, %rd5 };\n")
    assert global_accesses(ptx, False) == {("ld", 128): 1, ("st", 128): 1}
    assert global_accesses(ptx, True) == {("ld", 16): 1}


# --------------------------------------------------------------------------------------------
# CUDA C++: one nvcc run for both archs.

# The flags torch.utils.cpp_extension gives nvcc for a CUDA extension.
CPP_EXTENSION_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                            "--expt-relaxed-constexpr"]
CU_SOURCE = REPO / "csrc" / "lincomb3_cuda.cu"
# Mangled template arguments of the kernels' x/z types.
MANGLED = {"float16": "6__half", "bfloat16": "13__nv_bfloat16", "float32": "f", "float64": "d"}


def compile_cuda(nvcc: str, out_dir: Path) -> tuple[str, dict[int, dict[str, str]]]:
    """(ptxas -v report, {arch: {mangled kernel name: SASS}}) of csrc/lincomb3_cuda.cu, compiled
    once for every arch in ARCHS."""
    from torch.utils.cpp_extension import include_paths

    out = out_dir / "lincomb3_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-c", "-std=c++17", *gencode, "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
           *CPP_EXTENSION_NVCC_FLAGS, *(f"-I{p}" for p in include_paths()), str(CU_SOURCE),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(out)], capture_output=True,
                          text=True, check=True).stdout
    by_arch: dict[int, dict[str, str]] = {}
    for block in re.split(r"\n(?=\s*arch = sm_)", sass):
        arch = re.search(r"arch = sm_(\d+)", block)
        if arch is None:
            continue
        functions = re.split(r"\n\s*Function : ", block)[1:]
        by_arch[int(arch.group(1))] = {f.split("\n", 1)[0].strip(): f for f in functions}
    return proc.stderr, by_arch


@pytest.fixture(scope="session")
def cuda_build(nvcc, tmp_path_factory):
    pytest.importorskip("triton")  # for its cuobjdump
    return compile_cuda(nvcc, tmp_path_factory.mktemp("nvcc"))


def test_nvcc_compiles_for_both_archs(cuda_build):
    _, sass = cuda_build
    for arch in ARCHS:
        names = sass.get(arch, {})
        # 16 dtype pairs x (vector rows, scalar rows, strided) kernels.
        assert len(names) == 48, (arch, len(names))


def test_cuda_kernels_do_not_spill(cuda_build):
    report, sass = cuda_build
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == 48 * len(ARCHS), report[-2000:]
    assert all(s == ("0", "0") for s in spills), report
    for arch, functions in sass.items():
        for name, code in functions.items():
            assert not re.search(r"\b(LDL|STL)\b", code), f"sm_{arch} {name}: local memory"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("x", DTYPES)
@pytest.mark.parametrize("z", DTYPES)
def test_cuda_vector_kernel_keeps_128_bit_accesses(cuda_build, arch, x, z):
    _, sass = cuda_build
    # z repeats x's class type as a substitution (S1_); builtin types are spelled again.
    z_name = "S1_" if x == z and x in ("float16", "bfloat16") else MANGLED[z]
    name = f"lincomb3_rows_kernelI{MANGLED[x]}{z_name}Lb1EE"
    matches = [code for n, code in sass[arch].items() if name in n]
    assert len(matches) == 1, (name, list(sass[arch]))
    ops = collections.Counter(re.findall(r"\b((?:LDG|STG)\.E(?:\.\d+)?)", matches[0]))
    assert ops["LDG.E.128"] >= 2 and ops["STG.E.128"] >= 1, (arch, x, z, dict(ops))
    z_bits = 8 * min(16, 16 // SIZE[x] * SIZE[z])
    z_op = "LDG.E" if z_bits == 32 else f"LDG.E.{z_bits}"
    assert ops[z_op] >= 1, (arch, x, z, z_op, dict(ops))


if __name__ == "__main__":  # the compiling subprocess (see compile_in_subprocess)
    assert len(sys.argv) == 3 and sys.argv[1] == "--compile", sys.argv
    Path(sys.argv[2]).write_text(json.dumps(_compile_all(triton_variants())))
