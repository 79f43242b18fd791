# Section of bench/gpu_check.sh for issue 12 (evaluation); sourced by it after its own sections (uses its
# `section`, $PY and $OUT). Writes one file: $OUT/eval_throughput.jsonl.
#   eval-throughput  bench/eval_throughput.py: images/s of tools/evaluate.py's caption loop, 11B model (random
#                    weights), bf16, batch 16, 64 images after a warm-up batch (docs/benchmarks.md "Evaluation").
#                    Needs no pycocoevalcap (scoring is not timed); the metric tests run on CPU in `make test`.
section eval-throughput 150 $PY bench/eval_throughput.py --device cuda --config 11b --batch-size 16 --images 64 \
    --max-new-tokens 20 --output "$OUT/eval_throughput.jsonl"
