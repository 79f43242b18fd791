# Section of bench/gpu_check.sh for issue 10 items 1-3 (fused AdamW, grad norm/clip, gradient-accumulation fusion);
# sourced by it after its own sections:
#   [ -f bench/gpu_check_optimizer.sh ] && source bench/gpu_check_optimizer.sh
# Uses gpu_check.sh's `section`, $PY and $OUT (the extension must already be built with CUDA: setup-build).
# Writes one file: $OUT/optimizer_kernels.jsonl.
#   optimizer-cuda-tests  the CUDA cases: cuBLAS wgrad_gemm_accum vs fp64 GEMM + add (fp32/bf16/fp16 inputs,
#                         fp32/bf16 main_grad, strided and 3-D inputs), FusedAdamW vs foreach AdamW (5 steps) and
#                         old-state loading on CUDA, multi-tensor norm/scale vs megatron's fallbacks on CUDA
#   optimizer-kernels     bench/optimizer_kernels.py: AdamW step, grad norm + clip (ms and host reads) and the
#                         wgrad GEMMs at 7B shapes, fused vs what megatron uses without apex/TE
#                         (docs/benchmarks.md "Optimizer step and gradient-accumulation fusion")
section optimizer-cuda-tests 90 env LIBRA_REQUIRE_EXTENSION=1 $PY -m pytest -q -p no:cacheprovider -rs \
    tests/ops/test_wgrad_accum.py tests/training/test_optimizer.py -k cuda
section optimizer-kernels 90 bash -c "$PY bench/optimizer_kernels.py --device cuda --layers 4 | tee /dev/stderr \
    | grep '^{' > '$OUT/optimizer_kernels.jsonl'"
