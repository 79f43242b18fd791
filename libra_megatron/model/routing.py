"""Modality routing computed once per micro-batch and shared by every routed op of every layer.

Megatron keeps activations as ``[s, b, h]``; flattened, row ``t*b + j`` is position ``t`` of sample ``j``. Libra
keeps its residual stream **sorted by modality** (docs/design.md, "Model"): the embedding writes the text rows
(in increasing row order) followed by the vision rows, every layer works on those two row blocks, and only the
outputs that leave the model in sequence order (the per-position loss, the logits) are put back once. A
:class:`RowPlan` is that permutation:

* **segment plan** (every sample of the micro-batch has the same layout, e.g. ``<s>``, one 578-position image,
  caption): each modality is a few contiguous row ranges, so sorting and unsorting are slices and one ``cat``;
* **index plan** (layouts differ between samples, packed samples): a permutation (text rows first) and its
  inverse; sorting and unsorting are one gather each.

Both are plain differentiable torch ops. :class:`ModalityRouting` holds the plan, this rank's sequence-parallel
chunk of the sorted stream, the time segments the attention uses, the CLIP row map and the modality flag. It is
built from ``vision_indices`` on the host (one device-to-host copy of ``[B, L]`` when the input lives on the GPU;
none when the data loader hands in a CPU tensor), which is also where malformed image spans are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from libra_megatron.utils.transfer import to_device_async
from libra_megatron.vocab import LibraVocab

Segment = Tuple[int, int, bool]  # (start, end, is_vision) in rows (or time steps)


def vision_flag(vision_indices: Tensor, vocab: LibraVocab) -> Tensor:
    """The one definition of an image position: ``vision_indices < 578`` (bool, the shape of ``vision_indices``).

    A micro-batch computes it once, in :meth:`ModalityRouting.build`; everything downstream (input checks, token
    counts, the loss) reads ``routing.is_vision`` (host) or ``routing.vision_mask`` (model device).
    """
    return vision_indices < vocab.text_vision_index


def _runs(flags: Tensor) -> List[Segment]:
    """Maximal runs of equal flags of a 1-D bool tensor as (start, end, flag) (no per-element Python loop)."""
    n = flags.numel()
    if n == 0:
        return []
    starts = [0] + (torch.nonzero(flags[1:] != flags[:-1]).view(-1) + 1).tolist()
    values = flags[starts].tolist()
    ends = starts[1:] + [n]
    return [(s, e, bool(v)) for s, e, v in zip(starts, ends, values)]


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x[index]`` for a permutation ``index`` of ``x``'s rows (``inverse`` its inverse): the backward is the gather
    ``grad[inverse]`` — not autograd's zero-fill + scatter-add of a general ``index_select`` (several times slower
    on CPU)."""
    return _PermuteRows.apply(x, index, inverse)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass(eq=False)
