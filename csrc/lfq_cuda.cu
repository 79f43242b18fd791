// CUDA LFQ code packing (semantics in lfq_pack.h; PyTorch reference in libra_megatron/ops/lfq.py).
//
// Memory-bound: the kernel reads rows * codebooks * bits logits once and writes rows * codebooks ids.
// Each block stages its contiguous slice of logits in shared memory with coalesced 16-byte loads (or element
// loads when the slice is not 16-byte aligned), then each thread packs one row from shared memory and writes its
// ids; consecutive threads write consecutive patches of each codebook plane, so the stores coalesce too.
// Rows wider than kMaxStagedRowBytes skip the staging and read global memory directly.
#include "lfq_pack.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxStagedRowBytes = 192;  // 256 rows * 192 B = 48 KiB of shared memory

__device__ __forceinline__ float bf16_to_float(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }

__device__ __forceinline__ float half_to_float(uint16_t bits) {
  // Exact IEEE binary16 -> binary32 conversion, without cuda_fp16.h.
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
  return sign ? -magnitude : magnitude;
}

// bit = (u > 0) for element i of a row held at `row` (shared or global memory).
template <libra::LfqDtype kType>
__device__ __forceinline__ uint64_t sign_bit(const void* row, int64_t i, const void* bias) {
  if constexpr (kType == libra::LfqDtype::kFloat32) {
    const float x = static_cast<const float*>(row)[i];
    return (bias ? x + static_cast<const float*>(bias)[i] : x) > 0.0f;
  } else if constexpr (kType == libra::LfqDtype::kFloat64) {
    const double x = static_cast<const double*>(row)[i];
    return (bias ? x + static_cast<const double*>(bias)[i] : x) > 0.0;
  } else {
    const uint16_t raw = static_cast<const uint16_t*>(row)[i];
    if (bias == nullptr) {  // positive <=> 1 <= raw <= +inf bits
      constexpr uint16_t inf_bits = kType == libra::LfqDtype::kFloat16 ? 0x7C00u : 0x7F80u;
      return static_cast<uint16_t>(raw - 1u) < inf_bits;
    }
    const float x = kType == libra::LfqDtype::kFloat16 ? half_to_float(raw) : bf16_to_float(raw);
    return (x + static_cast<const float*>(bias)[i]) > 0.0f;
  }
}

template <libra::LfqDtype kType, bool kStaged>
__global__ void __launch_bounds__(kThreads) lfq_pack_kernel(libra::LfqPackArgs a, int64_t elem_bytes) {
  extern __shared__ __align__(16) unsigned char staged[];
  const int64_t rows = a.images * a.patches;
  const int64_t width = a.codebooks * a.bits;
  const int64_t row_bytes = width * elem_bytes;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t block_rows = rows - first_row < kThreads ? rows - first_row : kThreads;
  const unsigned char* src = static_cast<const unsigned char*>(a.logits) + first_row * row_bytes;

  const void* row_ptr;
  if constexpr (kStaged) {
    const int64_t bytes = block_rows * row_bytes;
    if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0 && (bytes & 15) == 0) {
      const uint4* from = reinterpret_cast<const uint4*>(src);
      uint4* to = reinterpret_cast<uint4*>(staged);
      for (int64_t i = threadIdx.x; i < bytes / 16; i += kThreads) to[i] = __ldg(from + i);
    } else if (elem_bytes == 2) {
      const uint16_t* from = reinterpret_cast<const uint16_t*>(src);
      uint16_t* to = reinterpret_cast<uint16_t*>(staged);
      for (int64_t i = threadIdx.x; i < bytes / 2; i += kThreads) to[i] = from[i];
    } else {  // 4- and 8-byte elements are at least 4-byte aligned
      const uint32_t* from = reinterpret_cast<const uint32_t*>(src);
      uint32_t* to = reinterpret_cast<uint32_t*>(staged);
      for (int64_t i = threadIdx.x; i < bytes / 4; i += kThreads) to[i] = from[i];
    }
    __syncthreads();
    row_ptr = staged + threadIdx.x * row_bytes;
  } else {
    row_ptr = src + threadIdx.x * row_bytes;
  }
  if (threadIdx.x >= block_rows) return;

  const int64_t r = first_row + threadIdx.x;
  const int64_t n = r / a.patches;
  const int64_t p = r - n * a.patches;
  int64_t* dst = a.out + n * a.image_stride + p * a.patch_stride + a.first_patch;
  for (int64_t c = 0; c < a.codebooks; ++c) {
    uint64_t id = 0;
    for (int64_t k = 0; k < a.bits; ++k) {
      const int64_t i = c * a.bits + k;
      id = (id << 1) | sign_bit<kType>(row_ptr, i, a.bias);
    }
    dst[c * a.plane_stride] = static_cast<int64_t>(id) + a.offset;
  }
  if (a.special) {
    int64_t* span = a.out + n * a.image_stride;
    for (int64_t c = 0; c < a.codebooks; ++c) {
      if (p == 0) span[c * a.plane_stride] = a.boi;
      if (p == a.patches - 1) span[c * a.plane_stride + a.patches + 1] = a.eoi;
    }
  }
}

template <libra::LfqDtype kType>
cudaError_t launch(const libra::LfqPackArgs& a, cudaStream_t stream) {
  const int64_t rows = a.images * a.patches;
  const int64_t elem_bytes = kType == libra::LfqDtype::kFloat64 ? 8 : kType == libra::LfqDtype::kFloat32 ? 4 : 2;
  const int64_t row_bytes = a.codebooks * a.bits * elem_bytes;
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  if (row_bytes <= kMaxStagedRowBytes) {
    const size_t shared = static_cast<size_t>(kThreads * row_bytes);
    lfq_pack_kernel<kType, true><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(a, elem_bytes);
  } else {
    lfq_pack_kernel<kType, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, elem_bytes);
  }
  return cudaGetLastError();
}

}  // namespace

namespace libra {

const char* lfq_pack_cuda(const LfqPackArgs& args, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t status = cudaSuccess;
  switch (args.dtype) {
    case LfqDtype::kFloat32: status = launch<LfqDtype::kFloat32>(args, s); break;
    case LfqDtype::kFloat64: status = launch<LfqDtype::kFloat64>(args, s); break;
    case LfqDtype::kFloat16: status = launch<LfqDtype::kFloat16>(args, s); break;
    case LfqDtype::kBFloat16: status = launch<LfqDtype::kBFloat16>(args, s); break;
  }
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace libra
