"""The training dataset: packing keeps samples and images whole and apart, blending follows the weights, the
order is a deterministic function of (seed, epoch) and resumes at any consumed-sample count."""
import os
from collections import Counter

import numpy as np
import pytest
import torch

from libra_megatron.data.dataset import (
    LibraDataset,
    LibraDatasetConfig,
    ResumableBatchSampler,
    build_data_loader,
    collate_batch,
)
from libra_megatron.data.indexed import SampleReader
from libra_megatron.data.samples import assemble, shifted_labels
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab
from tests.data.synthetic import SMALL_VOCAB, image_colour, write_synthetic


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    prefixes = []
    for n, count in enumerate([60, 25, 7]):
        prefixes.append(str(root / f"ds{n}"))
        write_synthetic(prefixes[-1], count, seed=n, dataset=n, max_text=400, max_images=2)
    return prefixes


def _segments(row):
    """(segment id, start, end) of each packed sample of a row."""
    seg = row["segment_ids"].tolist()
    out, start = [], 0
    for t in range(1, len(seg) + 1):
        if t == len(seg) or seg[t] != seg[start]:
            if seg[start] != 0:
                out.append((seg[start], start, t))
            start = t
    return out


def test_packing_keeps_samples_whole_separate_and_in_order(datasets):
    seq = 1400
    ds = LibraDataset(LibraDatasetConfig([datasets[0]], seq_length=seq, packing=True, seed=3))
    reader = SampleReader(datasets[0])
    seen = Counter()
    for i in range(len(ds)):
        row = ds[i]
        _, documents = ds.order.locate(i)
        segments = _segments(row)
        assert [s for s, _, _ in segments] == list(range(1, len(documents) + 1))
        assert segments[0][1] == 0 and all(a[2] == b[1] for a, b in zip(segments, segments[1:]))
        colours = []
        for (segment, start, end), document in zip(segments, documents):
            seen[document] += 1
            alone = assemble(reader.pieces(document), SMALL_VOCAB, seq)  # the sample as it would be unpacked
            assert end - start == alone.length
            assert torch.equal(row["tokens"][:, start:end], alone.tokens)
            assert torch.equal(row["labels"][:, start:end], shifted_labels(alone.tokens, alone.targets))
            assert row["labels"][:, end - 1].eq(IGNORE_INDEX).all()  # never predicts the next packed sample
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            vis = row["vision_indices"][start:end].tolist()
            for t, v in enumerate(vis):  # every image span is whole and inside this segment
                if v == 0:
                    assert vis[t : t + 578] == list(range(578))
            colours += [image_colour(0, document, j) for j in range(len(alone.images))]
        end = segments[-1][2]
        assert row["segment_ids"][end:].eq(0).all() and row["tokens"][:, end:].eq(0).all()
        assert row["labels"][:, end:].eq(IGNORE_INDEX).all()
        # pixels: one per <boi>, in order
        assert row["pixels"].shape[0] == int((row["vision_indices"] == 0).sum())
        assert [tuple(p[:, 0, 0].tolist()) for p in row["pixels"]] == colours
    assert sorted(seen) == list(range(len(reader))) and set(seen.values()) == {1}  # one epoch, each sample once
    lengths = [assemble(reader.pieces(d), SMALL_VOCAB, seq).length for d in range(len(reader))]
    assert len(ds) < len(reader) and len(ds) >= sum(lengths) / seq


def test_batch_contract_and_pixel_order(datasets):
    ds = LibraDataset(LibraDatasetConfig([datasets[0]], seq_length=1400, packing=True, seed=3))
    rows = [ds[i] for i in range(3)]
    batch = collate_batch(rows)
    assert batch["tokens"].shape == (2, 3, 1400) and batch["labels"].shape == (2, 3, 1400)
    for key in ("vision_indices", "position_ids", "segment_ids"):
        assert batch[key].shape == (3, 1400) and batch[key].dtype == torch.long
    assert batch["pixels"].dtype == torch.uint8 and batch["sample_ids"].tolist() == [0, 1, 2]
    assert torch.equal(batch["pixels"], torch.cat([r["pixels"] for r in rows]))
    assert batch["pixels"].shape[0] == int((batch["vision_indices"] == 0).sum())  # row-major <boi> order
    unpacked = LibraDataset(LibraDatasetConfig([datasets[0]], seq_length=1400))
    assert "segment_ids" not in collate_batch([unpacked[0], unpacked[1]])
    # through a DataLoader worker process, data-parallel rank 1 of 2, resumed after 8 samples
    loader = build_data_loader(ds, consumed_samples=8, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2,
                               num_workers=1)
    first = next(iter(loader))
    assert first["sample_ids"].tolist() == [10, 11]
    expected = collate_batch([ds[10], ds[11]])
    assert all(torch.equal(first[k], expected[k]) for k in expected)


