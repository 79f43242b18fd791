#!/usr/bin/env bash
# Libra-7B pretraining (Libra-Base recipe, docs/architecture.md#training-recipe) on megatron-core, multi-node torchrun.
#
#   On every node:  NNODES=8 MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 \
#                   DATA_PATH=/data/laion IMAGE_TOKENIZER=/ckpt/libra-vision-tokenizer \
#                   PRETRAINED=/ckpt/llama-2-7b-chat-libra-engine  bash examples/pretrain_libra_7b.sh
#   Plan on a CPU:  bash examples/pretrain_libra_7b.sh --dry-run
#                   (meta-device build: resolved layout, parameters per rank, memory estimate per GPU)
# Extra arguments are passed on to pretrain_libra.py (and win over the ones below).
#
# Recipe (reference libra_pretrain.yaml): LLaMA frozen, only the vision parameters train (4,277,444,608 of
# 11,015,860,224); seq 700; global batch 1280; 40k steps (51.2M samples); AdamW lr 1e-4, betas (0.9, 0.99),
# eps 1e-8, weight decay 0.01 (not on norms/biases), cosine to 0 with 5% warmup; grad clip 1.0; bf16; seed 42.
# PRETRAINED is LLaMA-2-7B-chat converted to an engine checkpoint with the vision parameters initialised
# (tools/convert_checkpoint.py hf-llama -> engine); IMAGE_TOKENIZER is the frozen CLIP/LFQ tokenizer that also
# tokenised DATA_PATH (tools/preprocess_images.py). Optional VALID_DATA_PATH (e.g. COCO-Karpathy val, preprocessed
# the same way): validation loss every 200 steps over 10 global batches, as the reference evaluated.
#
# Parallel layout for 80 GB GPUs (A100/H100-80GB; H200 has more room): TP=1, PP=1, DP = all GPUs, micro-batch 4,
# distributed optimizer, no activation recompute. Why (numbers from --dry-run, 64 GPUs):
#   - The model is 11.0B parameters but only 4.28B train. Per GPU: bf16 weights 20.5 GB + fp32 grad buffer of
#     the trainable parameters 15.9 GB; the fp32 master copy + Adam moments (51 GB in all) are sharded over DP by
#     the distributed optimizer (0.8 GB at DP=64, 6.4 GB at DP=8). Everything fits on one GPU without TP or PP,
#     so no tensor/pipeline communication and no pipeline bubble.
#   - Activations at seq 700 x micro-batch 4 without recompute are ~18 GB (32 layers); peak ~58 GB at DP=64,
#     ~64 GB at DP=8, leaving headroom for the estimate's error. Recompute is avoided on purpose: re-running the
#     forward costs 2N more per token on top of 6N (image tokens, trainable expert) or 4N (text, frozen), ~35%
#     more compute per step for memory this layout does not need.
#   - GBS 1280 = micro-batch 4 x DP x micro-batches: DP must divide 320 (8, 16, 32, 40, 64, 80, ... GPUs);
#     at 64 GPUs that is 5 micro-batches per step (the reference: 8 x 4 accumulation x 40 GPUs).
#   - If a GPU has less memory, or for the instruct stage (seq 2048, all 11B parameters train): TP=2 with
#     --sequence-parallel halves weights, grads and activations per GPU; --recompute-granularity selective|full
#     trades compute for activation memory. Check any change with --dry-run first.
set -euo pipefail
cd "${LIBRA_ROOT:-$(dirname "$0")/..}"
source examples/recipe_common.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

DATA_PATH=${DATA_PATH:-data/laion}
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-checkpoints/libra-vision-tokenizer}
PRETRAINED=${PRETRAINED:-checkpoints/llama-2-7b-chat-libra-engine}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/libra-7b-pretrain}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${CHECKPOINT_DIR}/tensorboard}
PYTHON=${PYTHON:-python}

MODEL_ARGS=(
    --model libra-7b
    --stage pretrain
    --seq-length 700
    --bf16
    --image-tokenizer "$IMAGE_TOKENIZER"
)
TRAINING_ARGS=(
    --micro-batch-size 4
    --global-batch-size 1280
    --train-iters 40000
    --lr 1e-4
    --min-lr 0.0
    --lr-decay-style cosine
    --lr-warmup-fraction 0.05
    "${LIBRA_ADAMW_ARGS[@]}"
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)
DATA_ARGS=(
    --data-path "$DATA_PATH"
    --data-cache-path "${CHECKPOINT_DIR}/data-cache"
    --num-workers 4
)
if [ -n "${VALID_DATA_PATH:-}" ]; then
    DATA_ARGS+=(--valid-data-path "$VALID_DATA_PATH" --eval-interval 200 --eval-iters 10)
fi
CHECKPOINT_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"
    --load "$CHECKPOINT_DIR"
    --save "$CHECKPOINT_DIR"
    --save-interval 1000
    --keep-last-checkpoints 3
)
LOGGING_ARGS=(
    --log-interval 10
    --tensorboard-dir "$TENSORBOARD_DIR"
    --metrics-file "${CHECKPOINT_DIR}/metrics.jsonl"
)
ALL_ARGS=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
          "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}")

libra_dry_run_if_asked "$@"

libra_torchrun libra-7b-pretrain "$@"
