"""The Triton kernel before (the three-term ``_lincomb3_kernel`` of commit 7ceaf88) and after (the
K-term ``_lincomb_kernel`` with K = 2 terms and M = 1 output), compiled for sm_90 without a GPU
the way tests/test_codegen.py compiles them: global access widths of the default launch,
registers / stack / shared memory over every configuration each can launch, integer divisions.

    python bench/codegen_before_after.py   # writes bench/results/codegen_before_after_sm90.md

The old kernel is read from git (``git show 7ceaf88:belm_kernels/triton_kernels.py``), so this
runs in a clone with that history.
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

OLD_COMMIT = "7ceaf88"
PAIRS = [("float16", "float16"), ("bfloat16", "float32"), ("float32", "float32"),
         ("float32", "float16"), ("float64", "float64"), ("float16", "float64")]
T = codegen.TRITON_TYPE


def load_old_module():
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:belm_kernels/triton_kernels.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_triton_kernels.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analyse(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    usage = codegen._resource_usage(kernel.asm["cubin"])
    divisions = collections.Counter(f"{op}.{t}" for op, t in re.findall(r"\b(div|rem)\.([su]\d+)",
                                                                         ptx))
    fmt = lambda c: " ".join(f"{op}.{bits}x{n}" for (op, bits), n in sorted(c.items()))  # noqa
    return {**usage, "body": fmt(codegen.global_accesses(ptx, False)),
            "tail": fmt(codegen.global_accesses(ptx, True)),
            "div": ", ".join(f"{k} x{v}" for k, v in sorted(divisions.items())) or "none"}


def compile_old(old, x, z, inverse, rows, block, warps):
    signature = {"x_ptr": "*" + T[x], "y_ptr": "*" + T[x], "z_ptr": "*" + T[z],
                 "coef_ptr": "*" + T[codegen.compute_dtype(x)], "n": "i64", "inner": "i64",
                 "rows": "i64", "n_bucket": "i64", "INVERSE": "constexpr", "ROWS": "constexpr",
                 "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    return analyse(triton.compile(
        ASTSource(fn=old._lincomb3_kernel, signature=signature, attrs=attrs,
                  constexprs={"INVERSE": inverse, "ROWS": rows, "BLOCK": block}),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                    "enable_fp_fusion": False}))


def compile_new(x, z, inverse, rows, block, warps):
    signature, constexprs, attrs = codegen._signature(
        codegen.Variant(90, x, (x, z), (x,), inverse, rows, block, warps))
    return analyse(triton.compile(
        ASTSource(fn=triton_kernels._lincomb_kernel, signature=signature,
                  constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "enable_fp_fusion": False}))


def main() -> int:
    old = load_old_module()
    lines = ["| x / z | coefficients | kernel | unmasked accesses (the body) | masked accesses | "
             "registers (max over directions and configs) | stack = spills (max) | shared "
             "memory (max) | integer divisions per thread |", "|" + "---|" * 9]
    dt = lambda name: getattr(torch, name)  # noqa: E731
    for x, z in PAIRS:
        for rows in ("shared", "long", "short"):
            print(f"{x} / {z} {rows} ...", flush=True)
            def configs(kernel, inverse, x=x, z=z, rows=rows):  # called in this iteration
                found = {triton_kernels.DEFAULT_CONFIG}
                if rows == "short":  # short rows are not autotuned
                    return found
                if kernel == "before":
                    return found | set(old.autotune_configs(dt(x), dt(z)))
                return found | set(triton_kernels.autotune_configs(dt(x), [dt(x), dt(z)],
                                                                   [dt(x)], inverse))

            for kernel, compile_ in (("before", lambda *a: compile_old(old, *a)),
                                     ("after", compile_new)):
                results = {(inv, cfg): compile_(x, z, inv, rows, *cfg)
                           for inv in (False, True) for cfg in configs(kernel, inv)}
                worst = {k: max(r[k] for r in results.values())
                         for k in ("reg", "stack", "shared")}
                r = results[(False, triton_kernels.DEFAULT_CONFIG)]
                lines.append(f"| {x} / {z} | {rows} | {kernel} | {r['body'] or '-'} | "
                             f"{r['tail'] or '-'} | {worst['reg']} | {worst['stack']} | "
                             f"{worst['shared']} | {r['div']} |")
    info = stamp(torch.device("cpu"), old_commit=OLD_COMMIT)
    text = ["# Triton kernel before / after the K-term kernel: what the compiler makes of the "
            "three-term update for sm_90", "",
            *(f"- **{k}**: {v}" for k, v in info.items()),
            "- **command**: `python bench/codegen_before_after.py`", "",
            "Compiled without a GPU (`triton.compile(..., target=GPUTarget('cuda', 90, 32))`), "
            "x, y and z 16-byte aligned, in place (`x <- a x + b y + c z`). Before: the three-"
            f"term `_lincomb3_kernel` of commit {OLD_COMMIT}; after: `_lincomb_kernel` with K = 2 "
            "terms (y, z) and M = 1 output (x). Accesses (`op.bits x count` per thread and "
            "program, from the PTX) are those of the default launch (BLOCK 1024, 4 warps, "
            "forward); registers, stack and shared memory (Triton's bundled `cuobjdump "
            "-res-usage`) are the maxima over both directions and every configuration each "
            "kernel can launch (the default and its `autotune_configs`; after: for the inverse, "
            "at most 8 elements per thread, since 16 correctly rounded divisions per thread "
            "spilled around their slow-path calls in one configuration). Coefficient loads are "
            "the 32-bit (64-bit for float64 x) scalar loads: 3 per program, or 3 per element "
            "for short per-sample rows (a gather).", "", *lines, ""]
    out = ROOT / "bench" / "results" / "codegen_before_after_sm90.md"
    out.write_text("\n".join(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
