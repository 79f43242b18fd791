# Shared by the recipe scripts (examples/pretrain_libra_7b.sh, examples/finetune_libra_7b.sh); sourced, not run.
# A recipe sets its own arrays and values, then calls these. Nothing here changes a recipe's hyperparameters.

# AdamW and run-safety flags both Libra stages use (reference recipe): betas (0.9, 0.99), eps 1e-8, weight decay
# 0.01 (not on norms/biases), grad clip 1.0, seed 42, NaN steps skipped, save-and-exit on SIGTERM.
LIBRA_ADAMW_ARGS=(
    --weight-decay 0.01
    --adam-beta1 0.9
    --adam-beta2 0.99
    --adam-eps 1e-8
    --clip-grad 1.0
    --seed 42
    --on-nan skip
    --exit-signal-handler
)

# libra_dry_run_if_asked ARGS...: with --dry-run among ARGS, one CPU process plans the whole job (meta-device build:
# layout, parameters per rank, memory per GPU) and the script ends; no GPU, data or checkpoint is touched.
# Reads ALL_ARGS, PYTHON and WORLD_SIZE.
libra_dry_run_if_asked() {
    local arg
    for arg in "$@"; do
        if [ "$arg" = "--dry-run" ]; then
            exec "$PYTHON" pretrain_libra.py "${ALL_ARGS[@]}" --dry-run-world-size "$WORLD_SIZE" "$@"
        fi
    done
}

# libra_torchrun DEFAULT_RDZV_ID ARGS...: start pretrain_libra.py with ALL_ARGS then ARGS under torchrun.
# Fault tolerance (docs/design.md#training-faults): torchrun's elastic agent on every node meets the others at the
# c10d rendezvous endpoint (a TCP store hosted by the agent on MASTER_ADDR; no etcd), and when any rank or node dies
# it stops the whole group and restarts it, up to MAX_RESTARTS times. The restarted ranks resume from the newest
# complete checkpoint (--load), falling back past a broken one, so losses continue exactly. Node ranks are assigned
# by the rendezvous; RDZV_ID must be the same on every node and new for every job.
libra_torchrun() {
    local default_rdzv_id=$1
    shift
    export CUDA_DEVICE_MAX_CONNECTIONS=1  # TP/SP communication ordering (megatron-core layers.py)
    local distributed_args=(
        --nproc_per_node "$GPUS_PER_NODE"
        --nnodes "$NNODES"
        --rdzv-backend c10d
        --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"
        --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-$default_rdzv_id}}"
        --max-restarts "${MAX_RESTARTS:-3}"
    )
    exec "${TORCHRUN:-torchrun}" "${distributed_args[@]}" pretrain_libra.py "${ALL_ARGS[@]}" "$@"
}
