#!/usr/bin/env bash
# GPU check of the trainer (one H100/H200): full training steps at 7B layer shapes, bf16, DDP + distributed
# optimizer, with and without overlap + full recompute, then a checkpoint save/resume on CUDA. JSON lines on stdout
# (and in $OUT/train_step.jsonl when $OUT is set). On an image without megatron-core, carry its wheel in
# .gpu_wheels/ (pip download megatron-core==0.19.2 --python-version 3.12 --only-binary=:all: --no-deps -d .gpu_wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import megatron.core" 2>/dev/null; then
    $PY -m pip install -q --no-deps --target /tmp/megatron_core .gpu_wheels/megatron_core-*.whl
    export PYTHONPATH=/tmp/megatron_core:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
OUT_FILE=${OUT:-/tmp}/train_step.jsonl
run() { $PY bench/train_step.py --device cuda "$@" 2>/tmp/bench_err.log | grep '^{' | tee -a "$OUT_FILE" || tail -30 /tmp/bench_err.log; }
run --model libra-7b --num-layers 4 --micro-batch-size 4 --num-microbatches 2 --steps 4
run --model libra-7b --num-layers 4 --micro-batch-size 4 --num-microbatches 2 --steps 4 -- --overlap-grad-reduce --overlap-param-gather
run --model libra-7b --num-layers 4 --micro-batch-size 8 --num-microbatches 2 --steps 4 -- --recompute-granularity full
# save at step 4, resume to step 6 on CUDA: the resumed losses must equal the uninterrupted ones
CK=/tmp/libra_ckpt; rm -rf $CK
run --model tiny --micro-batch-size 2 --num-microbatches 2 --steps 4 -- --save $CK --train-iters 6 --exit-interval 4
run --model tiny --micro-batch-size 2 --num-microbatches 2 --steps 4 -- --load $CK --save $CK --train-iters 6
run --model tiny --micro-batch-size 2 --num-microbatches 2 --steps 4 -- --train-iters 6
