# Section of bench/gpu_check.sh for issue 12 (evaluation); sourced by it after its own sections:
#   [ -f bench/gpu_check_evaluation.sh ] && source bench/gpu_check_evaluation.sh
# Uses gpu_check.sh's `section`, $PY and $OUT. Writes one file: $OUT/eval_throughput.jsonl.
#   eval-throughput  bench/eval_throughput.py: images/s of tools/evaluate.py's caption loop, 11B model (random
#                    weights), bf16, batch 16, 64 images after a warm-up batch (docs/benchmarks.md "Evaluation")
#   eval-tests       the metric tests (pycocoevalcap present on the GPU image?)
section eval-throughput 240 $PY bench/eval_throughput.py --device cuda --config 11b --batch-size 16 --images 64 \
    --max-new-tokens 20 --output "$OUT/eval_throughput.jsonl"
section eval-tests 120 $PY -m pytest -x -q tests/evaluation/test_scoring.py
