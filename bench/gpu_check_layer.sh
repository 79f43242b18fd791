#!/usr/bin/env bash
# GPU checks of the Libra layer (issue 11), one H100/H200, < 3 minutes: the "layer-issue11" section of
# bench/gpu_check.sh (180 s), or alone. The CUDA tests of tests/model (Triton kernels vs references, CUDA-graph
# replay vs eager) run in gpu_check.sh's cuda-tests section. Writes $OUT/layer_issue11.log:
#   1. every Triton kernel of the layer and a whole layer with them against the PyTorch references on CUDA, fp32 and
#      bf16, values and gradients (tests/model/fused_kernel_checks.py);
#   2. bench/layer.py --device cuda: dense frozen layer vs Libra (segment plan, index plan, segment plan as CUDA
#      graphs) in one run: device and host ms per step, the warm routing build time;
#   3. the same with --profile: the kernel table of the Libra layer (what bounds it if 1.10x is not reached).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/layer_issue11.log
export PYTHONPATH=$PWD:${PYTHONPATH:-} CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name $(date -u +%H:%M:%S) limit ${limit}s: $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/.layer_step.out" 2>&1
    local rc=$?
    grep -v "UserWarning\|warnings.warn" "$OUT/.layer_step.out" | tail -n 70 | tee -a "$LOG"
    echo "=== $name rc=$rc" | tee -a "$LOG"
    rm -f "$OUT/.layer_step.out"
}
step kernels 40 $PY tests/model/fused_kernel_checks.py cuda
step layer 80 $PY bench/layer.py --device cuda --iters 20 --warmup 5 --cases dense_frozen,libra,libra_index,libra_graphed
step layer-profile 45 $PY bench/layer.py --device cuda --iters 5 --warmup 3 --cases dense_frozen,libra --profile -