def test_blending_follows_weights_and_cycles_epochs(datasets):
    weights = [0.5, 0.3, 0.2]
    n = 600
    ds = LibraDataset(LibraDatasetConfig(datasets, seq_length=2048, weights=weights, num_samples=n, seed=5))
    sources = np.array([ds.order.locate(i)[0] for i in range(n)])
    counts = np.bincount(sources, minlength=3)
    assert np.all(np.abs(counts - np.array(weights) * n) <= 1)
    for prefix in range(1, n + 1, 97):  # every prefix of the order tracks the weights too
        assert np.all(np.abs(np.bincount(sources[:prefix], minlength=3) - np.array(weights) * prefix) <= 2)
    # the 7-sample source is drawn 120 times: 17+ epochs, each a fresh permutation with every sample once
    docs = [ds.order.locate(i)[1][0] for i in range(n) if sources[i] == 2]
    epochs = [docs[k : k + 7] for k in range(0, len(docs) - 6, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert ds[0]["tokens"].shape == (2, 2048)


def test_order_is_a_function_of_seed_and_resumes(datasets, tmp_path):
    config = dict(prefixes=datasets[:2], seq_length=1400, weights=[2, 1], num_samples=90, packing=True)
    a = LibraDataset(LibraDatasetConfig(seed=11, **config))
    b = LibraDataset(LibraDatasetConfig(seed=11, cache_dir=str(tmp_path / "cache"), **config))
    c = LibraDataset(LibraDatasetConfig(seed=12, **config))
    order = [a.order.locate(i) for i in range(90)]
    assert order == [b.order.locate(i) for i in range(90)]
    assert order != [c.order.locate(i) for i in range(90)]
    cached = LibraDataset(LibraDatasetConfig(seed=11, cache_dir=str(tmp_path / "cache"), **config))
    assert len(os.listdir(tmp_path / "cache")) == 1 and isinstance(cached.order.dataset_index, np.memmap)
    assert [cached.order.locate(i) for i in range(90)] == order
    for i in (0, 37, 89):
        assert all(torch.equal(x, y) for x, y in zip(a[i].values(), cached[i].values()) if torch.is_tensor(x))

    # data-parallel sampler: rank r takes slice r of each global batch; restarting at a consumed count
    full = [list(ResumableBatchSampler(90, 0, 4, r, 2)) for r in range(2)]
    assert sorted(i for r in full for mb in r for i in mb) == list(range(88))  # 11 blocks of 8
    assert full[0][0] == [0, 1, 2, 3] and full[1][0] == [4, 5, 6, 7]
    resumed = [list(ResumableBatchSampler(90, 40, 4, r, 2)) for r in range(2)]
    assert resumed == [f[5:] for f in full]
    assert len(ResumableBatchSampler(90, 40, 4, 0, 2)) == len(resumed[0])


def test_truncation_and_errors(datasets, tmp_path):
    ds = LibraDataset(LibraDatasetConfig([datasets[0]], seq_length=600))
    for i in range(len(ds)):
        row = ds[i]
        vis = row["vision_indices"].tolist()
        starts = [t for t, v in enumerate(vis) if v == 0]
        assert all(vis[t : t + 578] == list(range(578)) for t in starts)  # an image is whole or absent
        assert row["pixels"].shape[0] == len(starts)
    with pytest.raises(ValueError, match="does not match the model"):
        LibraDataset(LibraDatasetConfig([datasets[0]], seq_length=600), vocab=LibraVocab())
    other = str(tmp_path / "other")
    write_synthetic(other, 3, seed=0, vocab=LibraVocab(text_vocab_size=1000))
    with pytest.raises(ValueError, match="field 'vocab'"):
        LibraDataset(LibraDatasetConfig([datasets[0], other], seq_length=600, num_samples=10))
    with pytest.raises(ValueError, match="num_samples"):
        LibraDataset(LibraDatasetConfig(datasets[:2], seq_length=600))
    os.remove(other + ".json")
    with pytest.raises(FileNotFoundError, match="not finalised"):
        LibraDataset(LibraDatasetConfig([other], seq_length=600))
    with pytest.raises(ValueError, match="consumed_samples"):
        ResumableBatchSampler(10, 11, 1, 0, 1)
