"""The Triton kernel before (commit 68ea2c1) and after the vector-width rework, compiled for sm_90
without a GPU the way tests/test_codegen.py compiles it: global access widths of the default
launch, registers / stack / shared memory over every configuration, integer divisions.

    python bench/codegen_before_after.py   # writes bench/results/codegen_before_after_sm90.md

The old kernel is read from git (``git show 68ea2c1:belm_kernels/triton_kernels.py``), so this
runs in a clone with that history. The old kernel masked every access (``offs < n``): Triton
vectorised it only when it could prove the element count a multiple of 16 (its launcher
specialises integer arguments on that), hence the two rows per old case.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real JITFunction, before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import test_codegen as codegen  # noqa: E402
from stamp import stamp  # noqa: E402

from belm_kernels import triton_kernels  # noqa: E402

OLD_COMMIT = "68ea2c1"
OLD_CONFIGS = [(block, warps) for block in (1024, 2048, 4096) for warps in (4, 8)]
PAIRS = [("float16", "float16"), ("bfloat16", "float32"), ("float32", "float32"),
         ("float32", "float16"), ("float64", "float64"), ("float16", "float64")]
T = codegen.TRITON_TYPE


def load_old_kernel():
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:belm_kernels/triton_kernels.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_triton_kernels.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._lincomb3_kernel


def analyse(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    usage = codegen._resource_usage(kernel.asm["cubin"])
    divisions = collections.Counter(f"{op}.{t}" for op, t in re.findall(r"\b(div|rem)\.([su]\d+)",
                                                                         ptx))
    fmt = lambda c: " ".join(f"{op}.{bits}x{n}" for (op, bits), n in sorted(c.items()))  # noqa
    return {**usage, "body": fmt(codegen.global_accesses(ptx, False)),
            "tail": fmt(codegen.global_accesses(ptx, True)),
            "div": ", ".join(f"{k} x{v}" for k, v in sorted(divisions.items())) or "none"}


def compile_old(kernel, x, z, inverse, per_sample, block, warps, n_multiple_of_16):
    signature = {"x_ptr": "*" + T[x], "y_ptr": "*" + T[x], "z_ptr": "*" + T[z],
                 "coef_ptr": "*" + T[codegen.compute_dtype(x)], "n": "i32", "per_sample": "i32",
                 "n_bucket": "i32", "INVERSE": "constexpr", "PER_SAMPLE": "constexpr",
                 "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    if n_multiple_of_16:
        attrs.update({(4,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]})
    return analyse(triton.compile(
        ASTSource(fn=kernel, signature=signature, attrs=attrs,
                  constexprs={"INVERSE": inverse, "PER_SAMPLE": per_sample, "BLOCK": block}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}))


def compile_new(x, z, inverse, rows, block, warps):
    signature, constexprs, attrs = codegen._signature(
        codegen.Variant(90, x, z, inverse, rows, block, warps))
    return analyse(triton.compile(
        ASTSource(fn=triton_kernels._lincomb3_kernel, signature=signature,
                  constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "enable_fp_fusion": False}))


def main() -> int:
    old_kernel = load_old_kernel()
    lines = ["| x / z | coefficients | kernel | element count | unmasked accesses (the body) | "
             "masked accesses | registers (max over directions and configs) | stack = spills "
             "(max) | shared memory (max) | integer divisions per thread |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x, z in PAIRS:
        for per_sample in (False, True):
            print(f"{x} / {z} {'per-sample' if per_sample else 'shared'} ...", flush=True)
            old = {(inv, cfg, nd): compile_old(old_kernel, x, z, inv, per_sample, *cfg, nd)
                   for inv in (False, True) for cfg in OLD_CONFIGS for nd in (False, True)}
            cases = [("old", "per-sample" if per_sample else "shared", old)]
            for rows in (("long", "short") if per_sample else ("shared",)):
                configs = {triton_kernels.DEFAULT_CONFIG}
                if rows != "short":  # short rows are not autotuned
                    configs |= set(codegen._autotune_configs(x, z))
                new = {(inv, cfg, False): compile_new(x, z, inv, rows, *cfg)
                       for inv in (False, True) for cfg in configs}
                cases.append(("new", "per-sample " + rows if per_sample else "shared", new))
            for kernel, coef, results in cases:
                worst = {k: max(r[k] for r in results.values())
                         for k in ("reg", "stack", "shared")}
                for nd in ((False, True) if kernel == "old" else (False,)):
                    r = results[(False, (1024, 4), nd)]
                    count = "multiple of 16" if nd else "any"
                    lines.append(f"| {x} / {z} | {coef} | {kernel} | {count} | {r['body'] or '-'} "
                                 f"| {r['tail'] or '-'} | {worst['reg']} | {worst['stack']} | "
                                 f"{worst['shared']} | {r['div']} |")
    info = stamp(torch.device("cpu"), old_commit=OLD_COMMIT)
    text = ["# Triton kernel before / after: what the compiler makes of it for sm_90", "",
            *(f"- **{k}**: {v}" for k, v in info.items()),
            "- **command**: `python bench/codegen_before_after.py`", "",
            "Compiled without a GPU (`triton.compile(..., target=GPUTarget('cuda', 90, 32))`), x, "
            "y and z 16-byte aligned. Accesses (`op.bits x count` per thread and program, from "
            "the PTX) are those of the default launch (BLOCK 1024, 4 warps, forward); registers, "
            "stack and shared memory (Triton's bundled `cuobjdump -res-usage`) are the maxima "
            "over both directions and every configuration each kernel can launch (old: BLOCK "
            "1024/2048/4096 x 4/8 warps; new: the default and `autotune_configs`). Coefficient "
            "loads are the 32-bit (64-bit for float64 x) scalar loads: 3 per program, or 3 per "
            "element for the new kernel's short per-sample rows (a gather).", "",
            *lines, ""]
    out = ROOT / "bench" / "results" / "codegen_before_after_sm90.md"
    out.write_text("\n".join(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
