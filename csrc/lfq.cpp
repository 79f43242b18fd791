// LFQ code packing: projected LFQ logits -> per-codebook integer ids (sign bits, MSB first), optionally with a
// fused bias add, the image-id offset and the <boi>/<eoi> assembly of whole image spans. Semantics in lfq_pack.h;
// the PyTorch reference is libra_megatron.ops.lfq.
//
// CPU kernel: rows are split across threads (at::parallel_for, OpenMP in torch builds). Each thread takes blocks
// of rows through two passes:
//   1. sign test over the contiguous block into 0/1 bytes -- a branch-free loop the compiler vectorises
//      (float compare, or an integer range test on the raw bits of fp16/bf16: x > 0 <=> 1 <= bits <= +inf);
//   2. per row and codebook, 8 bytes at a time become 8 MSB-first bits with one multiply (gather trick below).
// CUDA kernel: lfq_cuda.cu, called under LIBRA_WITH_CUDA.
#include "registry.h"

#include "lfq_pack.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#ifdef LIBRA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

constexpr int64_t kBlockRows = 256;

// x holds bytes b0..b7 (b0 at the lowest address), each 0 or 1. Multiplying by 2^63 + 2^54 + ... + 2^0 puts
// b_j at bit 63 - j with no carries (all partial products land on distinct bits), so the top byte is
// b0 b1 ... b7, MSB first. Requires a little-endian load of the 8 bytes.
constexpr uint64_t kGatherBits = 0x8040201008040201ULL;

// `bits` must stay readable for 8 bytes past `count` (the block buffer is padded): every load is a fixed
// 8-byte load, masked to the bytes that belong to this codebook, so no variable-length memcpy is called.
inline uint64_t pack_msb_first(const uint8_t* bits, int64_t count) {
  uint64_t id = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  for (int64_t k = 0; k < count; ++k) id = (id << 1) | bits[k];
#else
  for (int64_t k = 0; k < count; k += 8) {
    const int64_t take = count - k < 8 ? count - k : 8;
    uint64_t word;
    std::memcpy(&word, bits + k, 8);
    if (take < 8) word &= (uint64_t{1} << (8 * take)) - 1;
    id = (id << take) | (((word * kGatherBits) >> 56) >> (8 - take));
  }
#endif
  return id;
}

// Pass 1 without bias: one 0/1 byte per element.
inline void sign_bits(const float* x, uint8_t* bits, int64_t count) {
  for (int64_t i = 0; i < count; ++i) bits[i] = x[i] > 0.0f;
}
inline void sign_bits(const double* x, uint8_t* bits, int64_t count) {
  for (int64_t i = 0; i < count; ++i) bits[i] = x[i] > 0.0;
}
// Raw IEEE half-width bits: positive (incl. +inf, excl. +-0 and NaN) <=> 1 <= bits <= inf_bits.
inline void sign_bits_raw16(const uint16_t* x, uint8_t* bits, int64_t count, uint16_t inf_bits) {
  for (int64_t i = 0; i < count; ++i) bits[i] = static_cast<uint16_t>(x[i] - 1u) < inf_bits;
}

// Conversions for the bias path (exact: every fp16/bf16 value is a float).
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

template <typename Load, typename Acc>
inline void sign_bits_bias(Load load, const Acc* bias, uint8_t* bits, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < width; ++k) {
      const int64_t i = r * width + k;
      bits[i] = (load(i) + bias[k]) > Acc(0);
    }
  }
}

// Pass 1 for a block of `rows` rows starting at element `start`.
void block_sign_bits(const libra::LfqPackArgs& a, int64_t start, int64_t rows, uint8_t* bits) {
  const int64_t width = a.codebooks * a.bits;
  const int64_t count = rows * width;
  switch (a.dtype) {
    case libra::LfqDtype::kFloat32: {
      const float* x = static_cast<const float*>(a.logits) + start;
      if (a.bias == nullptr) {
        sign_bits(x, bits, count);
      } else {
        sign_bits_bias([x](int64_t i) { return x[i]; }, static_cast<const float*>(a.bias), bits, rows, width);
      }
      break;
    }
    case libra::LfqDtype::kFloat64: {
      const double* x = static_cast<const double*>(a.logits) + start;
      if (a.bias == nullptr) {
        sign_bits(x, bits, count);
      } else {
        sign_bits_bias([x](int64_t i) { return x[i]; }, static_cast<const double*>(a.bias), bits, rows, width);
      }
      break;
    }
    case libra::LfqDtype::kFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(a.logits) + start;
      if (a.bias == nullptr) {
        sign_bits_raw16(x, bits, count, 0x7C00u);
      } else {
        sign_bits_bias([x](int64_t i) { return c10::detail::fp16_ieee_to_fp32_value(x[i]); },
                       static_cast<const float*>(a.bias), bits, rows, width);
      }
      break;
    }
    case libra::LfqDtype::kBFloat16: {
      const uint16_t* x = static_cast<const uint16_t*>(a.logits) + start;
      if (a.bias == nullptr) {
        sign_bits_raw16(x, bits, count, 0x7F80u);
      } else {
        sign_bits_bias([x](int64_t i) { return bf16_bits_to_float(x[i]); }, static_cast<const float*>(a.bias), bits,
                       rows, width);
      }
      break;
    }
  }
}

