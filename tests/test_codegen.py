"""The GPU code of the K-term update, compiled for its real targets (sm_80, sm_90) on a machine
without a GPU.

Triton. A representative set of launch variants of ``belm_kernels.triton_kernels._lincomb_kernel``
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with the
signature, constexprs and pointer-alignment attributes Triton's launcher gives it at run time
(checked against Triton's own specialisation of real tensors where that private API is
importable). This runs in one subprocess with TRITON_INTERPRET=0, since tests/conftest.py
switches the interpreter on for the rest of the suite and an interpreted kernel has no compiler;
the results are cached per session. A variant is the number of terms K and outputs M, the dtype
of x, of every term and of every output, the direction and the coefficient rows (shared; long
per-sample rows, a program per block of a row; short ones, a lookup per lane), the launch
configuration, and whether the operands are 16-byte aligned. The set (triton_variants):

* the three-term in-place update (``lincomb3_``, K = 2, M = 1) for every (x, last term) dtype
  pair, both directions, shared and long rows on sm_90, the heaviest pair per x on sm_80, and
  short rows;
* K = 1, 3 and 6 terms of mixed dtypes; M = 2 and 3 outputs, of one dtype and of several;
* every autotuning configuration of a few signatures (the three-term update of each x dtype
  with z of its dtype and with its heaviest z, and K = 6 with M = 3), on sm_90 (forward shared,
  inverse shared and long) and the heaviest on sm_80;
* unaligned operands (Triton's other specialisation, correct with narrower accesses).

On each: compiles; the mask-free body's global accesses are exactly the expected vectors (128
bits for x and the outputs, VEC elements for a narrower term, e.g. 64 bits of float16 next to a
float32 x) plus the coefficient loads (aligned variants); the inverse divides with ``div.rn``
(never the approximate ``div.full``/``div.approx``) and the forward multiplies with ``mul.rn``
(no contraction); every tensor of pointers is offset by 64-bit integers (TTIR); no local memory
and no stack (spills). No shared memory either, except where outputs of different widths meet:
Triton caps every store at 128 bits per thread, so a float32 output next to a float16 one (or a
float16 x) is stored from another register layout than the loads', converted through shared
memory (a rare combination: outputs in x's dtype never need it). The three-term variants stay
within MAX_REGISTERS.

CUDA C++. ``csrc/lincomb_cuda.cu`` is compiled once by nvcc for both archs, with the PTX kept
(without nvcc these tests skip, and fail where BELM_KERNELS_REQUIRE_NVCC=1, as in CI): every
kernel variant is there; ptxas reports no spills for any; the PTX of every vector (rows) kernel
moves x and the outputs only in 128-bit vectors and every term in one vector of its pack (or
128-bit pieces of it), in exactly the expected number (one branch per operand dtype, taken at
run time); its SASS keeps 128-bit LDG/STG and no local loads/stores; every kernel divides with
``div.rn`` and multiplies with ``mul.rn`` / ``fma.rn``.

``python bench/codegen.py`` writes the per-variant tables (registers, access widths) to
bench/results/codegen_sm80_sm90.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
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
SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
# A bound for the three-term variants, not a target (they need 32 to 88, the most: float64 x
# with short rows): at 96 registers 21 warps per SM stay resident, plenty for a streaming kernel
# with 16 bytes or more in flight per operand and thread. More terms and outputs keep more
# values live (every output's accumulators, every coefficient): their counts are in
# bench/results/codegen_sm80_sm90.md, and they must not spill.
MAX_REGISTERS = 96


def compute_dtype(x: str) -> str:
    return "float64" if x == "float64" else "float32"


# --------------------------------------------------------------------------------------------
# Triton variants.


@dataclasses.dataclass(frozen=True)
class Variant:
    arch: int
    x: str
    terms: tuple[str, ...]
    outs: tuple[str, ...]  # (x,) for the in-place update (outs[0] is x)
    inverse: bool
    rows: str  # the ROWS constexpr: "shared", "long" or "short"
    block: int
    warps: int
    aligned: bool = True  # every operand 16-byte aligned: Triton's pointer specialisation

    @property
    def id(self) -> str:
        names = lambda ds: ".".join(SHORT[d] for d in ds)  # noqa: E731
        return (f"sm{self.arch}-x_{SHORT[self.x]}-t_{names(self.terms)}-o_{names(self.outs)}-"
                f"{'inverse' if self.inverse else 'forward'}-{self.rows}-{self.block}x"
                f"{self.warps}w{'' if self.aligned else '-unaligned'}")

    @property
    def k(self) -> int:
        return len(self.terms)

    @property
    def m(self) -> int:
        return len(self.outs)

    @property
    def vector(self) -> int:  # VEC: elements in 16 bytes of the narrowest of x and the outputs
        return 16 // min(SIZE[d] for d in (self.x, *self.outs))

    @property
    def per_thread(self) -> int:  # elements of every operand per thread and program
        return self.block // (32 * self.warps)

    @property
    def mixed_store_widths(self) -> bool:
        """Some output wider than the narrowest of x and the outputs: stored from a register
        layout of its own (a conversion through shared memory)."""
        narrowest = min(SIZE[d] for d in (self.x, *self.outs))
        return any(SIZE[o] != narrowest for o in self.outs)


def _autotune_configs(x: str, terms, outs, inverse: bool) -> list[tuple[int, int]]:
    import torch

    from belm_kernels import triton_kernels

    return triton_kernels.autotune_configs(getattr(torch, x), [getattr(torch, t) for t in terms],
                                           [getattr(torch, o) for o in outs], inverse)


def heaviest_term(x: str) -> str:
    """The term that costs the most registers next to x: the widest (float16 next to float64)."""
    return "float16" if x == "float64" else "float64"


# K = 6 terms of every dtype (cycled), and M = 3 outputs of x's dtype.
MIXED_TERMS = ("float32", "float16", "bfloat16", "float64", "float32", "float16")


def triton_variants() -> list[Variant]:
    from belm_kernels.triton_kernels import DEFAULT_CONFIG

    found: dict[str, Variant] = {}

    def add(*args, config=DEFAULT_CONFIG, **kwargs) -> None:
        v = Variant(*args, *config, **kwargs)
        found.setdefault(v.id, v)

    # The three-term in-place update: every (x, z) pair.
    for x, z in itertools.product(DTYPES, DTYPES):
        add(90, x, (x, z), (x,), False, "shared")
        add(90, x, (x, z), (x,), True, "long")
    for x in DTYPES:
        add(80, x, (x, heaviest_term(x)), (x,), True, "long")
        add(90, x, (x, heaviest_term(x)), (x,), False, "short")
    # Number of terms, number of outputs, output dtypes.
    for k in (1, 3, 6):
        add(90, "float32", MIXED_TERMS[:k], ("float32",), False, "shared")
        add(90, "float32", MIXED_TERMS[:k], ("float32",), True, "long")
    add(80, "float32", MIXED_TERMS, ("float32",), True, "long")
    for rows in ("shared", "long", "short"):
        add(90, "float32", ("float32", "float16"), ("float32",) * 2, False, rows)
        add(90, "float32", MIXED_TERMS, ("float32",) * 3, False, rows)
    add(80, "float32", MIXED_TERMS, ("float32",) * 3, False, "short")
    add(80, "bfloat16", ("bfloat16", "float32", "bfloat16"), ("bfloat16",) * 3, False, "long")
    add(90, "float16", ("float16", "float32"), ("float16", "float16"), False, "long")
    add(90, "float64", ("float64", "float32"), ("float64", "float64"), False, "shared")
    # Outputs of several widths (a layout conversion), and an inverse into a wider output.
    add(90, "float32", ("float16",), ("float32", "bfloat16"), False, "shared")
    add(90, "float64", MIXED_TERMS[:3], ("float64", "float16", "float32"), False, "long")
    add(90, "float16", ("float16", "float32"), ("float32",), True, "shared")
    # Every autotuning configuration of a few signatures (shared and long rows are tuned): the
    # three-term update with z of x's dtype and with the heaviest z, for every x dtype.
    tuned = [(x, (x, z), (x,)) for x in DTYPES for z in (x, heaviest_term(x))]
    tuned.append(("float32", MIXED_TERMS, ("float32",) * 3))
    for x, terms, outs in tuned:
        for inverse, rows in ((False, "shared"), (True, "shared"), (True, "long")):
            for config in _autotune_configs(x, terms, outs, inverse):
                add(90, x, terms, outs, inverse, rows, config=config)
    for config in _autotune_configs(*tuned[-1], False):
        add(80, *tuned[-1], False, "long", config=config)
    # Unaligned operands.
    for x, terms, outs, inverse, rows in (
            ("float32", ("float32", "float32"), ("float32",), False, "shared"),
            ("bfloat16", ("bfloat16", "float16"), ("bfloat16",), True, "long"),
            ("float16", ("float16", "float64"), ("float16",), False, "short"),
            ("float32", MIXED_TERMS[:3], ("float32", "float32"), True, "long")):
        add(90, x, terms, outs, inverse, rows, aligned=False)
    return list(found.values())


def _signature(v: Variant):
    """(signature, constexprs, attrs) the Triton launcher gives this variant (see the kernel:
    sizes are int64 and not specialised, coef's alignment is not specialised; the operands are
    outs (argument 0), x (1) and terms (2), the tuples indexed inside)."""
    ct = TRITON_TYPE[compute_dtype(v.x)]
    signature = {"outs": tuple("*" + TRITON_TYPE[o] for o in v.outs),
                 "x_ptr": "*" + TRITON_TYPE[v.x],
                 "terms": tuple("*" + TRITON_TYPE[t] for t in v.terms), "coef_ptr": "*" + ct,
                 "n": "i64", "inner": "i64", "rows": "i64", "n_bucket": "i64",
                 "K": "constexpr", "M": "constexpr", "INVERSE": "constexpr", "ROWS": "constexpr",
                 "VEC": "constexpr", "BLOCK": "constexpr"}
    constexprs = {"K": v.k, "M": v.m, "INVERSE": v.inverse, "ROWS": v.rows, "VEC": v.vector,
                  "BLOCK": v.block}
    aligned = [(0, m) for m in range(v.m)] + [(1,)] + [(2, k) for k in range(v.k)]
    attrs = {path: [["tt.divisibility", 16]] for path in aligned} if v.aligned else {}
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
            ASTSource(fn=triton_kernels._lincomb_kernel, signature=signature,
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

    kernel = triton_kernels._lincomb_kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    out = []
    for x, terms, outs, rows, offset in (
            ("float16", ("float16", "float32"), ("float16",), 1, 0),
            ("float32", ("float16", "bfloat16", "float64"), ("float32", "bfloat16"), 3, 0),
            ("float64", ("bfloat16",), ("float64",), 2, 1)):
        n = 3 * 4096

        def tensor(dtype, n=n, offset=offset):  # bound now: called within this iteration
            return torch.zeros(n + 8, dtype=getattr(torch, dtype))[offset:offset + n]

        # coef at an odd address: its alignment must not matter (not specialised)
        count = rows * len(outs) * (len(terms) + 1)
        coef = torch.zeros(count + 1, dtype=getattr(torch, compute_dtype(x)))[1:]
        plan = triton_kernels.launch_plan(n, rows)
        v = Variant(90, x, terms, outs, True, plan["ROWS"], 1024, 4, aligned=offset == 0)
        kwargs = dict(K=v.k, M=v.m, INVERSE=True, ROWS=plan["ROWS"], VEC=v.vector, BLOCK=1024,
                      num_warps=4, enable_fp_fusion=False)
        bound, spec, options = binder(tuple(tensor(o) for o in outs), tensor(x),
                                      tuple(tensor(t) for t in terms), coef, plan["n"],
                                      plan["inner"], plan["rows"], plan["n_bucket"], **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
        ours = _signature(v)
        out.append({"variant": v.id,
                    "runtime": [signature, sorted(constexprs.values(), key=str),
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


def global_accesses(ptx: str, predicated: bool | None = None,
                    vector_only: bool = False) -> collections.Counter:
    """Counter of (op, bits) over the global loads/stores with (True) or without (False) a
    predicate, or all (None); with ``vector_only``, the .v2/.v4 ones only."""
    found = collections.Counter()
    for pred, op, quals in _ACCESS.findall(ptx):
        if predicated is not None and bool(pred) != predicated:
            continue
        vec = re.search(r"\.v(\d)", quals)
        if vector_only and not vec:
            continue
        bits = re.search(r"\.[bufs](\d+)$", quals)
        found[(op, (int(vec.group(1)) if vec else 1) * int(bits.group(1)))] += 1
    return found


def pack_accesses(count: int, elements: int, size: int) -> collections.Counter:
    """count accesses of ``elements`` elements of ``size`` bytes each, in pieces of at most 16
    bytes: {bits: how many}."""
    width = min(16, elements * size)
    return collections.Counter({8 * width: count * elements * size // width})


def expected_body(v: Variant) -> collections.Counter:
    """The unpredicated accesses of the mask-free body: the coefficient loads (M * (K+1)
    scalars; for short rows that many gathers per element), then per thread ``per_thread``
    elements of every operand in pieces of VEC elements, each piece split into 16-byte accesses
    where it is wider (a float64 term next to a float16 x)."""
    per_row = v.m * (v.k + 1)
    coefficient_loads = per_row * (v.per_thread if v.rows == "short" else 1)
    want = collections.Counter({("ld", 8 * SIZE[compute_dtype(v.x)]): coefficient_loads})
    pieces = v.per_thread // v.vector
    for dtype, op in [(v.x, "ld"), *((t, "ld") for t in v.terms), *((o, "st") for o in v.outs)]:
        for bits, n in pack_accesses(pieces, v.vector, SIZE[dtype]).items():
            want[(op, bits)] += n
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


@pytest.mark.slow  # the whole set compiles in about a minute on 2 cores, once per session
@pytest.mark.parametrize("v", _variant_params())
def test_triton_variant_compiles_without_spills(triton_results, v):
    r = _result(triton_results, v)
    usage = {k: r[k] for k in ("reg", "stack", "local", "shared")}
    assert r["stack"] == 0 and r["local"] == 0, f"{v.id}: local memory / spills: {usage}"
    assert not re.search(r"\.local\b|(ld|st)\.local", r["ptx"]), f"{v.id}: local memory in PTX"
    if not v.mixed_store_widths:
        assert r["shared"] == 0, f"{v.id}: uses shared memory (a layout conversion?): {usage}"
    if v.k <= 2 and v.m == 1:
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
    # (TTIR; the constant offsets of a coefficient gather may stay i32).
    offsets = [ty for operand, ty in re.findall(
        r"tt\.addptr %\S+, (%\S+) : tensor<[^>]*!tt\.ptr<\w+>>, tensor<\d+x(i\d+)>", r["ttir"])
        if not operand.startswith("%cst")]
    operands = 1 + v.k + v.m
    assert len(offsets) >= 2 * operands, f"{v.id}: expected the addptrs of body and tail"
    assert set(offsets) == {"i64"}, f"{v.id}: offsets of types {set(offsets)}"


@pytest.mark.slow
def test_triton_variants_match_the_runtime_specialisation(triton_results):
    runtime = triton_results["runtime"]
    if isinstance(runtime, str):
        pytest.skip(f"this Triton's private specialisation API differs ({runtime}); the "
                    "signatures follow the kernel's annotations")
    for case in runtime:
        assert case["runtime"] == case["ours"], case["variant"]


def test_expected_body_counts_every_operand():
    """The expectation itself. float16 x, float64 z, 8 elements per thread: one 128-bit access
    for x, y and the store, four for z, three float32 coefficient loads."""
    v = Variant(90, "float16", ("float16", "float64"), ("float16",), False, "long", 1024, 4)
    assert expected_body(v) == {("ld", 32): 3, ("ld", 128): 6, ("st", 128): 1}
    v = Variant(90, "float16", ("float16", "float64"), ("float16",), False, "short", 1024, 4)
    assert expected_body(v) == {("ld", 32): 24, ("ld", 128): 6, ("st", 128): 1}
    # float32 x and output, a float16 term, 16 per thread: VEC 4, 64-bit pieces of the term.
    v = Variant(90, "float32", ("float32", "float16"), ("float32",), False, "shared", 2048, 4)
    assert expected_body(v) == {("ld", 32): 3, ("ld", 128): 8, ("ld", 64): 4, ("st", 128): 4}
    # Two outputs, float32 and bfloat16: VEC 8 (bfloat16's), 8 per thread: x and the float32
    # output in two 128-bit pieces, the bfloat16 one in one; 2 * 2 coefficients.
    v = Variant(90, "float32", ("float16",), ("float32", "bfloat16"), False, "shared", 1024, 4)
    assert v.vector == 8 and v.mixed_store_widths
    assert expected_body(v) == {("ld", 32): 4, ("ld", 128): 3, ("st", 128): 3}
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "\t@%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\n"
           "\tst.global.v2.b64 [ %rd3 + 0 ], { %rd4, %rd5 };\n"
           "\tld.global.nc.f32 %f1, [%rd6];\n")
    assert global_accesses(ptx, False) == {("ld", 128): 1, ("st", 128): 1, ("ld", 32): 1}
    assert global_accesses(ptx, True) == {("ld", 16): 1}
    assert global_accesses(ptx, vector_only=True) == {("ld", 128): 1, ("st", 128): 1}


# --------------------------------------------------------------------------------------------
# CUDA C++: one nvcc run for both archs.

# The flags torch.utils.cpp_extension gives nvcc for a CUDA extension.
CPP_EXTENSION_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                            "--expt-relaxed-constexpr"]
CU_SOURCE = REPO / "csrc" / "lincomb_cuda.cu"
MAX_INPUTS, MAX_OUTPUTS = 7, 3  # x and 6 terms; 3 outputs (the kernels' kMaxInputs/kMaxOutputs)
# The kernels: (compute dtype, M, P) of the rows kernels (P = 1: the scalar one; P > 1: the
# vector one, P elements per thread and step: 16 bytes of the narrowest of x and the outputs)
# and (compute dtype, M) of the strided kernels.
ROWS_KERNELS = [(ct, m, p) for ct, packs in (("float32", (1, 4, 8)), ("float64", (1, 2, 4, 8)))
                for p in packs for m in range(1, MAX_OUTPUTS + 1)]
STRIDED_KERNELS = [(ct, m) for ct in ("float32", "float64") for m in range(1, MAX_OUTPUTS + 1)]
MANGLED_CT = {"float32": "f", "float64": "d"}


def rows_kernel_name(ct: str, m: int, p: int) -> str:
    """The mangled name's start (the heavy variants carry _heavy, see the kernels' header)."""
    heavy = SIZE[ct] * m * p >= 96
    name = "lincomb_rows_kernel_heavy" if heavy else "lincomb_rows_kernel"
    return f"_ZN9belm_cuda{len(name)}{name}I{MANGLED_CT[ct]}Li{m}ELi{p}E"


def compile_cuda(nvcc: str, out_dir: Path) -> dict:
    """{"report": ptxas -v output, "sass": {arch: {mangled name: SASS}}, "ptx": {arch: {mangled
    name: PTX}}} of csrc/lincomb_cuda.cu, compiled once for every arch in ARCHS (SASS and PTX)."""
    from torch.utils.cpp_extension import include_paths

    out = out_dir / "lincomb_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]" for a in ARCHS]
    cmd = [nvcc, "-c", "-std=c++17", *gencode, "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
           *CPP_EXTENSION_NVCC_FLAGS, *(f"-I{p}" for p in include_paths()), str(CU_SOURCE),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    dump = {kind: subprocess.run([_tool("cuobjdump"), f"-{kind}", str(out)], capture_output=True,
                                 text=True, check=True).stdout for kind in ("sass", "ptx")}
    sass: dict[int, dict[str, str]] = {}
    for block in re.split(r"\n(?=Fatbin \w+ code:)", dump["sass"]):
        arch = re.search(r"arch = sm_(\d+)", block)
        if arch is None or not block.startswith("Fatbin elf code:"):
            continue
        functions = re.split(r"\n\s*Function : ", block)[1:]
        sass[int(arch.group(1))] = {f.split("\n", 1)[0].strip(): f for f in functions}
    ptx: dict[int, dict[str, str]] = {}
    for block in re.split(r"\n(?=\.version )", dump["ptx"]):
        target = re.search(r"^\.target sm_(\d+)", block, re.MULTILINE)
        if target is None:
            continue
        ptx[int(target.group(1))] = {name: body for name, body in re.findall(
            r"\.entry (\S+)\((.*?)\n\}", block, re.S)}
    return {"report": proc.stderr, "sass": sass, "ptx": ptx}


@pytest.fixture(scope="session")
def cuda_build(nvcc, tmp_path_factory):
    pytest.importorskip("triton")  # for its cuobjdump
    return compile_cuda(nvcc, tmp_path_factory.mktemp("nvcc"))


def _one(functions: dict[str, str], prefix: str) -> str:
    matches = [code for name, code in functions.items() if name.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(functions))
    return matches[0]


def test_nvcc_compiles_every_kernel_for_both_archs(cuda_build):
    for arch in ARCHS:
        for store in ("sass", "ptx"):
            functions = cuda_build[store].get(arch, {})
            assert len(functions) == len(ROWS_KERNELS) + len(STRIDED_KERNELS), (arch, store)
            for ct, m, p in ROWS_KERNELS:
                _one(functions, rows_kernel_name(ct, m, p))
            for ct, m in STRIDED_KERNELS:
                _one(functions, f"_ZN9belm_cuda22lincomb_strided_kernelI{MANGLED_CT[ct]}Li{m}E")


def test_cuda_kernels_do_not_spill(cuda_build):
    kernels = len(ROWS_KERNELS) + len(STRIDED_KERNELS)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", cuda_build["report"])
    assert len(spills) == kernels * len(ARCHS), cuda_build["report"][-2000:]
    assert all(s == ("0", "0") for s in spills), cuda_build["report"]
    for arch, functions in cuda_build["sass"].items():
        for name, code in functions.items():
            assert not re.search(r"\b(LDL|STL)\b", code), f"sm_{arch} {name}: local memory"


def expected_vector_accesses(ct: str, m: int, p: int) -> collections.Counter:
    """The vector (.v2/.v4) accesses of a vector rows kernel's PTX: every dtype branch of each of
    the MAX_INPUTS input slots (x: only dtypes with 16 bytes or more per pack) and of each of
    the M outputs (those dtypes too), each pack in pieces of at most 16 bytes."""
    del ct  # the same for both compute dtypes
    want = collections.Counter()
    for slot in range(MAX_INPUTS + m):
        op = "ld" if slot < MAX_INPUTS else "st"
        for dtype in DTYPES:
            if (slot == 0 or op == "st") and p * SIZE[dtype] < 16:
                continue  # never taken: P is 16 bytes of the narrowest of x and the outputs
            for bits, n in pack_accesses(1, p, SIZE[dtype]).items():
                want[(op, bits)] += n
    return want


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ct,m,p", [k for k in ROWS_KERNELS if k[2] > 1],
                         ids=lambda k: str(k))
def test_cuda_vector_kernel_accesses(cuda_build, arch, ct, m, p):
    ptx = _one(cuda_build["ptx"][arch], rows_kernel_name(ct, m, p))
    got = global_accesses(ptx, vector_only=True)
    assert got == expected_vector_accesses(ct, m, p), (arch, ct, m, p, dict(got))
    assert all(bits == 128 for op, bits in got if op == "st"), dict(got)  # outputs: 128-bit
    sass = _one(cuda_build["sass"][arch], rows_kernel_name(ct, m, p))
    ops = collections.Counter(re.findall(r"\b((?:LDG|STG)\.E(?:\.\d+)?)", sass))
    assert ops["LDG.E.128"] >= 1 and ops["STG.E.128"] >= m, (arch, ct, m, p, dict(ops))


def test_expected_vector_accesses_of_one_kernel():
    """float32 math, one output, packs of 4: x and every term of float32 (16 bytes) or float64
    (two 16-byte pieces), the terms of 16-bit dtypes in 8 bytes; the output stored in 16-byte
    pieces as float32 or float64."""
    want = expected_vector_accesses("float32", 1, 4)
    assert want == {("ld", 128): 7 + 14, ("ld", 64): 6 * 2, ("st", 128): 1 + 2}


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_round_correctly(cuda_build, arch):
    for name, ptx in cuda_build["ptx"][arch].items():
        bits = 64 if "IdLi" in name else 32
        assert not re.search(r"\bdiv\.(full|approx)\.", ptx), f"sm_{arch} {name}"
        for op in ("div.rn", "fma.rn", "mul.rn"):
            assert re.search(rf"\b{re.escape(op)}\.f{bits}\b", ptx), f"sm_{arch} {name}: {op}"


if __name__ == "__main__":  # the compiling subprocess (see compile_in_subprocess)
    assert len(sys.argv) == 3 and sys.argv[1] == "--compile", sys.argv
    Path(sys.argv[2]).write_text(json.dumps(_compile_all(triton_variants())))
