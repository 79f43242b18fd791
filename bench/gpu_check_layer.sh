#!/usr/bin/env bash
# GPU checks of the Libra layer (issue 11), one H100/H200, ~2-3 minutes. Run alone or as the "layer-issue11" section
# of bench/gpu_check.sh. Writes $OUT/layer_issue11.log (and the JSON lines of bench/layer.py to stdout):
#   1. every Triton kernel of the layer (attention inputs, SwiGLU, RoPE) against its PyTorch reference on CUDA,
#      fp32 and bf16, values and gradients (tests/model/fused_kernel_checks.py);
#   2. the CUDA-graph replay of the layers equals the eager step (tests/model/test_cuda_graphs.py) and the other
#      CUDA tests of tests/model;
#   3. bench/layer.py --device cuda: dense frozen layer vs Libra (segment and index plans, and the segment plan as
#      CUDA graphs) in one run, with host vs device time per step and the warm routing build time; then with
#      --profile for the kernel table of the Libra layer;
#   4. bench/layer_ops.py (device-independent op counts, for the record next to the timings).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/layer_issue11.log
export PYTHONPATH=$PWD:${PYTHONPATH:-} CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
step() { echo "=== $1 $(date -u +%H:%M:%S)" | tee -a "$LOG"; shift; timeout --kill-after=10 "$@" 2>&1 | tail -n 60 | tee -a "$LOG"; echo "=== rc=${PIPESTATUS[0]}" | tee -a "$LOG"; }
step kernels 120 $PY tests/model/fused_kernel_checks.py cuda
step cuda-tests 240 $PY -m pytest tests/model -q -p no:cacheprovider -k "cuda or triton" -rs
step layer 240 $PY bench/layer.py --device cuda --iters 20 --warmup 5 --cases dense_frozen,libra,libra_index,libra_graphed
step layer-profile 120 $PY bench/layer.py --device cuda --iters 5 --warmup 3 --cases dense_frozen,libra --profile -
step layer-ops 120 $PY bench/layer_ops.py