// Pass 2 for a block: pack each row's bytes into ids and store them. kBits > 0 fixes the bits per codebook at
// compile time (Libra's 9) so the packing unrolls; 0 reads it from the arguments.
template <int64_t kBits>
void store_block(const libra::LfqPackArgs& a, const uint8_t* bits, int64_t first_row, int64_t count) {
  const int64_t nbits = kBits > 0 ? kBits : a.bits;
  const int64_t width = a.codebooks * nbits;
  int64_t n = first_row / a.patches;
  int64_t p = first_row - n * a.patches;
  for (int64_t r = 0; r < count; ++r) {
    int64_t* dst = a.out + n * a.image_stride + p * a.patch_stride + a.first_patch;
    const uint8_t* row_bits = bits + r * width;
    for (int64_t c = 0; c < a.codebooks; ++c) {
      dst[c * a.plane_stride] = static_cast<int64_t>(pack_msb_first(row_bits + c * nbits, nbits)) + a.offset;
    }
    if (++p == a.patches) {
      p = 0;
      ++n;
    }
  }
}

void lfq_pack_cpu(const libra::LfqPackArgs& a) {
  const int64_t rows = a.images * a.patches;
  const int64_t width = a.codebooks * a.bits;
  // ~64 KiB of logits per task keeps the per-thread byte buffer in L1/L2 and amortises the fork.
  const int64_t grain = std::max<int64_t>(kBlockRows, (1 << 16) / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> bits(static_cast<size_t>(kBlockRows * width + 8));  // +8: see pack_msb_first
    for (int64_t block = begin; block < end; block += kBlockRows) {
      const int64_t count = std::min(kBlockRows, end - block);
      block_sign_bits(a, block * width, count, bits.data());
      if (a.bits == 9) {
        store_block<9>(a, bits.data(), block, count);
      } else {
        store_block<0>(a, bits.data(), block, count);
      }
    }
  });
  if (a.special) {
    for (int64_t c = 0; c < a.codebooks; ++c) {
      for (int64_t n = 0; n < a.images; ++n) {
        int64_t* span = a.out + c * a.plane_stride + n * a.image_stride;
        span[0] = a.boi;
        span[a.patches + 1] = a.eoi;
      }
    }
  }
}

