// Dataset index builders: keyed permutation (shuffle), packing plan (sample index), blending indices.
//
// Semantics are defined by the pure-Python references in libra_megatron/ops/index_helpers.py; the tests
// check that both produce identical arrays. Summary:
//
//   index_permutation(n, key)  -> int64[n]
//       perm[i] = cycle-walked 4-round unbalanced Feistel network on [0, 2^b) (smallest b >= 1 with 2^b >= n;
//       halves of floor(b/2) and ceil(b/2) bits whose widths swap every round), round function
//       F_r(x) = mix64(x ^ k_r) masked to the other half's width, k_r = mix64(key + (r+1) * GOLDEN).
//       A bijection of [0, n), computed independently per element (parallel, O(n), no sort).
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
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int kFeistelRounds = 4;

inline uint64_t mix64(uint64_t x) {
  // splitmix64 finaliser (a bijection on 64-bit words).
  x += kGolden;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

struct Feistel {
  // Unbalanced Feistel network on [0, 2^bits): the state is (left, right) with widths that swap every round,
  // so any bit count works and the domain is < 2n (at most ~2 encryptions per element when cycle-walking).
  int bits;
  int low_bits;  // width of the right half at the start
  uint64_t keys[kFeistelRounds];

  Feistel(int64_t n, uint64_t key) {
    bits = 1;
    while (bits < 62 && (uint64_t{1} << bits) < static_cast<uint64_t>(n)) ++bits;  // 2^bits >= n
    low_bits = bits - bits / 2;
    for (int r = 0; r < kFeistelRounds; ++r) keys[r] = mix64(key + static_cast<uint64_t>(r + 1) * kGolden);
  }

  inline uint64_t encrypt(uint64_t x) const {
    int right_bits = low_bits;
    int left_bits = bits - low_bits;
    uint64_t left = x >> right_bits;
    uint64_t right = x & ((uint64_t{1} << right_bits) - 1);
    for (int r = 0; r < kFeistelRounds; ++r) {
      // (left, right) -> (right, left ^ F(right)): new left has right_bits, new right has left_bits
      const uint64_t next = left ^ (mix64(right ^ keys[r]) & ((uint64_t{1} << left_bits) - 1));
      left = right;
      right = next;
      const int swap = left_bits;
      left_bits = right_bits;
      right_bits = swap;
    }
    return (left << right_bits) | right;
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
  // Open bins in opening order (compact arrays of at most max_open entries): a linear best-fit scan over them
  // is cheaper than any tree for the small windows used. Documents only record their bin; the CSR output is
  // built at the end by a counting sort on the bins' emission ranks (no per-bin allocations).
  std::vector<int64_t> open_remaining, open_bin;
  open_remaining.reserve(static_cast<size_t>(max_open));
  open_bin.reserve(static_cast<size_t>(max_open));
  std::vector<int64_t> bin_of(static_cast<size_t>(n));
  std::vector<int64_t> emit_rank;   // per bin (by opening number): its position in the output
  std::vector<int64_t> bin_count;   // per bin: number of documents
  int64_t emitted = 0;

  auto emit = [&](size_t position) {
    emit_rank[open_bin[position]] = emitted++;
    open_remaining.erase(open_remaining.begin() + static_cast<std::ptrdiff_t>(position));
    open_bin.erase(open_bin.begin() + static_cast<std::ptrdiff_t>(position));
  };

  for (int64_t doc = 0; doc < n; ++doc) {
    int64_t length = static_cast<int64_t>(lengths[doc]);
    TORCH_CHECK(length >= 0, "pack_documents: negative length ", length, " at document ", doc);
    if (length > capacity) length = capacity;
    size_t best = open_remaining.size();
    int64_t best_remaining = INT64_MAX;
    for (size_t j = 0; j < open_remaining.size(); ++j) {
      const int64_t remaining = open_remaining[j];
      if (remaining >= length && remaining < best_remaining) {
        best = j;
        best_remaining = remaining;
        if (remaining == length) break;  // an exact fit cannot be beaten (earliest opened wins ties)
      }
    }
    if (best == open_remaining.size()) {
      if (static_cast<int64_t>(open_remaining.size()) >= max_open) emit(0);
      open_remaining.push_back(capacity);
      open_bin.push_back(static_cast<int64_t>(emit_rank.size()));
      emit_rank.push_back(-1);
      bin_count.push_back(0);
      best = open_remaining.size() - 1;
    }
    open_remaining[best] -= length;
    bin_of[doc] = open_bin[best];
    bin_count[open_bin[best]] += 1;
    if (open_remaining[best] == 0) emit(best);
  }
  while (!open_remaining.empty()) emit(0);

  const int64_t bins = static_cast<int64_t>(emit_rank.size());
  auto offsets_t = at::empty({bins + 1}, at::TensorOptions().dtype(at::kLong));
  auto items_t = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* offsets = offsets_t.data_ptr<int64_t>();
  int64_t* items = items_t.data_ptr<int64_t>();
  offsets[0] = 0;
  std::vector<int64_t> bin_at_rank(static_cast<size_t>(bins));
  for (int64_t b = 0; b < bins; ++b) bin_at_rank[emit_rank[b]] = b;
  for (int64_t r = 0; r < bins; ++r) offsets[r + 1] = offsets[r] + bin_count[bin_at_rank[r]];
  std::vector<int64_t> cursor(offsets, offsets + bins);
  for (int64_t doc = 0; doc < n; ++doc) items[cursor[emit_rank[bin_of[doc]]]++] = doc;
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
