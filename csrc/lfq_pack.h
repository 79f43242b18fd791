// LFQ code packing: the launch description shared by the CPU kernel (lfq.cpp) and the CUDA kernel (lfq_cuda.cu).
// Plain C++ (no torch headers) so nvcc compiles lfq_cuda.cu without ATen.
//
// Semantics (identical to libra_megatron.ops.lfq.lfq_codes_reference):
//   u_k   = logits_k                    (no bias)
//   u_k   = acc(logits_k) + bias_k      (bias; acc = float, or double for float64 logits)
//   bit_k = (u_k > 0)                   NaN, +0.0 and -0.0 give 0; +inf gives 1
//   id_c  = sum_k bit_{c,k} * 2^(D-1-k) (most significant bit first), plus `offset`
// Row r = n * patches + p of the [rows, codebooks * bits] logits writes id_c to
//   out[c * plane_stride + n * image_stride + p * patch_stride + first_patch]
// and, when `special` is set, `boi` at out[c * plane_stride + n * image_stride] and `eoi` right after the
// last patch of each image (the Libra <boi> codes... <eoi> span; LibraVocab semantics).
#pragma once

#include <cstdint>

namespace libra {

enum class LfqDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct LfqPackArgs {
  const void* logits = nullptr;  // [rows, codebooks * bits], contiguous, of `dtype`
  const void* bias = nullptr;    // [codebooks * bits] float (double for kFloat64), or nullptr
  LfqDtype dtype = LfqDtype::kFloat32;
  int64_t images = 0;            // rows = images * patches
  int64_t patches = 0;
  int64_t codebooks = 0;
  int64_t bits = 0;              // bits per codebook, 1..62
  int64_t plane_stride = 0;
  int64_t image_stride = 0;
  int64_t patch_stride = 0;
  int64_t first_patch = 0;
  int64_t offset = 0;
  bool special = false;
  int64_t boi = 0;
  int64_t eoi = 0;
  int64_t* out = nullptr;
};

// Launches the CUDA kernel on `stream` (a cudaStream_t). Returns nullptr on success, else the CUDA error text.
const char* lfq_pack_cuda(const LfqPackArgs& args, void* stream);

}  // namespace libra
