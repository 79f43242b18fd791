"""Dataset index builders (shuffle, packing plan, blending) with the C++ kernels and their Python references.

Every function here has one definition of its output, shared by the C++ kernel in ``csrc/index_helpers.cpp``
and the reference beside it; ``tests/ops/test_index_helpers.py`` checks that both agree exactly. The
dispatchers use the extension when it is built and fall back to the (vectorised where possible) reference.

- :func:`index_permutation` — keyed pseudo-random permutation of ``[0, n)``: a 4-round unbalanced Feistel
  network on the smallest power-of-two domain >= n (half widths swap every round), cycle-walked back into
  range. ``perm[i]`` depends only on ``(n, key, i)``, so it is parallel and needs no sort.
- :func:`pack_documents` — best-fit packing of documents (in the given order) into bins of ``capacity``
  tokens, over a window of at most ``max_open`` open bins.
- :func:`pack_epoch` — one epoch of a source: :func:`pack_documents` over the documents in a given order, the
  bins then shuffled with :func:`index_permutation` (fused in C++; the reference composes the pieces).
- :func:`blending_indices` — megatron-core's greedy "largest error first" interleave of datasets by weight.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from libra_megatron.ops.extension import get_extension

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
FEISTEL_ROUNDS = 4


def mix64(x: int) -> int:
    """splitmix64 finaliser on one Python int (a bijection of 64-bit words)."""
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, dataset, epoch, purpose...): order-sensitive, deterministic."""
    key = 0
    for part in parts:
        key = mix64(key ^ (int(part) & MASK64))
    return key


def _mix64_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _feistel_parameters(n: int, key: int) -> tuple[int, int, list[int]]:
    bits = max(1, (n - 1).bit_length())
    keys = [mix64((key + (r + 1) * GOLDEN) & MASK64) for r in range(FEISTEL_ROUNDS)]
    return bits, bits - bits // 2, keys


def index_permutation_reference(n: int, key: int) -> np.ndarray:
    """Numpy reference of the keyed permutation: ``int64[n]``, a bijection of ``[0, n)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    bits, low_bits, keys = _feistel_parameters(n, key & MASK64)
    round_keys = [np.uint64(k) for k in keys]

    def encrypt(x: np.ndarray) -> np.ndarray:
        right_bits, left_bits = low_bits, bits - low_bits
        left, right = x >> np.uint64(right_bits), x & np.uint64((1 << right_bits) - 1)
        for k in round_keys:  # (left, right) -> (right, left ^ F(right)); the half widths swap
            left, right = right, left ^ (_mix64_array(right ^ k) & np.uint64((1 << left_bits) - 1))
            left_bits, right_bits = right_bits, left_bits
        return (left << np.uint64(right_bits)) | right

    out = encrypt(np.arange(n, dtype=np.uint64))
    pending = np.nonzero(out >= np.uint64(n))[0]
    while pending.size:  # cycle walking: re-encrypt the values that fell outside [0, n)
        out[pending] = encrypt(out[pending])
        pending = pending[out[pending] >= np.uint64(n)]
    return out.astype(np.int64)


def pack_documents_reference(lengths: np.ndarray, capacity: int, max_open: int) -> tuple[np.ndarray, np.ndarray]:
    """Python reference of the packing plan: ``(bin_offsets int64[B+1], bin_items int64[n])`` (CSR)."""
    if capacity <= 0 or max_open <= 0:
        raise ValueError(f"capacity and max_open must be > 0, got {capacity}, {max_open}")
    open_bins: list[list] = []  # [opening seq, remaining, items], kept in opening order
    offsets, items = [0], []
    next_seq = 0

    def emit(position: int) -> None:
        _, _, bin_items = open_bins.pop(position)
        items.extend(bin_items)
        offsets.append(len(items))

    for doc, raw in enumerate(np.asarray(lengths).tolist()):
        if raw < 0:
            raise ValueError(f"negative length {raw} at document {doc}")
        length = min(int(raw), capacity)
        best = None
        for position, (_, remaining, _) in enumerate(open_bins):
            if remaining >= length and (best is None or remaining < open_bins[best][1]):
                best = position
        if best is None:
            if len(open_bins) >= max_open:
                emit(0)
            open_bins.append([next_seq, capacity, []])
            next_seq += 1
            best = len(open_bins) - 1
        open_bins[best][1] -= length
        open_bins[best][2].append(doc)
        if open_bins[best][1] == 0:
            emit(best)
    while open_bins:
        emit(0)
    return np.asarray(offsets, dtype=np.int64), np.asarray(items, dtype=np.int64)


def reorder_rows_reference(offsets: np.ndarray, items: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a CSR array taken in ``order`` (row ``q`` of the result is row ``order[q]``), vectorised."""
    counts = (offsets[1:] - offsets[:-1])[order]
    starts = offsets[:-1][order]
    new_offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    gather = np.repeat(starts - new_offsets[:-1], counts) + np.arange(new_offsets[-1], dtype=np.int64)
    return new_offsets, items[gather]