class RowPlan:
    """Text/vision partition of ``num_rows`` flattened rows (see the module docstring)."""

    num_rows: int
    num_text: int
    num_vision: int
    segments: Optional[List[Segment]]
    """Segment plan: (start, end, is_vision) row ranges in sequence order; None for an index plan."""
    permutation: Tensor
    """Sequence row of each sorted row (``[num_rows]``, int64)."""
    inverse_permutation: Tensor
    """Sorted row of each sequence row."""
    batch: int = 0  # b of the [s, b, ...] activations these rows come from (0: only flat rows are accepted)

    @property
    def text_index(self) -> Tensor:
        return self.permutation[: self.num_text]

    @property
    def vision_index(self) -> Tensor:
        return self.permutation[self.num_text:]

    # -- public ops (x has num_rows leading rows: either [rows, ...] or [s, b, ...]) ---------------------------
    def sort(self, x: Tensor) -> Tensor:
        """Rows of ``x`` in sequence order -> sorted by modality (text rows, then vision rows), ``[rows, ...]``."""
        x = self._rows(x)
        if self.segments is not None:
            pieces = [x[s:e] for s, e, v in self.segments if not v] + [x[s:e] for s, e, v in self.segments if v]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return permute_rows(x, self.permutation, self.inverse_permutation)

    def unsort(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`sort`: modality-sorted rows ``[rows, ...]`` -> sequence order ``[rows, ...]``."""
        if rows.shape[0] != self.num_rows:
            raise ValueError(f"routing expects {self.num_rows} rows, got a tensor of shape {tuple(rows.shape)}")
        if self.segments is None:
            return permute_rows(rows, self.inverse_permutation, self.permutation)
        offsets, pieces = {False: 0, True: self.num_text}, []
        for start, end, is_vision in self.segments:
            pieces.append(rows[offsets[is_vision]:offsets[is_vision] + end - start])
            offsets[is_vision] += end - start
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def take(self, x: Tensor, vision: bool) -> Tensor:
        """The rows of one modality of ``x`` (sequence order), in increasing row order."""
        x = self._rows(x)
        if self.segments is None:
            return x.index_select(0, self.vision_index if vision else self.text_index)
        pieces = [x[s:e] for s, e, v in self.segments if v == vision]
        if not pieces:
            return x.new_empty((0, *x.shape[1:]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def split_constant(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(text rows, vision rows) of a tensor without autograd history (tables, labels, ids)."""
        rows = self.sort(x)
        return rows[: self.num_text], rows[self.num_text:]

    def to(self, device: torch.device) -> "RowPlan":
        """The plan with its index tensors on ``device``."""
        return RowPlan(self.num_rows, self.num_text, self.num_vision, self.segments,
                       to_device_async(self.permutation, device),
                       to_device_async(self.inverse_permutation, device), self.batch)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        # [s, b, ...] activations -> [s*b, ...] rows; decided by the known batch size, so b = 1 ([s, 1, ...]) is
        # flattened too while flat rows [s*b, ...] (any tail) pass unchanged
        if self.batch and x.dim() >= 2 and x.shape[1] == self.batch and x.shape[0] * self.batch == self.num_rows:
            x = x.reshape(self.num_rows, *x.shape[2:])
        if x.shape[0] != self.num_rows:
            raise ValueError(f"routing expects {self.num_rows} rows, got a tensor of shape {tuple(x.shape)}")
        return x


def _segment_plan(time_segments: List[Segment], batch: int) -> RowPlan:
    rows = [(start * batch, end * batch, vision) for start, end, vision in time_segments]
    order = [torch.arange(s, e) for s, e, v in rows if not v] + [torch.arange(s, e) for s, e, v in rows if v]
    permutation = torch.cat(order)
    num_vision = sum(e - s for s, e, v in rows if v)
    return RowPlan(permutation.numel(), permutation.numel() - num_vision, num_vision, rows, permutation,
                   _inverse(permutation))


def _index_plan(flat_vision: Tensor) -> RowPlan:
    permutation = torch.argsort(flat_vision.to(torch.int8), stable=True)
    num_vision = int(flat_vision.sum())
    return RowPlan(flat_vision.numel(), flat_vision.numel() - num_vision, num_vision, None, permutation,
                   _inverse(permutation))


def _inverse(permutation: Tensor) -> Tensor:
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel())
    return inverse


