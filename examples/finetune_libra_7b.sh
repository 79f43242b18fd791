#!/usr/bin/env bash
# Libra-7B instruction tuning (stage 2, Libra-Chat recipe, docs/architecture.md#training-recipe) on megatron-core,
# multi-node torchrun, starting from a stage-1 pretraining checkpoint.
#
#   1. data (once; node 0 does it, other nodes wait for it):
#        INSTRUCT_JSON=llava_v1_5_mix665k.json  IMAGE_ROOT=/data/llava   (LLaVA-665K format: "image", "conversations")
#        -> tools/preprocess_images.py --input-format llava -> DATA_PATH.{bin,idx,json}
#      (vicuna_v1 template, loss on the assistant answers and their </s> only, images carry no loss;
#       docs/design.md "Data")
#   2. training, on every node:
#        NNODES=2 NODE_RANK=<0..1> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 \
#        PRETRAINED=checkpoints/libra-7b-pretrain IMAGE_TOKENIZER=/ckpt/libra-vision-tokenizer \
#        TOKENIZER_MODEL=/ckpt/llama-2-7b-chat/tokenizer.model INSTRUCT_JSON=... IMAGE_ROOT=... \
#        bash examples/finetune_libra_7b.sh
#   Plan on a CPU:  bash examples/finetune_libra_7b.sh --dry-run
#                   (meta-device build: layout, instruct-stage trainable parameters, memory per GPU)
#   Data only:      bash examples/finetune_libra_7b.sh --preprocess-only
# Extra arguments are passed on to pretrain_libra.py (and win over the ones below). Under SLURM see
# examples/pretrain_libra_7b.sbatch (the same srun wrapper runs this script with SCRIPT=finetune_libra_7b.sh).
#
# Recipe: every LLM parameter trains (11,015,860,224); seq 2048 with packing (several conversations per row,
# block-diagonal causal attention, positions restart per sample); global batch 128; one epoch of LLaVA-665K is
# ~5.2K steps at one conversation per row, fewer rows with packing (TRAIN_ITERS); AdamW lr 2e-5 cosine to 0,
# warmup 5%, betas (0.9, 0.99), eps 1e-8, weight decay 0.01 (not on norms/biases), grad clip 1.0; bf16; seed 42.
# PRETRAINED is the stage-1 --save root (its latest iteration; weights only, fresh optimizer and schedule).
#
# Layout for 80 GB GPUs: TP=2 with sequence parallelism, PP=1, DP = GPUs / 2, micro-batch 2, distributed
# optimizer, no recompute. With all 11B parameters training, TP=1 would need 22 GB of bf16 weights + 44 GB of fp32
# grads before activations; TP=2 halves both (11.6 + 23.2 GB per GPU), the optimizer state is sharded over DP
# (8.7 GB at DP=8), activations at seq 2048 x 2 are ~13 GB: ~60 GB at 16 GPUs, ~69 GB at 8 (see --dry-run).
# GBS 128 = 2 x DP x micro-batches: DP must divide 64 (1, 2, 4 or 8 nodes of 8 GPUs).
set -euo pipefail
cd "${LIBRA_ROOT:-$(dirname "$0")/..}"
source examples/recipe_common.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((GPUS_PER_NODE * NNODES))

INSTRUCT_JSON=${INSTRUCT_JSON:-data/llava/llava_v1_5_mix665k.json}
IMAGE_ROOT=${IMAGE_ROOT:-$(dirname "$INSTRUCT_JSON")}
DATA_PATH=${DATA_PATH:-data/llava665k}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-checkpoints/llama-2-7b-chat/tokenizer.model}
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-checkpoints/libra-vision-tokenizer}
PRETRAINED=${PRETRAINED:-checkpoints/libra-7b-pretrain}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/libra-7b-instruct}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${CHECKPOINT_DIR}/tensorboard}
TRAIN_ITERS=${TRAIN_ITERS:-5200}
TP=${TP:-2}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-128}
PRECISION=${PRECISION---bf16}                  # PRECISION= (empty) trains in fp32 (CPU tests)
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-16}
PYTHON=${PYTHON:-python}

MODEL_ARGS=(
    --model libra-7b
    --stage instruct
    --seq-length 2048
    --image-tokenizer "$IMAGE_TOKENIZER"
)
[ -n "$PRECISION" ] && MODEL_ARGS+=("$PRECISION")
TRAINING_ARGS=(
    --micro-batch-size "$MICRO_BATCH_SIZE"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
    --train-iters "$TRAIN_ITERS"
    --lr 2e-5
    --min-lr 0.0
    --lr-decay-style cosine
    --lr-warmup-fraction 0.05
    "${LIBRA_ADAMW_ARGS[@]}"
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)
[ "$TP" -gt 1 ] && MODEL_PARALLEL_ARGS+=(--sequence-parallel)
DATA_ARGS=(
    --data-path "$DATA_PATH"
    --packing
    --data-cache-path "${CHECKPOINT_DIR}/data-cache"
    --num-workers "${NUM_WORKERS:-4}"
)
if [ -n "${EVAL_CAPTIONING:-}" ]; then   # zero-shot COCO captioning CIDEr every 500 steps (docs/design.md)
    DATA_ARGS+=(--eval-captioning "$EVAL_CAPTIONING" --eval-captioning-interval "${EVAL_CAPTIONING_INTERVAL:-500}"
                --eval-captioning-samples "${EVAL_CAPTIONING_SAMPLES:-64}" --eval-captioning-tokenizer "$TOKENIZER_MODEL")
fi
CHECKPOINT_ARGS=(
    --pretrained-checkpoint "$PRETRAINED"
    --load "$CHECKPOINT_DIR"
    --save "$CHECKPOINT_DIR"
    --save-interval "${SAVE_INTERVAL:-500}"
    --keep-last-checkpoints 3
)
LOGGING_ARGS=(
    --log-interval "${LOG_INTERVAL:-10}"
    --tensorboard-dir "$TENSORBOARD_DIR"
    --metrics-file "${CHECKPOINT_DIR}/metrics.jsonl"
)
ALL_ARGS=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
          "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}")

preprocess() {
    # resumable and atomic (tools/preprocess_images.py): a killed run picks up where it stopped
    "$PYTHON" tools/preprocess_images.py --input-format llava --input "$INSTRUCT_JSON" --image-root "$IMAGE_ROOT" \
        --output-prefix "$DATA_PATH" --tokenizer-model "$TOKENIZER_MODEL" --image-tokenizer "$IMAGE_TOKENIZER" \
        --workers "$PREPROCESS_WORKERS" ${PREPROCESS_ARGS:-}
}

libra_dry_run_if_asked "$@"
for arg in "$@"; do
    if [ "$arg" = "--preprocess-only" ]; then
        preprocess
        exit 0
    fi
done

if [ ! -f "${DATA_PATH}.json" ]; then      # the sidecar is written last: its presence means the data is complete
    if [ "$NODE_RANK" = "0" ]; then
        preprocess
    else
        echo "node $NODE_RANK: waiting for node 0 to preprocess ${DATA_PATH} ..."
        while [ ! -f "${DATA_PATH}.json" ]; do sleep 30; done
    fi
fi

libra_torchrun libra-7b-instruct "$@"
