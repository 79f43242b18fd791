# Section of bench/gpu_check.sh for issue 10 items 1-3 (fused AdamW, grad norm/clip, gradient-accumulation fusion);
# sourced by it after its own sections (uses its `section`, $PY and $OUT; the extension is built by setup-build).
# The CUDA tests of these kernels (cuBLAS wgrad_gemm_accum vs fp64 GEMM + add for fp32/bf16/fp16 inputs and
# fp32/bf16 main_grad, strided and 3-D inputs; FusedAdamW vs foreach AdamW over 5 steps and old-state loading;
# multi-tensor norm/scale vs megatron's fallbacks) carry "cuda" in their ids, so gpu_check.sh's cuda-tests section
# runs them. Writes one file: $OUT/optimizer_kernels.jsonl.
#   optimizer-kernels  bench/optimizer_kernels.py: AdamW step, grad norm + clip (ms and host reads) and the wgrad
#                      GEMMs at 7B shapes, ours vs what megatron uses without apex/TE
#                      (docs/benchmarks.md "Optimizer step and gradient-accumulation fusion")
section optimizer-kernels 60 bash -c "LIBRA_REQUIRE_EXTENSION=1 $PY bench/optimizer_kernels.py --device cuda \
    --layers 4 | tee /dev/stderr | grep '^{' > '$OUT/optimizer_kernels.jsonl'"
