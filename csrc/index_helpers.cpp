// Dataset index builders: keyed permutation (shuffle), packing plan (sample index), blending indices.
//
// Semantics are defined by the pure-Python references in libra_megatron/ops/index_helpers.py; the tests
// check that both produce identical arrays. Summary:
//
//   index_permutation(n, key)  -> int64[n]
//       perm[i] = cycle-walked 6-round Feistel network on [0, 2^(2h)) (2^(2h) >= n, h >= 1), round
//       function F_r(x) = mix64(x ^ k_r) & (2^h - 1), k_r = mix64(key + (r+1) * GOLDEN). A bijection of
//       [0, n), computed independently per element (parallel, O(n), no sort).
//
//   pack_documents(lengths, capacity, max_open) -> (bin_offsets int64[B+1], bin_items int64[n])
//       Documents are taken in input order. Each (length clipped to capacity) goes into the open bin with
//       the least remaining space that still fits it (ties: the earliest opened). If none fits, a new bin
//       opens; when max_open bins are open, the earliest opened is emitted first. A bin that becomes
//       exactly full is emitted at once; at the end the open bins are emitted in opening order.
//
//   blending_indices(weights, size) -> (dataset_index int16[size], dataset_sample_index int64[size])
//       Greedy "largest error first": sample i goes to argmax_d (w_d * max(i, 1) - taken_d) (first on ties).
//       Same semantics as megatron-core's helpers.build_blending_indices (weights already normalised).
#include "registry.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int kFeistelRounds = 6;

inline uint64_t mix64(uint64_t x) {
  // splitmix64 finaliser (a bijection on 64-bit words).
  x += kGolden;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

struct Feistel {
  int half_bits;
  uint64_t mask;
  uint64_t keys[kFeistelRounds];

  Feistel(int64_t n, uint64_t key) {
    int bits = 0;
    while (bits < 63 && (uint64_t{1} << bits) < static_cast<uint64_t>(n)) ++bits;  // 2^bits >= n
    if (bits < 2) bits = 2;
    if (bits % 2) ++bits;
    half_bits = bits / 2;
    mask = (uint64_t{1} << half_bits) - 1;
    for (int r = 0; r < kFeistelRounds; ++r) keys[r] = mix64(key + static_cast<uint64_t>(r + 1) * kGolden);
  }

  inline uint64_t encrypt(uint64_t x) const {
    uint64_t left = x >> half_bits;
    uint64_t right = x & mask;
    for (int r = 0; r < kFeistelRounds; ++r) {
      const uint64_t next = left ^ (mix64(right ^ keys[r]) & mask);
      left = right;
      right = next;
    }
    return (left << half_bits) | right;
  }
};

at::Tensor index_permutation(int64_t n, uint64_t key) {
  TORCH_CHECK(n >= 0, "index_permutation: n must be >= 0, got ", n);
  TORCH_CHECK(n < (int64_t{1} << 62), "index_permutation: n too large: ", n);
  auto out = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  if (n == 0) return out;
  int64_t* perm = out.data_ptr<int64_t>();
  if (n == 1) {
    perm[0] = 0;
    return out;
  }
  const Feistel feistel(n, key);
  const uint64_t limit = static_cast<uint64_t>(n);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t y = feistel.encrypt(static_cast<uint64_t>(i));
      while (y >= limit) y = feistel.encrypt(y);
      perm[i] = static_cast<int64_t>(y);
    }
  });
  return out;
}

