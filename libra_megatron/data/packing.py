"""The sample order of the training dataset: per-source epochs, packing plans, blending, and their cache.

Everything here is a deterministic function of ``(seed, source position, epoch)`` and the ``.idx`` files, so
training can resume at any consumed-sample count and every rank computes (or loads) the same order:

* epoch ``e`` of source ``s`` visits its documents in the order ``index_permutation(n, key(seed, s, e, 0))``;
* without packing, sample ``k`` of the epoch is that order's ``k``-th document;
* with packing, the documents (in that order, lengths after truncation to ``seq_length``) are packed by
  ``pack_documents`` (best fit, ``max_open_bins`` window) and the bins are shuffled with
  ``index_permutation(bins, key(seed, s, e, 1))``;
* epochs are concatenated until the source has as many samples as the blend draws from it;
* blending uses megatron-core's greedy rule (``blending_indices``) on the normalised weights.

The arrays live in memory, or in ``cache_dir/<hash>/*.npy`` (written atomically, loaded with mmap) when a cache
folder is given: rank 0 builds, the others wait at a barrier and load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from libra_megatron.ops.index_helpers import blending_indices, derive_key, index_permutation, pack_epoch

INDEX_FORMAT_VERSION = 1
PURPOSE_DOCUMENTS, PURPOSE_BINS = 0, 1


@dataclass
class SourceIndex:
    """The samples one source contributes: sample ``k`` = documents ``docs[offsets[k]:offsets[k+1]]``
    (``offsets`` is ``None`` without packing: sample ``k`` = document ``docs[k]``)."""

    docs: np.ndarray
    offsets: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.docs) if self.offsets is None else len(self.offsets) - 1

    def documents(self, sample: int) -> List[int]:
        if self.offsets is None:
            return [int(self.docs[sample])]
        return self.docs[self.offsets[sample] : self.offsets[sample + 1]].tolist()


def epoch_samples(lengths: Optional[np.ndarray], num_documents: int, seq_length: int, seed: int, source: int,
                  epoch: int, packing: bool, max_open_bins: int) -> SourceIndex:
    """The samples of one epoch of one source, in order."""
    order = index_permutation(num_documents, derive_key(seed, source, epoch, PURPOSE_DOCUMENTS))
    if not packing:
        return SourceIndex(order, None)
    offsets, docs = pack_epoch(lengths, order, seq_length, max_open_bins, derive_key(seed, source, epoch, PURPOSE_BINS))
    return SourceIndex(docs, offsets)


def build_source_index(lengths: Optional[np.ndarray], num_documents: int, needed: int, seq_length: int, seed: int,
                       source: int, packing: bool, max_open_bins: int) -> SourceIndex:
    """The first ``needed`` samples of a source over as many epochs as it takes."""
    if num_documents == 0:
        if needed:
            raise ValueError(f"source {source} has no samples but the blend draws {needed} from it")
        return SourceIndex(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64) if packing else None)
    docs_parts, offsets_parts, total, epoch = [], [], 0, 0
    while total < needed or epoch == 0:
        part = epoch_samples(lengths, num_documents, seq_length, seed, source, epoch, packing, max_open_bins)
        take = min(len(part), needed - total) if needed else len(part)
        if epoch == 0 and take == len(part):  # one whole epoch: no copies
            if not needed or take == needed:
                return part
        if packing:
            end = part.offsets[take]
            offsets_parts.append(part.offsets[1 : take + 1] + (offsets_parts[-1][-1] if offsets_parts else 0))
            docs_parts.append(part.docs[:end])
        else:
            docs_parts.append(part.docs[:take])
        total += take
        epoch += 1
        if not needed:
            break
    docs = np.concatenate(docs_parts)
    offsets = np.concatenate([np.zeros(1, dtype=np.int64)] + offsets_parts) if packing else None
    return SourceIndex(docs, offsets)


def normalized_weights(weights: Optional[Sequence[float]], count: int) -> np.ndarray:
    """Weights as probabilities (equal when ``None``); errors on negative or all-zero weights."""
    w = np.ones(count, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(f"got {w.size} weights for {count} datasets")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


@dataclass
class SampleOrder:
    """Global sample ``i`` -> (source, sample within source) -> documents."""

    dataset_index: Optional[np.ndarray]  # int16 [N], None for one source
    dataset_sample_index: Optional[np.ndarray]  # int64 [N]
    sources: List[SourceIndex]
    num_samples: int

    def locate(self, i: int) -> tuple[int, List[int]]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        if self.dataset_index is None:
            return 0, self.sources[0].documents(i)
        source = int(self.dataset_index[i])
        return source, self.sources[source].documents(int(self.dataset_sample_index[i]))


def build_sample_order(lengths: Sequence[Optional[np.ndarray]], num_documents: Sequence[int],
                       weights: Optional[Sequence[float]], num_samples: Optional[int], seq_length: int, seed: int,
                       packing: bool, max_open_bins: int) -> SampleOrder:
    """Blend + per-source indices for ``num_samples`` samples (``None``: one epoch of each source, unblended
    order when there is one source; with several sources ``num_samples`` is required)."""
    count = len(num_documents)
    if count == 1:
        source = build_source_index(lengths[0], num_documents[0], num_samples or 0, seq_length, seed, 0, packing,
                                    max_open_bins)
        return SampleOrder(None, None, [source], len(source) if num_samples is None else num_samples)
    if num_samples is None:
        raise ValueError("blending several datasets needs num_samples (train_iters x global_batch_size)")
    w = normalized_weights(weights, count)
    dataset_index, dataset_sample_index = blending_indices(w, num_samples)
    needed = np.bincount(dataset_index.astype(np.int64), minlength=count)
    sources = [build_source_index(lengths[s], num_documents[s], int(needed[s]), seq_length, seed, s, packing,
                                  max_open_bins) for s in range(count)]
    return SampleOrder(dataset_index, dataset_sample_index, sources, num_samples)


# ----------------------------------------------------------------------------------------------------- cache
def order_description(identities: Sequence[Dict[str, Any]], weights, num_samples, seq_length, seed, packing,
                      max_open_bins) -> Dict[str, Any]:
    return {"version": INDEX_FORMAT_VERSION, "datasets": list(identities), "weights": None if weights is None else
            [float(w) for w in weights], "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
            "packing": packing, "max_open_bins": max_open_bins}


def cache_folder(cache_dir: str, description: Dict[str, Any]) -> str:
    digest = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_dir, f"libra-sample-order-{digest}")


def save_order(folder: str, order: SampleOrder, description: Dict[str, Any]) -> None:
    """Write the arrays under a temporary folder and rename it into place (first writer wins)."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    arrays = {"num_samples": np.asarray([order.num_samples], dtype=np.int64)}
    if order.dataset_index is not None:
        arrays["dataset_index"], arrays["dataset_sample_index"] = order.dataset_index, order.dataset_sample_index
    for s, source in enumerate(order.sources):
        arrays[f"source{s}_docs"] = source.docs
        if source.offsets is not None:
            arrays[f"source{s}_offsets"] = source.offsets
    for name, array in arrays.items():
        np.save(os.path.join(tmp, name + ".npy"), array)
    with open(os.path.join(tmp, "description.json"), "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=1, sort_keys=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first; its arrays are identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_order(folder: str, num_sources: int) -> Optional[SampleOrder]:
    """The cached order in ``folder`` (memory-mapped), or ``None`` if there is none."""
    if not os.path.exists(os.path.join(folder, "description.json")):
        return None

    def load(name: str) -> Optional[np.ndarray]:
        path = os.path.join(folder, name + ".npy")
        return np.load(path, mmap_mode="r") if os.path.exists(path) else None

    sources = [SourceIndex(load(f"source{s}_docs"), load(f"source{s}_offsets")) for s in range(num_sources)]
    return SampleOrder(load("dataset_index"), load("dataset_sample_index"), sources, int(load("num_samples")[0]))