def pack_epoch_reference(lengths: np.ndarray, order: np.ndarray, capacity: int, max_open: int,
                         bin_key: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`pack_epoch`: pack ``lengths[order]``, map items to document ids, shuffle the bins."""
    order = np.asarray(order, dtype=np.int64)
    offsets, items = pack_documents_reference(np.asarray(lengths)[order], capacity, max_open)
    shuffle = index_permutation_reference(len(offsets) - 1, bin_key)
    return reorder_rows_reference(offsets, order[items], shuffle)


def blending_indices_reference(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Python reference of megatron-core's greedy blending: ``(dataset_index int16, dataset_sample_index int64)``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("weights must be a non-empty 1-D sequence")
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    taken = np.zeros(w.size, dtype=np.int64)
    for i in range(size):
        errors = w * float(max(i, 1)) - taken
        best = int(np.argmax(errors))  # first maximum, as the strict '>' scan in C++
        dataset_index[i] = best
        sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def index_permutation(n: int, key: int) -> np.ndarray:
    """Keyed permutation of ``[0, n)`` as ``int64[n]`` (C++ when built, else the numpy reference)."""
    ext = get_extension()
    if ext is not None:
        return ext.index_permutation(int(n), int(key) & MASK64).numpy()
    return index_permutation_reference(n, key)


def pack_documents(lengths: np.ndarray, capacity: int, max_open: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Packing plan of documents (given order) into bins of ``capacity`` tokens: ``(bin_offsets, bin_items)``."""
    ext = get_extension()
    if ext is not None:
        lengths = np.ascontiguousarray(lengths)
        if lengths.dtype not in (np.int32, np.int64):
            lengths = lengths.astype(np.int64)
        lengths_t = torch.from_numpy(lengths)
        offsets, items = ext.pack_documents(lengths_t, int(capacity), int(max_open))
        return offsets.numpy(), items.numpy()
    return pack_documents_reference(lengths, capacity, max_open)


def pack_epoch(lengths: np.ndarray, order: np.ndarray, capacity: int, max_open: int,
               bin_key: int) -> tuple[np.ndarray, np.ndarray]:
    """Packing plan of the documents visited in ``order`` (lengths indexed by document id), rows shuffled with
    ``index_permutation(rows, bin_key)``: ``(bin_offsets int64[B+1], bin_docs int64[n])`` of document ids."""
    ext = get_extension()
    if ext is not None:
        lengths = np.ascontiguousarray(lengths)
        if lengths.dtype not in (np.int32, np.int64):
            lengths = lengths.astype(np.int64)
        offsets, docs = ext.pack_epoch(torch.from_numpy(lengths), torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64)),
                                       int(capacity), int(max_open), int(bin_key) & MASK64)
        return offsets.numpy(), docs.numpy()
    lengths = np.asarray(lengths)
    order = np.asarray(order, dtype=np.int64)
    offsets, items = pack_documents(lengths[order], capacity, max_open)
    return reorder_rows_reference(offsets, order[items], index_permutation(len(offsets) - 1, bin_key))


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blending indices for normalised ``weights``: ``(dataset_index int16, dataset_sample_index int64)``."""
    ext = get_extension()
    if ext is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        dataset_index, sample_index = ext.blending_indices(w, int(size))
        return dataset_index.numpy(), sample_index.numpy()
    return blending_indices_reference(weights, size)
