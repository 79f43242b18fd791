"""Modality routing computed once per micro-batch and shared by every routed op of every layer.

Megatron keeps activations as ``[s, b, h]``; flattened, row ``t*b + j`` is position ``t`` of sample ``j``. A
:class:`RowPlan` says which rows are text and which are vision, each modality in increasing row order:

* **segment plan** (the common case: every sample of the micro-batch has the same layout, e.g. ``<s>``, one
  578-position image, caption): each modality is a few contiguous row ranges, so splitting is slicing (a view
  when a modality is one range) and merging is one ``cat``;
* **index plan** (layouts differ between samples, packed samples): a permutation (text rows first) and its
  inverse; splitting and merging are one gather / scatter each.

Both are custom autograd functions whose backward is the exact inverse permutation (no ``index_add``, no
``zeros + slice`` accumulation). :class:`ModalityRouting` holds the plan for the full sequence, the plan for this
rank's sequence-parallel chunk, the time segments the attention uses, and the CLIP row map. It is built from
``vision_indices`` on the host (one device-to-host copy of ``[B, L]`` when the input lives on the GPU; none when
the data loader hands in a CPU tensor), which is also where malformed image spans are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

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


class _SplitBySegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: "RowPlan"):  # type: ignore[override]
        ctx.plan, ctx.tail = plan, x.shape[1:]
        return plan._cat_slices(x, False), plan._cat_slices(x, True)

    @staticmethod
    def backward(ctx, grad_text: Optional[Tensor], grad_vision: Optional[Tensor]):  # type: ignore[override]
        return ctx.plan._interleave(grad_text, grad_vision, ctx.tail), None


class _MergeBySegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text: Tensor, vision: Tensor, plan: "RowPlan"):  # type: ignore[override]
        ctx.plan = plan
        return plan._interleave(text, vision, text.shape[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.plan._cat_slices(grad, False), ctx.plan._cat_slices(grad, True), None


class _MergeAddBySegments(torch.autograd.Function):
    """residual + merge(text, vision), written once into a fresh tensor."""

    @staticmethod
    def forward(ctx, residual: Tensor, text: Tensor, vision: Tensor, plan: "RowPlan"):  # type: ignore[override]
        ctx.plan = plan
        out = torch.empty_like(residual)
        offsets = {False: 0, True: 0}
        for start, end, is_vision in plan.segments:
            part = vision if is_vision else text
            n = end - start
            torch.add(residual[start:end], part[offsets[is_vision]:offsets[is_vision] + n], out=out[start:end])
            offsets[is_vision] += n
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, ctx.plan._cat_slices(grad, False), ctx.plan._cat_slices(grad, True), None


class _MergeBridgedBySegments(torch.autograd.Function):
    """Several merges at once (one autograd node): for each group, the first ``rows`` rows of
    merge(text + text_delta, vision + vision_delta), written once (deltas optional)."""

    @staticmethod
    def forward(ctx, plan: "RowPlan", groups, *tensors):  # type: ignore[override]
        """``groups``: per group (rows, has_text_delta, has_vision_delta); ``tensors``: per group text, vision and
        the deltas present, in that order."""
        ctx.plan, ctx.groups = plan, groups
        ctx.sizes = []
        outs, pos = [], 0
        for rows, has_td, has_vd in groups:
            text, vision = tensors[pos], tensors[pos + 1]
            text_delta = tensors[pos + 2] if has_td else None
            vision_delta = tensors[pos + 2 + has_td] if has_vd else None
            pos += 2 + has_td + has_vd
            ctx.sizes.append((text.shape[0], vision.shape[0]))
            out = text.new_empty((rows, *text.shape[1:]))
            offsets = {False: 0, True: 0}
            for start, end, is_vision in plan.segments:
                if start >= rows:
                    break
                part, delta = (vision, vision_delta) if is_vision else (text, text_delta)
                lo, n = offsets[is_vision], end - start
                if delta is None:
                    out[start:end].copy_(part[lo:lo + n])
                else:
                    torch.add(part[lo:lo + n], delta[lo:lo + n], out=out[start:end])
                offsets[is_vision] += n
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        plan, result = ctx.plan, [None, None]
        for (rows, has_td, has_vd), grad, sizes in zip(ctx.groups, grads, ctx.sizes):
            parts = []
            for is_vision in (False, True):
                pieces = [grad[s:e] for s, e, v in plan.segments if v == is_vision and s < rows]
                missing = sizes[is_vision] - sum(p.shape[0] for p in pieces)
                if missing:
                    pieces.append(grad.new_zeros((missing, *grad.shape[1:])))
                parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces
                             else grad.new_zeros((0, *grad.shape[1:])))
            result += [parts[0], parts[1]] + ([parts[0]] if has_td else []) + ([parts[1]] if has_vd else [])
        return tuple(result)


class _SplitByIndex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: "RowPlan"):  # type: ignore[override]
        ctx.plan = plan
        rows = x.index_select(0, plan.permutation)
        return rows[: plan.num_text], rows[plan.num_text:]

    @staticmethod
    def backward(ctx, grad_text: Optional[Tensor], grad_vision: Optional[Tensor]):  # type: ignore[override]
        plan = ctx.plan
        ref = grad_text if grad_text is not None else grad_vision
        tail = ref.shape[1:]
        grad_text = grad_text if grad_text is not None else ref.new_zeros((plan.num_text, *tail))
        grad_vision = grad_vision if grad_vision is not None else ref.new_zeros((plan.num_vision, *tail))
        return torch.cat([grad_text, grad_vision]).index_select(0, plan.inverse_permutation), None


class _MergeByIndex(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text: Tensor, vision: Tensor, plan: "RowPlan"):  # type: ignore[override]
        ctx.plan = plan
        out = text.new_empty((plan.num_rows, *text.shape[1:]))
        out.index_copy_(0, plan.text_index, text)
        out.index_copy_(0, plan.vision_index, vision)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        rows = grad.index_select(0, ctx.plan.permutation)
        return rows[: ctx.plan.num_text], rows[ctx.plan.num_text:], None


@dataclass(eq=False)
class RowPlan:
    """Text/vision partition of ``num_rows`` flattened rows (see the module docstring)."""

    num_rows: int
    num_text: int
    num_vision: int
    segments: Optional[List[Segment]] = None
    permutation: Optional[Tensor] = None
    inverse_permutation: Optional[Tensor] = None
    batch: int = 0  # b of the [s, b, ...] activations these rows come from (0: only flat rows are accepted)

    @property
    def text_index(self) -> Tensor:
        return self.permutation[: self.num_text]

    @property
    def vision_index(self) -> Tensor:
        return self.permutation[self.num_text:]

    # -- public ops (x has num_rows leading rows: either [rows, ...] or [s, b, ...]) ---------------------------
    def split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Rows of ``x`` -> (text rows, vision rows), each in increasing row order."""
        x = self._rows(x)
        if self.segments is not None:
            return _SplitBySegments.apply(x, self)
        return _SplitByIndex.apply(x, self)

    def merge(self, text: Tensor, vision: Tensor) -> Tensor:
        """Inverse of :meth:`split`: ``[num_rows, ...]``."""
        if self.segments is not None:
            return _MergeBySegments.apply(text, vision, self)
        return _MergeByIndex.apply(text, vision, self)

    def merge_add(self, residual: Tensor, text: Tensor, vision: Tensor) -> Tensor:
        """``residual + merge(text, vision)`` with the shape of ``residual``."""
        rows = self._rows(residual)
        if self.segments is not None:
            out = _MergeAddBySegments.apply(rows, text, vision, self)
        else:
            out = rows + self.merge(text, vision)
        return out.view(residual.shape)

    def merge_bridged(
        self, text: Tensor, vision: Tensor, text_delta: Optional[Tensor] = None,
        vision_delta: Optional[Tensor] = None, rows: Optional[int] = None,
    ) -> Tensor:
        """First ``rows`` rows (default all) of ``merge(text + text_delta, vision + vision_delta)``.

        Segment plans write each row once; ``rows`` must end on a segment boundary.
        """
        return self.merge_bridged_many([(text, vision, text_delta, vision_delta, rows)])[0]

    def merge_bridged_many(self, groups: Sequence[tuple]) -> List[Tensor]:
        """:meth:`merge_bridged` of several ``(text, vision, text_delta, vision_delta, rows)`` groups; a segment
        plan does them all in one autograd node (host time per step matters more than the few copies)."""
        groups = [(t, v, td, vd, self.num_rows if rows is None else rows) for t, v, td, vd, rows in groups]
        if self.segments is not None:
            spec = tuple((rows, td is not None, vd is not None) for _, _, td, vd, rows in groups)
            tensors = [x for t, v, td, vd, _ in groups for x in (t, v, td, vd) if x is not None]
            return list(_MergeBridgedBySegments.apply(self, spec, *tensors))
        outs = []
        for text, vision, text_delta, vision_delta, rows in groups:
            text = text if text_delta is None else text + text_delta
            vision = vision if vision_delta is None else vision + vision_delta
            outs.append(self.merge(text, vision)[:rows])
        return outs

    def split_constant(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`split` for tensors without autograd history (tables, labels)."""
        x = self._rows(x)
        if self.segments is not None:
            return self._cat_slices(x, False), self._cat_slices(x, True)
        rows = x.index_select(0, self.permutation)
        return rows[: self.num_text], rows[self.num_text:]

    def to(self, device: torch.device) -> "RowPlan":
        if self.permutation is None:
            return self
        return RowPlan(self.num_rows, self.num_text, self.num_vision, None,
                       self.permutation.to(device, non_blocking=True),
                       self.inverse_permutation.to(device, non_blocking=True), self.batch)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        # [s, b, ...] activations -> [s*b, ...] rows; decided by the known batch size, so b = 1 ([s, 1, ...]) is
        # flattened too while flat rows [s*b, ...] (any tail) pass unchanged
        if self.batch and x.dim() >= 2 and x.shape[1] == self.batch and x.shape[0] * self.batch == self.num_rows:
            x = x.reshape(self.num_rows, *x.shape[2:])
        if x.shape[0] != self.num_rows:
            raise ValueError(f"routing expects {self.num_rows} rows, got a tensor of shape {tuple(x.shape)}")
        return x

    def _cat_slices(self, x: Tensor, vision: bool) -> Tensor:
        pieces = [x[s:e] for s, e, v in self.segments if v == vision]
        if not pieces:
            return x.new_empty((0, *x.shape[1:]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _interleave(self, text: Optional[Tensor], vision: Optional[Tensor], tail) -> Tensor:
        ref = text if text is not None else vision
        pieces, offsets = [], {False: 0, True: 0}
        for start, end, is_vision in self.segments:
            part = vision if is_vision else text
            n = end - start
            if part is None:
                pieces.append(ref.new_zeros((n, *tail)))
            else:
                pieces.append(part[offsets[is_vision]:offsets[is_vision] + n])
            offsets[is_vision] += n
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _segment_plan(time_segments: List[Segment], batch: int, t0: int = 0, t1: Optional[int] = None) -> RowPlan:
    t1 = t1 if t1 is not None else time_segments[-1][1]
    rows: List[Segment] = []
    for start, end, vision in time_segments:
        lo, hi = max(start, t0), min(end, t1)
        if lo < hi:
            rows.append(((lo - t0) * batch, (hi - t0) * batch, vision))
    num_vision = sum(e - s for s, e, v in rows if v)
    total = (t1 - t0) * batch
    return RowPlan(total, total - num_vision, num_vision, segments=rows)


def _index_plan(flat_vision: Tensor) -> RowPlan:
    permutation = torch.argsort(flat_vision.to(torch.int8), stable=True)
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel())
    num_vision = int(flat_vision.sum())
    return RowPlan(flat_vision.numel(), flat_vision.numel() - num_vision, num_vision, None, permutation, inverse)


@dataclass(eq=False)
class ModalityRouting:
    """Everything the routed ops need about one micro-batch (see the module docstring)."""

    seq_length: int
    batch: int
    full: RowPlan
    local: RowPlan
    """Plan of this rank's sequence-parallel chunk (== ``full`` without SP)."""
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

        chunk = seq // sequence_parallel_size
        c0, c1 = sequence_parallel_rank * chunk, (sequence_parallel_rank + 1) * chunk
        if uniform:
            time_segments = _runs(flag[0])
            full = _segment_plan(time_segments, batch)
            local = full if sequence_parallel_size == 1 else _segment_plan(time_segments, batch, c0, c1)
            mask = None
        else:
            time_segments = None
            flat = flag.t().reshape(-1)
            full = _index_plan(flat)
            local = full if sequence_parallel_size == 1 else _index_plan(flat[c0 * batch:c1 * batch])
            mask = None
            if packed:
                causal = torch.ones(seq, seq, dtype=torch.bool).tril()
                mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, L, L]
                mask = mask.unsqueeze(1).to(device, non_blocking=True)
        full.batch = local.batch = batch

        num_images = int((vi == 0).sum())
        clip_rows = _clip_rows(vi, full, vocab)
        return cls(
            seq_length=seq,
            batch=batch,
            full=full.to(device),
            local=local.to(device),
            time_segments=time_segments,
            is_vision=flag,
            vision_mask=flag.to(device, non_blocking=True),
            attention_mask=mask,
            num_images=num_images,
            clip_rows=clip_rows.to(device, non_blocking=True),
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
