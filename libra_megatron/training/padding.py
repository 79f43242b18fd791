"""Dynamic padding of training micro-batches: each one is cut to its longest sample, rounded up to a multiple.

Samples arrive right-padded to ``--seq-length`` (the dataset's fixed row). With ``--sequence-padding dynamic``
(the default) the collate function drops the trailing positions that no row of the micro-batch uses, keeping
``padded_length(longest, multiple, seq_length)`` positions: the longest sample's length rounded up to
``--pad-to-multiple-of`` (times TP under sequence parallelism), never more than ``--seq-length``. Nothing real is
removed (a position is kept when any row has a non-pad token, an image position, a label or a packed segment
there), and right padding is invisible to real tokens under causal attention, so the loss per real token is that
of the fixed-length batch (tested at TP=1 and PP=2). Why dynamic padding rather than packing for pretraining, and
why 16: docs/design.md ("Training throughput").

Pipeline parallelism needs one activation shape for all micro-batches of a step (megatron-core's schedules take
one ``seq_length``; ``variable_seq_lengths`` would exchange shapes with a device sync at every p2p), so with PP > 1
the stream pads a step's micro-batches to the step's longest (:func:`pad_batch`) and passes that length to the
schedule. Every rank of a pipeline reads the same samples (``data.py``), so all stages agree without talking.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch

from libra_megatron.vocab import IGNORE_INDEX

# Tensors whose last dimension is the sequence (``[B, L]`` or ``[C, B, L]``); ``pixels``/``sample_ids`` are not.
SEQUENCE_KEYS = ("tokens", "labels", "vision_indices", "position_ids", "segment_ids")


def content_length(batch: Dict[str, torch.Tensor], vocab: Any) -> int:
    """One past the last position any row of the micro-batch uses (0 for an all-padding batch)."""
    used = (batch["tokens"] != vocab.pad_id).any(dim=0)
    used |= (batch["labels"] != IGNORE_INDEX).any(dim=0)
    used |= batch["vision_indices"] < vocab.text_vision_index
    if batch.get("segment_ids") is not None:
        used |= batch["segment_ids"] > 0
    columns = used.any(dim=0).nonzero()
    return int(columns[-1]) + 1 if columns.numel() else 0


def padding_multiple(multiple: int, tensor_parallel: int, sequence_parallel: bool) -> int:
    """The length granularity: ``multiple``, made divisible by TP under sequence parallelism."""
    return math.lcm(multiple, tensor_parallel) if sequence_parallel else multiple


def padded_length(length: int, multiple: int, max_length: int) -> int:
    """``length`` rounded up to ``multiple`` (at least one multiple), capped at ``max_length``."""
    return min(max_length, max(1, math.ceil(length / multiple)) * multiple)


def trim_batch(batch: Dict[str, torch.Tensor], length: int) -> Dict[str, torch.Tensor]:
    """The micro-batch with its sequence tensors cut to the first ``length`` positions (contiguous copies)."""
    return {key: value[..., :length].contiguous() if key in SEQUENCE_KEYS and value is not None else value
            for key, value in batch.items()}


def pad_batch(batch: Dict[str, torch.Tensor], length: int, vocab: Any) -> Dict[str, torch.Tensor]:
    """The micro-batch right-padded to ``length`` positions with the dataset's padding values (pad id, label
    -100, text vision index, segment 0, positions counting on)."""
    current = batch["tokens"].shape[-1]
    if current >= length:
        return batch
    extra = length - current
    fill = {"tokens": vocab.pad_id, "labels": IGNORE_INDEX, "vision_indices": vocab.text_vision_index,
            "segment_ids": 0}
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if key == "position_ids":
            tail = torch.arange(current, length, dtype=value.dtype).expand(*value.shape[:-1], extra)
        else:
            tail = torch.full((*value.shape[:-1], extra), fill[key], dtype=value.dtype)
        out[key] = torch.cat([value, tail], dim=-1)
    return out


class DynamicPaddingCollate:
    """``collate_batch`` then :func:`trim_batch` to the micro-batch's padded length (picklable for workers)."""

    def __init__(self, vocab: Any, multiple: int, max_length: int) -> None:
        if multiple < 1:
            raise ValueError(f"--pad-to-multiple-of must be >= 1, got {multiple}")
        self.vocab, self.multiple, self.max_length = vocab, multiple, max_length

    def __call__(self, rows: Sequence[Dict[str, object]]) -> Dict[str, torch.Tensor]:
        from libra_megatron.data.dataset import collate_batch

        batch = collate_batch(rows)
        length = padded_length(content_length(batch, self.vocab), self.multiple, self.max_length)
        return trim_batch(batch, length) if length < batch["tokens"].shape[-1] else batch


def build_collate(args: Any, vocab: Any):
    """The collate function of the training/validation streams for ``--sequence-padding``."""
    from libra_megatron.data.dataset import collate_batch

    if args.sequence_padding == "fixed":
        return collate_batch
    multiple = padding_multiple(args.pad_to_multiple_of, args.tensor_model_parallel_size, args.sequence_parallel)
    return DynamicPaddingCollate(vocab, multiple, args.seq_length)


def align_step(batches: Sequence[Dict[str, torch.Tensor]], vocab: Any, pipeline_parallel: int) -> tuple:
    """(micro-batches, the step's sequence length): with PP > 1 every micro-batch padded to the longest."""
    length = step_seq_length(batches)
    if pipeline_parallel > 1:
        batches = [pad_batch(batch, length, vocab) for batch in batches]
    return list(batches), length


def step_seq_length(batches: Sequence[Dict[str, torch.Tensor]]) -> int:
    """The sequence length the pipeline schedule sends between stages for these micro-batches."""
    return max(int(batch["tokens"].shape[-1]) for batch in batches)