template <typename length_t>
std::tuple<at::Tensor, at::Tensor> pack_documents_impl(const length_t* lengths, int64_t n, int64_t capacity,
                                                        int64_t max_open) {
  // Open bins keyed by (remaining space, opening sequence number): lower_bound(length) is the best fit.
  std::set<std::pair<int64_t, int64_t>> by_space;
  std::set<int64_t> open_order;                       // opening sequence numbers of open bins
  std::vector<int64_t> remaining_of;                  // per opening sequence number
  std::vector<std::vector<int64_t>> items_of;         // per opening sequence number (cleared on emit)
  std::vector<int64_t> offsets{0};
  std::vector<int64_t> items;
  offsets.reserve(static_cast<size_t>(n) + 1);
  items.reserve(static_cast<size_t>(n));

  auto emit = [&](int64_t seq) {
    by_space.erase({remaining_of[seq], seq});
    open_order.erase(seq);
    auto& bin = items_of[seq];
    items.insert(items.end(), bin.begin(), bin.end());
    offsets.push_back(static_cast<int64_t>(items.size()));
    std::vector<int64_t>().swap(bin);
  };

  for (int64_t doc = 0; doc < n; ++doc) {
    int64_t length = static_cast<int64_t>(lengths[doc]);
    TORCH_CHECK(length >= 0, "pack_documents: negative length ", length, " at document ", doc);
    if (length > capacity) length = capacity;
    int64_t seq;
    auto fit = by_space.lower_bound({length, INT64_MIN});
    if (fit != by_space.end()) {
      seq = fit->second;
      by_space.erase(fit);
    } else {
      if (static_cast<int64_t>(open_order.size()) >= max_open) emit(*open_order.begin());
      seq = static_cast<int64_t>(remaining_of.size());
      remaining_of.push_back(capacity);
      items_of.emplace_back();
      open_order.insert(seq);
    }
    remaining_of[seq] -= length;
    items_of[seq].push_back(doc);
    by_space.insert({remaining_of[seq], seq});
    if (remaining_of[seq] == 0) emit(seq);
  }
  while (!open_order.empty()) emit(*open_order.begin());

  auto offsets_t = at::empty({static_cast<int64_t>(offsets.size())}, at::TensorOptions().dtype(at::kLong));
  auto items_t = at::empty({static_cast<int64_t>(items.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(offsets.begin(), offsets.end(), offsets_t.data_ptr<int64_t>());
  std::copy(items.begin(), items.end(), items_t.data_ptr<int64_t>());
  return {offsets_t, items_t};
}

std::tuple<at::Tensor, at::Tensor> pack_documents(const at::Tensor& lengths, int64_t capacity, int64_t max_open) {
  TORCH_CHECK(lengths.dim() == 1, "pack_documents: lengths must be 1-D, got ", lengths.dim(), "-D");
  TORCH_CHECK(lengths.device().is_cpu(), "pack_documents: lengths must be a CPU tensor");
  TORCH_CHECK(capacity > 0, "pack_documents: capacity must be > 0, got ", capacity);
  TORCH_CHECK(max_open > 0, "pack_documents: max_open must be > 0, got ", max_open);
  auto contiguous = lengths.contiguous();
  const int64_t n = contiguous.numel();
  if (contiguous.scalar_type() == at::kInt) {
    return pack_documents_impl<int32_t>(contiguous.data_ptr<int32_t>(), n, capacity, max_open);
  }
  TORCH_CHECK(contiguous.scalar_type() == at::kLong, "pack_documents: lengths must be int32 or int64");
  return pack_documents_impl<int64_t>(contiguous.data_ptr<int64_t>(), n, capacity, max_open);
}

std::tuple<at::Tensor, at::Tensor> blending_indices(const at::Tensor& weights, int64_t size) {
  TORCH_CHECK(weights.dim() == 1 && weights.numel() > 0, "blending_indices: weights must be a non-empty 1-D tensor");
  TORCH_CHECK(weights.numel() <= 32767, "blending_indices: at most 32767 datasets (int16 index)");
  TORCH_CHECK(size >= 0, "blending_indices: size must be >= 0");
  auto w = weights.to(at::kDouble).contiguous();
  const double* wp = w.data_ptr<double>();
  const int64_t num = w.numel();
  auto dataset_index = at::empty({size}, at::TensorOptions().dtype(at::kShort));
  auto sample_index = at::empty({size}, at::TensorOptions().dtype(at::kLong));
  int16_t* di = dataset_index.data_ptr<int16_t>();
  int64_t* si = sample_index.data_ptr<int64_t>();
  std::vector<int64_t> taken(static_cast<size_t>(num), 0);
  for (int64_t i = 0; i < size; ++i) {
    const double position = i > 1 ? static_cast<double>(i) : 1.0;
    int64_t best = 0;
    double best_error = wp[0] * position - static_cast<double>(taken[0]);
    for (int64_t d = 1; d < num; ++d) {
      const double error = wp[d] * position - static_cast<double>(taken[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    di[i] = static_cast<int16_t>(best);
    si[i] = taken[best]++;
  }
  return {dataset_index, sample_index};
}

void register_index_helpers(pybind11::module_& m) {
  m.def("index_permutation", &index_permutation, "Keyed pseudo-random permutation of [0, n) (Feistel)",
        pybind11::arg("n"), pybind11::arg("key"));
  m.def("pack_documents", &pack_documents, "Best-fit packing plan over a window of open bins",
        pybind11::arg("lengths"), pybind11::arg("capacity"), pybind11::arg("max_open"));
  m.def("blending_indices", &blending_indices, "Greedy blending of datasets by weight",
        pybind11::arg("weights"), pybind11::arg("size"));
}

}  // namespace

LIBRA_REGISTER_OPS(register_index_helpers);
