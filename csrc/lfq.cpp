// LFQ code packing: projected LFQ logits -> per-codebook integer ids (sign bits, MSB first).
//
// Semantics (identical to libra_megatron.ops.lfq.lfq_codes_reference):
//   bit_k = (u_k > 0)   -- NaN, +0.0 and -0.0 all give 0 (IEEE ordered comparison)
//   id_c  = sum_k bit_{c,k} * 2^(D-1-k)
#include "registry.h"

#include <ATen/Parallel.h>

namespace {

template <typename scalar_t>
void pack_codes_cpu(const scalar_t* u, int64_t* ids, int64_t rows, int64_t codebooks, int64_t bits) {
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = u + r * codebooks * bits;
      for (int64_t c = 0; c < codebooks; ++c) {
        int64_t id = 0;
        for (int64_t k = 0; k < bits; ++k) {
          id = (id << 1) | (static_cast<float>(row[c * bits + k]) > 0.0f ? 1 : 0);
        }
        ids[r * codebooks + c] = id;
      }
    }
  });
}

at::Tensor lfq_codes(const at::Tensor& logits, int64_t codebooks) {
  TORCH_CHECK(logits.dim() >= 1, "lfq_codes: logits must have at least one dimension");
  TORCH_CHECK(codebooks > 0 && logits.size(-1) % codebooks == 0,
              "lfq_codes: last dimension ", logits.size(-1), " is not divisible by codebooks=", codebooks);
  const int64_t bits = logits.size(-1) / codebooks;
  TORCH_CHECK(bits >= 1 && bits <= 62, "lfq_codes: bits per codebook must be in [1, 62], got ", bits);
  TORCH_CHECK(logits.device().is_cpu(), "lfq_codes (CPU kernel): expected a CPU tensor");
  auto u = logits.contiguous();
  auto out_sizes = u.sizes().vec();
  out_sizes.back() = codebooks;
  auto ids = at::empty(out_sizes, u.options().dtype(at::kLong));
  const int64_t rows = u.numel() / u.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lfq_codes", [&] {
    pack_codes_cpu<scalar_t>(u.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), rows, codebooks, bits);
  });
  return ids;
}

void register_lfq(pybind11::module_& m) {
  m.def("lfq_codes", &lfq_codes, "LFQ sign bits -> ids per codebook (MSB first)", pybind11::arg("logits"),
        pybind11::arg("codebooks"));
}

}  // namespace

LIBRA_REGISTER_OPS(register_lfq);
