"""What the compilers make of the GPU code, on a machine without a GPU: for every Triton launch
variant of tests/test_codegen.py the registers, stack (spills), shared memory and global accesses
of the mask-free body and the masked tail (PTX), and for every CUDA kernel what ptxas reports and
the vector accesses of its PTX, for sm_80 and sm_90.

    python bench/codegen.py                    # writes bench/results/codegen_sm80_sm90.md

It uses the compile steps of tests/test_codegen.py (which asserts on the same data): the Triton
variants compile in one subprocess with TRITON_INTERPRET=0; csrc/lincomb_cuda.cu is compiled
once by nvcc (from PATH, CUDA_HOME or /usr/local/cuda) for both archs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import test_codegen as codegen  # noqa: E402
from stamp import stamp  # noqa: E402


def _accesses(counter) -> str:
    return " ".join(f"{op}.{bits}x{n}" for (op, bits), n in sorted(counter.items())) or "-"


def triton_table(results: dict) -> list[str]:
    lines = ["| variant | registers | stack | shared | unmasked body: op.bits x count | "
             "masked tail: op.bits x count | body as expected |", "|---|---|---|---|---|---|---|"]
    for v in codegen.triton_variants():
        r = results["variants"][v.id]
        if "error" in r:
            lines.append(f"| {v.id} | compile error: {r['error'][:80]} | | | | | |")
            continue
        body = codegen.global_accesses(r["ptx"], predicated=False)
        tail = codegen.global_accesses(r["ptx"], predicated=True)
        expected = ("yes" if body == codegen.expected_body(v) else "NO") if v.aligned else \
            "n/a (unaligned)"
        lines.append(f"| {v.id} | {r['reg']} | {r['stack']} | {r['shared']} | "
                     f"{_accesses(body)} | {_accesses(tail)} | {expected} |")
    return lines


def cuda_table(build: dict) -> list[str]:
    lines = ["| arch | kernel | registers | stack frame | spill stores / loads | vector accesses "
             "(PTX, all dtype branches): op.bits x count |", "|---|---|---|---|---|---|"]
    pattern = re.compile(
        r"Compiling entry function '(\S+)' for 'sm_(\d+)'.*?Function properties for \S+\s+"
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s+"
        r"ptxas info\s+: Used (\d+) registers", re.S)
    for name, arch, stack, st, ld, regs in pattern.findall(build["report"]):
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout
        short = re.sub(r"\(.*\)$", "", (demangled or name).strip()).replace("belm_cuda::", "")
        ptx = build["ptx"].get(int(arch), {}).get(name, "")
        vectors = _accesses(codegen.global_accesses(ptx, vector_only=True))
        lines.append(f"| sm_{arch} | `{short}` | {regs} | {stack} | {st} / {ld} | {vectors} |")
    return lines


def _find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                        "codegen_sm80_sm90.md")
    args = parser.parse_args()
    nvcc = _find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        print("compiling the Triton variants ...", flush=True)
        triton = codegen.compile_in_subprocess(Path(tmp) / "triton.json")
        cuda = None
        if nvcc:
            print("compiling csrc/lincomb_cuda.cu ...", flush=True)
            cuda = codegen.compile_cuda(nvcc, Path(tmp))
    info = stamp(torch.device("cpu"), nvcc=_nvcc_version(nvcc) if nvcc else "not found")
    lines = ["# What the compilers make of the GPU code (sm_80, sm_90), compiled without a GPU", "",
             *(f"- **{k}**: {v}" for k, v in info.items()),
             "- **command**: `python bench/codegen.py`", "",
             "Triton: `triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))` with "
             "the signature, constexprs and pointer alignment Triton's launcher gives each "
             "variant; registers/stack/shared from Triton's bundled `cuobjdump -res-usage`, "
             "accesses from the PTX (`op.bits x count`: global loads `ld` / stores `st` of that "
             "width per thread and program; unmasked = no predicate = the body). Variant ids: "
             "arch, x dtype, term dtypes (`t_`), output dtypes (`o_`; one output of x's dtype "
             "is the in-place update), direction, coefficient rows (shared, long: per-sample rows "
             "of at least 4096 elements, short: shorter ones), BLOCK x warps, `-unaligned` for "
             "operands not 16-byte aligned (the fallback). Shared memory appears only where "
             "outputs of different widths meet (a register layout conversion). Checked by "
             "tests/test_codegen.py.", "",
             "CUDA C++: `lincomb_rows_kernel<CT, M, P>` (compute dtype, outputs, pack length; P = "
             "1 is the scalar rows kernel, `_heavy` the variants given all the registers they "
             "need) and `lincomb_strided_kernel<CT, M>`; every operand dtype is read at run time, "
             "so a kernel's PTX holds one branch per operand slot and dtype: its vector accesses "
             "are those of all branches (x and the outputs 128 bits, a term narrower than 16 "
             "bytes per pack in one access of its pack). Checked by tests/test_codegen.py.", "",
             "## CUDA C++ kernels (ptxas -v, PTX)", ""]
    lines += cuda_table(cuda) if cuda else ["nvcc not found: not compiled."]
    lines += ["", f"## Triton variants ({len(triton['variants'])})", "", *triton_table(triton)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


if __name__ == "__main__":
    sys.exit(main())
