#!/usr/bin/env bash
# The GPU proof in one command, on a bare NVIDIA machine with torch, triton and nvcc installed:
# builds the CUDA extension, runs the whole test suite on the GPU, runs the op, scheduler,
# fused-scheduler, batched and reversible-gradient benchmarks, and writes every log and result to
# OUT_DIR.
#
#   bash bench/run_gpu.sh OUT_DIR
#
# Needs the `ninja` package for the JIT build, and diffusers + transformers for the diffusers
# tests and the scheduler benchmark (without them those parts are reported as skipped). Copy the
# committed-quality files from OUT_DIR into bench/results/ afterwards.
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
    date -Is
    nvidia-smi || true
    python -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name())"
    nvcc --version | tail -2
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember failures
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$out/$name.log"
    echo "== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}

step build python -m belm_kernels.cli build
step backends python -m belm_kernels.cli backends
step pytest python -m pytest -q -rs
step bench_ops python bench/bench_ops.py --device cuda --out-dir "$out"
if python -c "import diffusers" 2>/dev/null; then
    step bench_scheduler python bench/bench_scheduler.py --device cuda --out-dir "$out"
    step bench_fused python bench/bench_fused.py --device cuda --out-dir "$out"
else
    echo "== bench_scheduler, bench_fused: skipped (diffusers is not installed)" \
        | tee "$out/bench_scheduler.log"
fi
step bench_batched python bench/bench_batched.py --device cuda --out-dir "$out" \
    $(python -c "import diffusers" 2>/dev/null || echo --no-unet)
step bench_reversible python bench/bench_reversible.py --device cuda --out-dir "$out" \
    $(python -c "import diffusers" 2>/dev/null || echo --no-unet)
step demo python -m belm_kernels.cli demo --device cuda

echo "logs and results in $out"
exit $status
