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
//   pack_epoch(lengths, order, capacity, max_open, bin_key) -> (bin_offsets, bin_docs)
//       pack_documents over lengths[order] (documents visited in `order`), items mapped to document ids
//       order[item], rows reordered so that row q is the bin emitted at rank index_permutation(bins, bin_key)[q].
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

struct BinPlan {
  std::vector<int64_t> bin_of;     // per position: the bin (opening number) it went to
  std::vector<int64_t> emit_rank;  // per bin: its emission rank
  std::vector<int64_t> bin_count;  // per bin: number of documents
};

// Best-fit packing over a window of open bins. Position i has length lengths[order ? order[i] : i].
// Open bins are kept in opening order in compact arrays of at most max_open entries: a linear best-fit scan is
// cheaper than any tree for the small windows used. Positions only record their bin; the CSR output is built
// afterwards by a counting sort (no per-bin allocations).
template <typename length_t>
BinPlan plan_bins(const length_t* lengths, const int64_t* order, int64_t n, int64_t num_lengths, int64_t capacity,
                  int64_t max_open) {
  BinPlan plan;
  plan.bin_of.resize(static_cast<size_t>(n));
  std::vector<int64_t> open_remaining, open_bin;
  open_remaining.reserve(static_cast<size_t>(max_open));
  open_bin.reserve(static_cast<size_t>(max_open));
  int64_t emitted = 0;

  auto emit = [&](size_t position) {
    plan.emit_rank[open_bin[position]] = emitted++;
    open_remaining.erase(open_remaining.begin() + static_cast<std::ptrdiff_t>(position));
    open_bin.erase(open_bin.begin() + static_cast<std::ptrdiff_t>(position));
  };

  for (int64_t i = 0; i < n; ++i) {
    const int64_t doc = order ? order[i] : i;
    TORCH_CHECK(doc >= 0 && doc < num_lengths, "pack: document ", doc, " out of range [0, ", num_lengths, ")");
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
      open_bin.push_back(static_cast<int64_t>(plan.emit_rank.size()));
      plan.emit_rank.push_back(-1);
      plan.bin_count.push_back(0);
      best = open_remaining.size() - 1;
    }
    open_remaining[best] -= length;
    plan.bin_of[i] = open_bin[best];
    plan.bin_count[open_bin[best]] += 1;
    if (open_remaining[best] == 0) emit(best);
  }
  while (!open_remaining.empty()) emit(0);
  return plan;
}

// CSR of the plan: row r holds the bin emitted at rank row_rank[r] (identity without a shuffle); items are
// positions, or order[position] when an order is given. Items keep their position order inside a bin.
std::tuple<at::Tensor, at::Tensor> bins_to_csr(const BinPlan& plan, const int64_t* order, int64_t n,
                                               const std::vector<int64_t>* row_of_rank) {
  const int64_t bins = static_cast<int64_t>(plan.emit_rank.size());
  auto offsets_t = at::empty({bins + 1}, at::TensorOptions().dtype(at::kLong));
  auto items_t = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* offsets = offsets_t.data_ptr<int64_t>();
  int64_t* items = items_t.data_ptr<int64_t>();
  std::vector<int64_t> row_of_bin(static_cast<size_t>(bins));
  for (int64_t b = 0; b < bins; ++b) {
    const int64_t rank = plan.emit_rank[b];
    row_of_bin[b] = row_of_rank ? (*row_of_rank)[rank] : rank;
  }
  std::vector<int64_t> count_of_row(static_cast<size_t>(bins));
  for (int64_t b = 0; b < bins; ++b) count_of_row[row_of_bin[b]] = plan.bin_count[b];
  offsets[0] = 0;
  for (int64_t r = 0; r < bins; ++r) offsets[r + 1] = offsets[r] + count_of_row[r];
  std::vector<int64_t> cursor(offsets, offsets + bins);
  for (int64_t i = 0; i < n; ++i) items[cursor[row_of_bin[plan.bin_of[i]]]++] = order ? order[i] : i;
  return {offsets_t, items_t};
}

template <typename fn_t>
auto dispatch_lengths(const at::Tensor& lengths, fn_t&& fn) {
  TORCH_CHECK(lengths.dim() == 1, "pack: lengths must be 1-D, got ", lengths.dim(), "-D");
  TORCH_CHECK(lengths.device().is_cpu(), "pack: lengths must be a CPU tensor");
  if (lengths.scalar_type() == at::kInt) return fn(lengths.data_ptr<int32_t>());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "pack: lengths must be int32 or int64");
  return fn(lengths.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> pack_documents(const at::Tensor& lengths, int64_t capacity, int64_t max_open) {
  TORCH_CHECK(capacity > 0, "pack_documents: capacity must be > 0, got ", capacity);
  TORCH_CHECK(max_open > 0, "pack_documents: max_open must be > 0, got ", max_open);
  auto contiguous = lengths.contiguous();
  const int64_t n = contiguous.numel();
  return dispatch_lengths(contiguous, [&](auto* data) {
    return bins_to_csr(plan_bins(data, nullptr, n, n, capacity, max_open), nullptr, n, nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> pack_epoch(const at::Tensor& lengths, const at::Tensor& order, int64_t capacity,
                                              int64_t max_open, uint64_t bin_key) {
  TORCH_CHECK(capacity > 0 && max_open > 0, "pack_epoch: capacity and max_open must be > 0");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.device().is_cpu(),
              "pack_epoch: order must be a 1-D int64 CPU tensor");
  auto contiguous = lengths.contiguous();
  auto order_c = order.contiguous();
  const int64_t n = order_c.numel();
  const int64_t* order_p = order_c.data_ptr<int64_t>();
  BinPlan plan = dispatch_lengths(contiguous, [&](auto* data) {
    return plan_bins(data, order_p, n, contiguous.numel(), capacity, max_open);
  });
  // rows in the order index_permutation(bins, bin_key): row q holds emission rank perm[q]
  const int64_t bins = static_cast<int64_t>(plan.emit_rank.size());
  std::vector<int64_t> row_of_rank(static_cast<size_t>(bins));
  if (bins == 1) row_of_rank[0] = 0;
  if (bins > 1) {
    const Feistel feistel(bins, bin_key);
    const uint64_t limit = static_cast<uint64_t>(bins);
    at::parallel_for(0, bins, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        uint64_t y = feistel.encrypt(static_cast<uint64_t>(q));
        while (y >= limit) y = feistel.encrypt(y);
        row_of_rank[y] = q;
      }
    });
  }
  return bins_to_csr(plan, order_p, n, &row_of_rank);
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
  m.def("pack_epoch", &pack_epoch, "Packing plan of documents visited in `order`, bins shuffled by `bin_key`",
        pybind11::arg("lengths"), pybind11::arg("order"), pybind11::arg("capacity"), pybind11::arg("max_open"),
        pybind11::arg("bin_key"));
  m.def("blending_indices", &blending_indices, "Greedy blending of datasets by weight",
        pybind11::arg("weights"), pybind11::arg("size"));
}

}  // namespace

LIBRA_REGISTER_OPS(register_index_helpers);
