"""The training dataset, its batch collation and the resumable data-parallel sampler.

``LibraDataset(config)[i]`` is global sample ``i`` (a fixed function of the config: seed, blend, packing), one
row of ``seq_length`` positions::

    tokens        long  [2, L]   two-plane model ids, right-padded with pad id 0
    labels        long  [2, L]   already shifted (labels[:, t] = target predicted at t), -100 = ignored
    vision_indices long [L]      0..577 inside an image, 578 on text and padding
    position_ids  long  [L]      0.. per packed sample (restarting), padding counts again from 0
    segment_ids   long  [L]      (packing only) 1..k per packed sample, 0 on padding
    pixels        uint8 [n, 3, 336, 336]   the row's images in order of their <boi>
    sample_id     int            i

:func:`collate_batch` stacks rows into the training-batch contract of docs/design.md (``tokens [2, B, L]``,
``pixels [N, 3, 336, 336]`` in row-major ``<boi>`` order, ``sample_ids [B]``). :class:`ResumableBatchSampler`
yields this data-parallel rank's micro-batches starting at ``consumed_samples``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from libra_megatron.data.indexed import SampleReader, effective_lengths, unpack_bytes
from libra_megatron.data.packing import (
    SampleOrder,
    build_sample_order,
    cache_folder,
    load_order,
    order_description,
    save_order,
)
from libra_megatron.data.pixel_codec import decode_pixels
from libra_megatron.data.samples import PieceKind, assemble, shifted_labels
from libra_megatron.data.sidecar import read_sidecar, sidecar_path, vocab_from_sidecar
from libra_megatron.vocab import IGNORE_INDEX, LibraVocab


@dataclass
class LibraDatasetConfig:
    """What defines a training dataset (and therefore its sample order)."""

    prefixes: List[str]
    seq_length: int
    weights: Optional[List[float]] = None  # blend weights (normalised); None = equal
    num_samples: Optional[int] = None  # samples to index (train_iters x global batch); None = one epoch (1 source)
    seed: int = 1234
    packing: bool = False
    max_open_bins: int = 64
    cache_dir: Optional[str] = None
    mmap: bool = True


def _dataset_identity(prefix: str) -> Dict[str, object]:
    with open(sidecar_path(prefix), "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"prefix": os.path.abspath(prefix), "sidecar_sha256": digest, "idx_bytes": os.path.getsize(prefix + ".idx"),
            "bin_bytes": os.path.getsize(prefix + ".bin")}


class LibraDataset(torch.utils.data.Dataset):
    """Packed / blended Libra samples over preprocessed binaries (see the module docstring for a row)."""

    def __init__(self, config: LibraDatasetConfig, vocab: Optional[LibraVocab] = None):
        if not config.prefixes:
            raise ValueError("LibraDatasetConfig.prefixes is empty")
        if config.seq_length <= 0:
            raise ValueError(f"seq_length must be > 0, got {config.seq_length}")
        self.config = config
        self.metas = [read_sidecar(prefix) for prefix in config.prefixes]
        self.vocab = vocab_from_sidecar(self.metas[0])
        for prefix, meta in zip(config.prefixes, self.metas):
            other = vocab_from_sidecar(meta)
            if other != self.vocab:
                raise ValueError(f"{sidecar_path(prefix)}: field 'vocab' {other} differs from "
                                 f"{sidecar_path(config.prefixes[0])}'s {self.vocab}")
            if meta["pixels"]["size"] != self.metas[0]["pixels"]["size"]:
                raise ValueError(f"{sidecar_path(prefix)}: field 'pixels.size' differs from the first dataset's")
        if vocab is not None and vocab != self.vocab:
            raise ValueError(f"{sidecar_path(config.prefixes[0])}: dataset vocab {self.vocab} does not match the "
                             f"model's {vocab}")
        self.image_size = int(self.metas[0]["pixels"]["size"])
        self.readers = [SampleReader(prefix, mmap=config.mmap) for prefix in config.prefixes]
        self.order = self._build_order()

    # ----------------------------------------------------------------------------------------------- order
    def _compute_order(self) -> SampleOrder:
        c = self.config
        lengths = [effective_lengths(r, self.vocab, c.seq_length) if c.packing else None for r in self.readers]
        return build_sample_order(lengths, [len(r) for r in self.readers], c.weights, c.num_samples, c.seq_length,
                                  c.seed, c.packing, c.max_open_bins)

    def _build_order(self) -> SampleOrder:
        c = self.config
        if c.cache_dir is None:
            return self._compute_order()
        description = order_description([_dataset_identity(p) for p in c.prefixes], c.weights, c.num_samples,
                                        c.seq_length, c.seed, c.packing, c.max_open_bins)
        folder = cache_folder(c.cache_dir, description)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_rank() == 0:
            if load_order(folder, len(self.readers)) is None:
                os.makedirs(c.cache_dir, exist_ok=True)
                save_order(folder, self._compute_order(), description)
        if distributed:
            torch.distributed.barrier()
        order = load_order(folder, len(self.readers))
        if order is None:
            raise FileNotFoundError(f"sample-order cache {folder} is missing (is cache_dir shared by all ranks?)")
        return order

    # ----------------------------------------------------------------------------------------------- rows
    def __len__(self) -> int:
        return self.order.num_samples

    def __getitem__(self, index: int) -> Dict[str, object]:
        source, documents = self.order.locate(int(index))
        reader = self.readers[source]
        pixel_format = self.metas[source]["pixels"]["format"]
        length = self.config.seq_length
        vocab = self.vocab
        tokens = torch.full((vocab.num_codebooks, length), vocab.pad_id, dtype=torch.long)
        labels = torch.full((vocab.num_codebooks, length), IGNORE_INDEX, dtype=torch.long)
        vision_indices = torch.full((length,), vocab.text_vision_index, dtype=torch.long)
        position_ids = torch.zeros(length, dtype=torch.long)
        segment_ids = torch.zeros(length, dtype=torch.long)
        pixels: List[torch.Tensor] = []
        offset = 0
        for segment, document in enumerate(documents, start=1):
            pieces = reader.pieces(document)
            sample = assemble(pieces, vocab, length)
            end = offset + sample.length
            if end > length:
                raise RuntimeError(f"packing plan overflows row {index}: {end} > {length} (stale cache?)")
            tokens[:, offset:end] = sample.tokens
            labels[:, offset:end] = shifted_labels(sample.tokens, sample.targets)
            vision_indices[offset:end] = sample.vision_indices
            position_ids[offset:end] = torch.arange(sample.length)
            segment_ids[offset:end] = segment
            blobs = [array for kind, array in pieces if kind == PieceKind.PIXELS]
            for image in sample.images:
                pixels.append(decode_pixels(unpack_bytes(blobs[image]), pixel_format, self.image_size))
            offset = end
        position_ids[offset:] = torch.arange(length - offset)
        row = {
            "tokens": tokens,
            "labels": labels,
            "vision_indices": vision_indices,
            "position_ids": position_ids,
            "pixels": torch.stack(pixels) if pixels else torch.zeros((0, 3, self.image_size, self.image_size),
                                                                      dtype=torch.uint8),
            "sample_id": int(index),
        }
        if self.config.packing:
            row["segment_ids"] = segment_ids
        return row


def collate_batch(rows: Sequence[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Rows -> one micro-batch in the contract of docs/design.md (tokens/labels ``[2, B, L]``)."""
    batch = {
        "tokens": torch.stack([r["tokens"] for r in rows], dim=1),
        "labels": torch.stack([r["labels"] for r in rows], dim=1),
        "vision_indices": torch.stack([r["vision_indices"] for r in rows]),
        "position_ids": torch.stack([r["position_ids"] for r in rows]),
        "pixels": torch.cat([r["pixels"] for r in rows]),
        "sample_ids": torch.tensor([r["sample_id"] for r in rows], dtype=torch.long),
    }
    if "segment_ids" in rows[0]:
        batch["segment_ids"] = torch.stack([r["segment_ids"] for r in rows])
    return batch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of this data-parallel rank, in global order, starting at ``consumed_samples``.

    Global samples are taken in blocks of ``micro_batch_size * data_parallel_size``; rank ``r`` gets the
    ``r``-th slice of each block (as megatron's ``MegatronPretrainingSampler``). An incomplete last block is
    dropped, so every rank sees the same number of micro-batches.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int):
        if micro_batch_size <= 0 or data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad sampler geometry: micro_batch_size={micro_batch_size}, "
                             f"rank={data_parallel_rank}, size={data_parallel_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} outside [0, {total_samples}]")
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)

    def __iter__(self) -> Iterator[List[int]]:
        block = self.micro * self.size
        for start in range(self.consumed, self.total - block + 1, block):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))


def build_data_loader(dataset: LibraDataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                      data_parallel_size: int, num_workers: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's collated micro-batches from ``consumed_samples`` on."""
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                    data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_batch, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)
