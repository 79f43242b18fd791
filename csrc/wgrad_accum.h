// Weight-gradient GEMM accumulated in place: main_grad[out, in] += grad_output[N, out]^T . input[N, in].
// The launch description shared by the binding (wgrad_accum.cpp) and the cuBLAS call (wgrad_accum_cuda.cu).
// Plain C++ (no torch headers) so nvcc compiles the .cu file without ATen.
//
// Semantics (identical to libra_megatron.ops.wgrad_accum.wgrad_gemm_accum_reference):
//   main_grad = 1 * grad_output^T . input + 1 * main_grad      (beta = 1: no temporary, no separate add_)
// with products accumulated in fp32 whatever the storage type. Inputs are row-major with a unit inner stride
// and any row stride >= their width; main_grad is contiguous.
#pragma once

#include <cstdint>

namespace libra {

enum class WgradDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct WgradArgs {
  const void* input = nullptr;        // [rows, in_features], row stride input_stride, of input_dtype
  const void* grad_output = nullptr;  // [rows, out_features], row stride grad_stride, of input_dtype
  void* main_grad = nullptr;          // [out_features, in_features], contiguous, of grad_dtype
  WgradDtype input_dtype = WgradDtype::kFloat32;
  WgradDtype grad_dtype = WgradDtype::kFloat32;
  int64_t rows = 0;                   // the reduction length (tokens)
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t input_stride = 0;
  int64_t grad_stride = 0;
};

// Runs the GEMM with cuBLAS on `stream` (a cudaStream_t) of the current device. Returns nullptr on success,
// else a static description of the failure.
const char* wgrad_gemm_accum_cuda(const WgradArgs& args, void* stream);

}  // namespace libra