libra::LfqDtype lfq_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return libra::LfqDtype::kFloat32;
    case at::kDouble: return libra::LfqDtype::kFloat64;
    case at::kHalf: return libra::LfqDtype::kFloat16;
    case at::kBFloat16: return libra::LfqDtype::kBFloat16;
    default: TORCH_CHECK(false, "lfq: logits must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Validates, prepares the bias in the accumulation type and runs the CPU or CUDA kernel.
void run_pack(libra::LfqPackArgs& a, const at::Tensor& logits, const std::optional<at::Tensor>& bias_in,
              at::Tensor& out) {
  a.dtype = lfq_dtype(logits);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->numel() == a.codebooks * a.bits, "lfq: bias must be [",
                a.codebooks * a.bits, "], got ", bias_in->sizes());
    TORCH_CHECK(bias_in->device() == logits.device(), "lfq: bias is on ", bias_in->device(), ", logits on ",
                logits.device());
    bias = bias_in->to(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    a.bias = bias.data_ptr();
  }
  a.logits = logits.data_ptr();
  a.out = out.data_ptr<int64_t>();
  if (a.images * a.patches == 0) return;
  if (logits.device().is_cpu()) {
    lfq_pack_cpu(a);
    return;
  }
#ifdef LIBRA_WITH_CUDA
  TORCH_CHECK(logits.device().is_cuda(), "lfq: unsupported device ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const char* error = libra::lfq_pack_cuda(a, c10::cuda::getCurrentCUDAStream(logits.device().index()).stream());
  TORCH_CHECK(error == nullptr, "lfq: CUDA kernel failed: ", error);
#else
  TORCH_CHECK(false, "lfq: libra_megatron._C was built without CUDA; tensor is on ", logits.device());
#endif
}

int64_t bits_per_codebook(const at::Tensor& logits, int64_t codebooks) {
  TORCH_CHECK(logits.dim() >= 1, "lfq: logits must have at least one dimension");
  TORCH_CHECK(codebooks > 0 && logits.size(-1) % codebooks == 0, "lfq: last dimension ", logits.size(-1),
              " is not divisible by codebooks=", codebooks);
  const int64_t bits = logits.size(-1) / codebooks;
  TORCH_CHECK(bits >= 1 && bits <= 62, "lfq: bits per codebook must be in [1, 62], got ", bits);
  return bits;
}

// [..., codebooks * D] -> [..., codebooks] ids.
at::Tensor lfq_codes(const at::Tensor& logits_in, int64_t codebooks, const std::optional<at::Tensor>& bias) {
  const int64_t bits = bits_per_codebook(logits_in, codebooks);
  const at::Tensor logits = logits_in.contiguous();
  auto out_sizes = logits.sizes().vec();
  out_sizes.back() = codebooks;
  at::Tensor out = at::empty(out_sizes, logits.options().dtype(at::kLong));
  libra::LfqPackArgs a;
  a.images = 1;
  a.patches = logits.numel() / logits.size(-1);
  a.codebooks = codebooks;
  a.bits = bits;
  a.plane_stride = 1;
  a.patch_stride = codebooks;
  run_pack(a, logits, bias, out);
  return out;
}

// [N, P, codebooks * D] -> [codebooks, N, P] ids + offset, or [codebooks, N, P + 2] with <boi>/<eoi>.
at::Tensor lfq_image_ids(const at::Tensor& logits_in, int64_t codebooks, const std::optional<at::Tensor>& bias,
                         int64_t offset, std::optional<int64_t> boi, std::optional<int64_t> eoi) {
  TORCH_CHECK(logits_in.dim() == 3, "lfq_image_ids: logits must be [images, patches, codebooks * bits], got ",
              logits_in.sizes());
  TORCH_CHECK(boi.has_value() == eoi.has_value(), "lfq_image_ids: give both boi and eoi, or neither");
  const int64_t bits = bits_per_codebook(logits_in, codebooks);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t images = logits.size(0), patches = logits.size(1);
  const bool special = boi.has_value();
  const int64_t span = patches + (special ? 2 : 0);
  at::Tensor out = at::empty({codebooks, images, span}, logits.options().dtype(at::kLong));
  libra::LfqPackArgs a;
  a.images = images;
  a.patches = patches;
  a.codebooks = codebooks;
  a.bits = bits;
  a.plane_stride = images * span;
  a.image_stride = span;
  a.patch_stride = 1;
  a.first_patch = special ? 1 : 0;
  a.offset = offset;
  a.special = special;
  a.boi = special ? *boi : 0;
  a.eoi = special ? *eoi : 0;
  if (patches == 0 && special && images > 0) {  // spans of only <boi><eoi>: no rows to pack
    out.select(2, 0).fill_(a.boi);
    out.select(2, 1).fill_(a.eoi);
    return out;
  }
  run_pack(a, logits, bias, out);
  return out;
}

void register_lfq(pybind11::module_& m) {
  m.def("lfq_codes", &lfq_codes, "LFQ sign bits -> ids per codebook (MSB first), optional fused bias add",
        pybind11::arg("logits"), pybind11::arg("codebooks"), pybind11::arg("bias") = pybind11::none());
  m.def("lfq_image_ids", &lfq_image_ids,
        "LFQ logits [N, P, C*D] -> ids [C, N, P] (+offset), or [C, N, P+2] with <boi>/<eoi>",
        pybind11::arg("logits"), pybind11::arg("codebooks"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("offset") = 0, pybind11::arg("boi") = pybind11::none(),
        pybind11::arg("eoi") = pybind11::none());
}

}  // namespace

LIBRA_REGISTER_OPS(register_lfq);
