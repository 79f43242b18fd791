#!/usr/bin/env bash
# GPU check of libra-megatron: ONE call on a machine with one H100/H200 (Python 3.12, a CUDA build of torch, nvcc).
#
#   bash bench/gpu_check.sh            # writes logs, JSON results and one profiler trace into $OUT (default /tmp/gpu_check)
#
# What it does, each section under its own time limit (the whole run stays under ~8 minutes):
#   setup      install carried wheels from .whl/ (megatron-core is usually missing on GPU images), build
#              libra_megatron._C with CUDA in place
#   cuda-tests pytest over every test whose name/marker mentions cuda, triton or gpu (they skip on CPU)
#   train-step bench/train_step.py --recipe 7b: Libra 7B and the dense LLaMA-7B, 32 layers, 4 x 5 micro-batches,
#              without and with --recompute-granularity full (forward-backward / optimizer / else / GPU idle,
#              TFLOP/s, peak memory vs the --dry-run estimate); keeps the Libra step's profiler trace
#   layer      bench/layer.py (one Libra layer vs a dense LLaMA layer)
#   <hooks>    other helpers append their sections at the end (see "SECTIONS OF OTHER ISSUES" below)
#
# Wheels to carry (no network on the GPU machine): from the repository root on a machine with network,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
# (.whl/ is git-ignored; carry it with the run). Any other missing dependency can be put there the same way (e.g.
# `ninja` for a parallel extension build: without it torch builds the extension file by file); everything in .whl/ is
# installed with --no-deps --no-index.
#
# Output ($OUT, at most 8 files of <= 16 MiB): gpu_check.log (every section's tail and verdict), cuda_tests.log,
# train_step.jsonl, libra_step.pt.trace.json.gz (Perfetto / TensorBoard), layer_issue11.log (or layer.jsonl) -- 5
# files; issue 12's section adds eval_throughput.jsonl; others may write at most 2 more.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SCRATCH=$(mktemp -d)
export PYTHONPATH=$REPO:${PYTHONPATH:-} CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PY OUT SCRATCH
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-500}  # seconds for all sections together (the device call allows 600)

# section NAME SECONDS COMMAND...: run COMMAND under min(SECONDS, what is left of BUDGET), full output to
# $SCRATCH/NAME.out, its tail and the verdict (ok / FAILED rc / TIMEOUT / SKIPPED) to $LOG. Never stops the script:
# later sections still run. Shell functions must be `export -f`-ed and run as `bash -c FUNCTION`.
section() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ $left -lt 20 ]; then echo "=== [$name] SKIPPED (time budget spent)" | tee -a "$LOG"; return 0; fi
    [ $limit -gt $left ] && limit=$left
    echo "=== [$name] $(date -u +%H:%M:%S) (+$(( $(date +%s) - START ))s) limit ${limit}s: $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" > "$SCRATCH/$name.out" 2>&1
    local rc=$?
    tail -n 40 "$SCRATCH/$name.out" >> "$LOG"
    if [ $rc -eq 0 ]; then verdict=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; else verdict="FAILED rc=$rc"; fi
    echo "=== [$name] $verdict after $(( $(date +%s) - START ))s" | tee -a "$LOG"
    return 0
}

{
    echo "libra-megatron GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    nvcc --version 2>&1 | tail -1
} > "$LOG" 2>&1

# ----------------------------------------------------------------------------------------------------- setup
install_wheels() {
    if ls .whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-deps --no-index .whl/*.whl || return 1
    fi
    $PY -c "import megatron.core" || { echo "megatron-core missing: carry its wheel in .whl/ (see the header)"; return 1; }
    $PY - <<'EOF'
import importlib
missing = [m for m in ("yaml", "sentencepiece", "safetensors", "transformers", "tensorboard", "PIL", "pytest")
           if importlib.util.find_spec(m) is None]
print("missing python modules (tests/benches needing them will fail):", missing or "none")
EOF
}
export -f install_wheels
section setup-wheels 60 bash -c install_wheels
section setup-build 180 $PY setup.py build_ext --inplace
section setup-import 30 $PY -c "import libra_megatron._C as C, torch; print('extension ok, cuda ops:', [n for n in dir(C) if 'cuda' in n.lower()])"

# ------------------------------------------------------------------------------------------------ cuda-tests
section cuda-tests 120 $PY -m pytest tests -q -p no:cacheprovider -k "cuda or triton or gpu" -rs
[ -f "$SCRATCH/cuda-tests.out" ] && cp "$SCRATCH/cuda-tests.out" "$OUT/cuda_tests.log"

# ------------------------------------------------------------------------------------------------ train-step
# The recipe step without recompute (keeps the Libra trace), then with full recompute (the memory estimate check).
train_step() {
    set -o pipefail
    local tag=$1
    shift
    $PY bench/train_step.py --recipe 7b --device cuda --warmup 2 --steps 3 --trace-dir "$SCRATCH/trace_$tag" "$@" \
        | tee "$SCRATCH/train_step_$tag.txt"
    grep '^{' "$SCRATCH/train_step_$tag.txt" >> "$OUT/train_step.jsonl"
}
export -f train_step
section train-step 150 bash -c "train_step plain"
section train-step-recompute 120 bash -c "train_step recompute -- --recompute-granularity full"
trace=$(ls "$SCRATCH"/trace_plain/train_step_libra-7b-*.pt.trace.json.gz 2>/dev/null | head -1)
if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -le $((16 * 1024 * 1024)) ]; then
    cp "$trace" "$OUT/libra_step.pt.trace.json.gz"
fi

# ----------------------------------------------------------------------------------------------------- layer
if [ -f bench/gpu_check_layer.sh ]; then  # issue 11's layer checks (Triton kernels, CUDA graphs, bench/layer.py)
    section layer-issue11 180 bash bench/gpu_check_layer.sh
else
    section layer 60 bash -c "$PY bench/layer.py --device cuda | tee /dev/stderr | grep '^{' > '$OUT/layer.jsonl'"
fi

# ---------------------------------------------------------------------------------- SECTIONS OF OTHER ISSUES
# Append below: `section NAME SECONDS COMMAND...` (output tail + verdict land in gpu_check.log). Keep the total under
# ~8 minutes (this script's own sections take ~6; raise BUDGET only with the device-time owner's agreement) and
# write at most 3 more files into $OUT. A section file of its own is sourced here (it may use `section`, $PY, $OUT).
[ -f bench/gpu_check_evaluation.sh ] && source bench/gpu_check_evaluation.sh   # issue 12: evaluation throughput (images/s)
[ -f bench/gpu_check_optimizer.sh ] && source bench/gpu_check_optimizer.sh     # issue 10 (1-3): optimizer kernels bench

echo "=== done in $(( $(date +%s) - START ))s; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
rm -rf "$SCRATCH"