@dataclass(eq=False)
class ModalityRouting:
    """Everything the routed ops need about one micro-batch (see the module docstring)."""

    seq_length: int
    batch: int
    full: RowPlan
    local_rows: int
    """Rows of the sorted stream this rank holds: all of them, or its sequence-parallel chunk (``rows / tp``)."""
    local_text_rows: int
    """How many of those are text rows (the chunk's first rows; SP chunk ``r`` is sorted rows
    ``[r * local_rows, (r + 1) * local_rows)``)."""
    time_segments: Optional[List[Segment]]
    """Fast path only: (t0, t1, is_vision) runs shared by every sample."""
    is_vision: Tensor
    """Bool ``[B, L]`` on the host: :func:`vision_flag` of the micro-batch (input checks, token counts)."""
    vision_mask: Tensor
    """``is_vision`` on the model device (the loss's per-modality sums)."""
    attention_mask: Optional[Tensor]
    """Index path only: bool ``[b, 1, s, s]`` (True = may attend), or None for plain causal attention."""
    num_images: int
    clip_rows: Optional[Tensor] = None
    """For each vision row (routing order): index into ``clip_features.view(-1, F)``, or -1 for <boi>/<eoi>."""
    rotary: Optional[object] = field(default=None, repr=False)
    inputs_checked: bool = False
    """True once the micro-batch's ids and labels were validated against this routing (model/micro_batch.py)."""
    kv_cache: Optional[object] = field(default=None, repr=False)
    """Incremental decoding only: the micro-batch's :class:`~libra_megatron.model.kv_cache.LibraKVCache`."""

    @property
    def uniform(self) -> bool:
        return self.time_segments is not None

    @classmethod
    def build(
        cls,
        vision_indices: Tensor,
        vocab: LibraVocab,
        *,
        segment_ids: Optional[Tensor] = None,
        device: Optional[torch.device] = None,
        sequence_parallel_size: int = 1,
        sequence_parallel_rank: int = 0,
        force_index_plan: bool = False,
        validate: bool = True,
    ) -> "ModalityRouting":
        """Build the routing of one micro-batch from ``vision_indices [B, L]`` (and ``segment_ids [B, L]``)."""
        if vision_indices.dim() != 2:
            raise ValueError(f"vision_indices must be [B, L], got shape {tuple(vision_indices.shape)}")
        device = device if device is not None else vision_indices.device
        vi = vision_indices.detach().to("cpu", torch.long)
        batch, seq = vi.shape
        if validate:
            check_image_spans(vi, vocab)
        if sequence_parallel_size > 1 and seq % sequence_parallel_size:
            raise ValueError(
                f"sequence length {seq} is not divisible by the tensor-parallel size {sequence_parallel_size} "
                "required by sequence parallelism; pad the micro-batch (e.g. to a multiple of 8)"
            )
        flag = vision_flag(vi, vocab)  # [B, L], the micro-batch's one computation of the flag
        seg = None if segment_ids is None else segment_ids.detach().to("cpu", torch.long)
        if seg is not None and seg.shape != vi.shape:
            raise ValueError(f"segment_ids must have the shape of vision_indices {tuple(vi.shape)}, got {tuple(seg.shape)}")
        packed = seg is not None and bool((seg != seg[:, :1]).any())
        uniform = not force_index_plan and not packed and bool((flag == flag[:1]).all())

        if uniform:
            time_segments = _runs(flag[0])
            full = _segment_plan(time_segments, batch)
            mask = None
        else:
            time_segments = None
            full = _index_plan(flag.t().reshape(-1))
            mask = None
            if packed:
                causal = torch.ones(seq, seq, dtype=torch.bool).tril()
                mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, L, L]
                mask = to_device_async(mask.unsqueeze(1), device)
        full.batch = batch
        local_rows = full.num_rows // sequence_parallel_size
        local_text = min(max(full.num_text - sequence_parallel_rank * local_rows, 0), local_rows)

        num_images = int((vi == 0).sum())
        clip_rows = _clip_rows(vi, full, vocab)
        return cls(
            seq_length=seq,
            batch=batch,
            full=full.to(device),
            local_rows=local_rows,
            local_text_rows=local_text,
            time_segments=time_segments,
            is_vision=flag,
            vision_mask=to_device_async(flag, device),
            attention_mask=mask,
            num_images=num_images,
            clip_rows=to_device_async(clip_rows, device),
        )


def _clip_rows(vi: Tensor, plan: RowPlan, vocab: LibraVocab) -> Tensor:
    """Row of the flattened CLIP features feeding each vision row; images are numbered by <boi> in (b, t) order."""
    patches = vocab.patches_per_image
    image_number = torch.cumsum((vi == 0).reshape(-1), 0).view_as(vi) - 1  # row-major over (b, t)
    source = image_number * patches + (vi - 1)
    is_patch = (vi >= 1) & (vi <= patches)
    source = torch.where(is_patch, source, torch.full_like(source, -1))
    flat = source.t().reshape(-1)  # [s*b] rows
    _, vision_rows = plan.split_constant(flat)
    return vision_rows.contiguous()


def check_image_spans(vi: Tensor, vocab: LibraVocab) -> None:
    """Raise ValueError unless every vision run of ``vision_indices`` is exactly 0, 1, ..., 577."""
    text = vocab.text_vision_index
    last = vocab.image_positions - 1
    bad_range = (vi < 0) | (vi > text)
    if bool(bad_range.any()):
        b, t = (int(i) for i in torch.nonzero(bad_range)[0])
        raise ValueError(f"vision_indices[{b}, {t}] = {int(vi[b, t])} is outside [0, {text}]")
    prev = torch.cat([torch.full_like(vi[:, :1], text), vi[:, :-1]], dim=1)
    nxt = torch.cat([vi[:, 1:], torch.full_like(vi[:, :1], text)], dim=1)
    bad_start = (vi < text) & (vi > 0) & (vi != prev + 1)
    bad_end = (vi < last) & (nxt != vi + 1)
    bad = bad_start | bad_end
    if bool(bad.any()):
        b, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"vision_indices: the image span around batch row {b}, position {t} is not a complete "
            f"{vocab.image_positions}-position image (<boi>=0, patches 1..{vocab.patches_per_image}, <eoi>={last}); "
            f"found {vi[b, max(t - 2, 0):t + 3].tolist()} at positions {max(t - 2, 0)}..{t + 2}"
        )
