"""C++ index builders agree exactly with their Python references (and blending with megatron-core's helpers)."""
import numpy as np
import pytest
import torch

from libra_megatron.ops import index_helpers as ih
from libra_megatron.ops.extension import get_extension


@pytest.fixture(scope="module")
def ext():
    module = get_extension()
    assert module is not None, "libra_megatron._C must be built for these tests (make ext)"
    return module


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 1000, 65537])
@pytest.mark.parametrize("key", [0, 1, 2**64 - 1, ih.derive_key(1234, 7, 3)])
def test_permutation_cpp_equals_reference_and_is_a_permutation(ext, n, key):
    reference = ih.index_permutation_reference(n, key)
    compiled = ext.index_permutation(n, key).numpy()
    assert np.array_equal(compiled, reference)
    assert np.array_equal(np.sort(reference), np.arange(n))


def test_permutation_depends_on_key_and_looks_random():
    a = ih.index_permutation_reference(10000, ih.derive_key(1, 0))
    b = ih.index_permutation_reference(10000, ih.derive_key(1, 1))
    assert not np.array_equal(a, b)
    assert np.mean(a == np.arange(10000)) < 0.01  # few fixed points
    # displacement of a random permutation is spread over the whole range
    assert np.corrcoef(a, np.arange(10000))[0, 1] ** 2 < 0.01


def test_derive_key_is_order_sensitive():
    assert ih.derive_key(1, 2) != ih.derive_key(2, 1)
    assert ih.derive_key(5) == ih.derive_key(5)


def _random_lengths(seed, n, low, high):
    return np.random.default_rng(seed).integers(low, high, size=n)


@pytest.mark.parametrize(
    "n,capacity,max_open,low,high",
    [(0, 10, 4, 1, 5), (1, 10, 1, 1, 5), (200, 700, 1, 100, 701), (500, 2048, 8, 50, 2500), (2000, 64, 16, 0, 70),
     (3000, 700, 64, 580, 700)],
)
def test_packing_cpp_equals_reference(ext, n, capacity, max_open, low, high):
    lengths = _random_lengths(n + capacity, n, low, high)
    ref_offsets, ref_items = ih.pack_documents_reference(lengths, capacity, max_open)
    for dtype in (torch.int64, torch.int32):
        offsets, items = ext.pack_documents(torch.as_tensor(lengths, dtype=dtype), capacity, max_open)
        assert np.array_equal(offsets.numpy(), ref_offsets)
        assert np.array_equal(items.numpy(), ref_items)
    # every document exactly once, no bin over capacity, at most one oversize document per bin
    assert np.array_equal(np.sort(ref_items), np.arange(n))
    clipped = np.minimum(lengths, capacity)
    for b in range(len(ref_offsets) - 1):
        members = ref_items[ref_offsets[b] : ref_offsets[b + 1]]
        assert len(members) >= 1
        assert clipped[members].sum() <= capacity


@pytest.mark.parametrize("n,capacity,max_open", [(0, 100, 4), (1, 100, 4), (700, 2048, 64), (3000, 700, 8)])
def test_pack_epoch_cpp_equals_reference(ext, n, capacity, max_open):
    lengths = _random_lengths(n, n, 1, capacity + 200).astype(np.int32)
    order = ih.index_permutation_reference(n, 99)
    ref_offsets, ref_docs = ih.pack_epoch_reference(lengths, order, capacity, max_open, 1234)
    offsets, docs = ext.pack_epoch(torch.from_numpy(lengths), torch.from_numpy(order), capacity, max_open, 1234)
    assert np.array_equal(offsets.numpy(), ref_offsets) and np.array_equal(docs.numpy(), ref_docs)
    assert np.array_equal(np.sort(ref_docs), np.arange(n))
    # same bins as the plain plan, only reordered and mapped to document ids
    plain_offsets, plain_items = ih.pack_documents_reference(lengths[order], capacity, max_open)
    plain = sorted(tuple(order[plain_items[a:b]]) for a, b in zip(plain_offsets[:-1], plain_offsets[1:]))
    assert plain == sorted(tuple(ref_docs[a:b]) for a, b in zip(ref_offsets[:-1], ref_offsets[1:]))


def test_packing_rule_on_a_hand_example():
    # capacity 10, window 2: [6] -> bin0; [5] new bin1; [4] best fit bin0 (rem 4 -> full, emitted);
    # [3] bin1 (rem 5 -> 2); [9] no fit, 1 open < 2 -> bin2; [2] bin1 (rem 2 -> 0, emitted); end: bin2.
    offsets, items = ih.pack_documents_reference(np.array([6, 5, 4, 3, 9, 2]), 10, 2)
    assert offsets.tolist() == [0, 2, 5, 6]
    assert items.tolist() == [0, 2, 1, 3, 5, 4]
    # window 1 degenerates to next-fit: [6] | [5, 4] | [3]
    offsets, items = ih.pack_documents_reference(np.array([6, 5, 4, 3]), 10, 1)
    assert offsets.tolist() == [0, 1, 3, 4] and items.tolist() == [0, 1, 2, 3]


def test_packing_rejects_bad_arguments(ext):
    with pytest.raises(ValueError, match="negative length"):
        ih.pack_documents_reference(np.array([3, -1]), 10, 2)
    with pytest.raises(RuntimeError, match="negative length"):
        ext.pack_documents(torch.tensor([3, -1]), 10, 2)
    with pytest.raises(RuntimeError, match="capacity"):
        ext.pack_documents(torch.tensor([3]), 0, 2)


@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.7, 0.2, 0.1], [0.01, 0.99], [1 / 3, 1 / 3, 1 / 3]])
def test_blending_cpp_equals_reference_and_megatron(ext, weights):
    from megatron.core.datasets import helpers as megatron_helpers

    size = 5000
    ref_dataset, ref_sample = ih.blending_indices_reference(weights, size)
    dataset, sample = ext.blending_indices(torch.tensor(weights, dtype=torch.float64), size)
    assert np.array_equal(dataset.numpy(), ref_dataset)
    assert np.array_equal(sample.numpy(), ref_sample)
    mc_dataset = np.zeros(size, dtype=np.int16)
    mc_sample = np.zeros(size, dtype=np.int64)
    megatron_helpers.build_blending_indices(
        mc_dataset, mc_sample, np.asarray(weights, dtype=np.float64), len(weights), size, False
    )
    assert np.array_equal(mc_dataset, ref_dataset) and np.array_equal(mc_sample, ref_sample)
    counts = np.bincount(ref_dataset, minlength=len(weights))
    assert np.all(np.abs(counts - np.asarray(weights) * size) <= 1.0)


def test_dispatchers_use_reference_without_extension(monkeypatch):
    lengths = _random_lengths(0, 300, 10, 90)
    order = ih.index_permutation(300, 5)

    def run():
        return (ih.index_permutation(777, 9), *ih.pack_documents(lengths, 100, 4), *ih.blending_indices([0.3, 0.7], 50),
                *ih.pack_epoch(lengths, order, 100, 4, 77))

    with_ext = run()
    monkeypatch.setattr(ih, "get_extension", lambda: None)
    without = run()
    for a, b in zip(with_ext, without, strict=True):
        assert np.array_equal(a, b)
