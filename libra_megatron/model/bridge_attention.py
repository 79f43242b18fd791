"""Routed self-attention with Libra's cross-modal bridge (spec §1.5), one softmax over all keys.

Keys/values a query sees depend on the query's modality: the bridge delta ``Δ = B(A h)`` of a key is added only
when the key's modality differs from the query's, and each key uses the bridge of its own modality
(``*_bridge_on_language`` for text keys, ``*_bridge_on_vision`` for vision keys). So there are two key/value
sets in sequence order::

    K_for_vision = merge(k_text + Δk_text, k_vision)      K_for_text = merge(k_text, k_vision + Δk_vision)

Fused attention, exact, each query computed once:

* **segment path** (every sample has the same layout): the sequence is a few runs of one modality. Queries of
  the run ``[t0, t1)`` attend keys ``[0, t1)`` of their modality's set with a causal mask aligned to the lower
  right — one core-attention call per run (3 for ``<s>`` + image + caption), attention FLOPs as for a dense
  layer;
* **index path** (layouts differ, packed samples): two core-attention calls over all queries, one per key/value
  set, with the block-diagonal causal mask; text rows are read from the first, vision rows from the second (the
  softmax is per row, so this is the same math, at 2x attention FLOPs).

The core (softmax(QK^T)V) is the spec submodule ``LibraAttentionSubmodules.core_attention`` (core_attention.py:
SDPA by default), so another attention backend is a spec change.

Projections (see routed_linear.py for the TP plan): text q/k/v is megatron's fused ``linear_qkv`` (per-head
interleaved ``[q_i; k_i; v_i]``), frozen in pretraining; the vision q/k/v experts share one fused A
(``vision_qkv_a`` = q_A, k_A, v_A, k_bridge_on_vision_A, v_bridge_on_vision_A stacked on rows) followed by
per-projection B's; the two bridge B's of a modality run as one batched GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.core_attention import SDPACoreAttention
from libra_megatron.model.fusions import apply_rope
from libra_megatron.model.routed_linear import (
    ReplicatedLinear,
    batched_b,
    bridge_deltas,
    column_parallel,
    expert_column_a,
    expert_row,
    normal_init,
    row_parallel,
    text_column,
    text_row,
    zeros_init,
)
from libra_megatron.model.routing import ModalityRouting


@dataclass
class LibraAttentionSubmodules:
    """Swappable parts of the bridge attention (as megatron-core's ``SelfAttentionSubmodules``)."""

    core_attention: Union[ModuleSpec, type] = SDPACoreAttention
    """softmax(QK^T)V with the call contract of core_attention.py."""


class LibraBridgeAttention(MegatronModule):
    """Text/vision routed Q/K/V/O with the cross-modal K/V bridge."""

    def __init__(self, config: LibraConfig, submodules: Optional[LibraAttentionSubmodules] = None,
                 layer_number: int = 1, pg_collection=None, **kwargs) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        submodules = submodules if submodules is not None else LibraAttentionSubmodules()
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number)
        tp = config.tensor_model_parallel_size
        h, r, br = config.hidden_size, config.attention_rank, config.bridge_rank
        self.heads_per_rank = config.num_attention_heads // tp
        self.head_dim = config.kv_channels
        self.rank, self.bridge_rank = r, br
        expert = normal_init(config.init_method_std)
        # text (LLaMA) path
        self.linear_qkv = column_parallel(config, h, 3 * h, config.init_method)
        self.linear_proj = row_parallel(config, h, h, config.output_layer_init_method)
        # text-key bridge (*_bridge_on_language): A for k and v stacked, B per projection (zero-initialised)
        self.text_bridge_a = ReplicatedLinear(config, h, 2 * br, expert)
        self.text_bridge_k_b = column_parallel(config, br, h, zeros_init)
        self.text_bridge_v_b = column_parallel(config, br, h, zeros_init)
        # vision expert: fused A of q, k, v and of the vision-key bridge (*_bridge_on_vision)
        self.vision_qkv_a = ReplicatedLinear(config, h, 3 * r + 2 * br, expert)
        self.vision_q_b = column_parallel(config, r, h, expert)
        self.vision_k_b = column_parallel(config, r, h, expert)
        self.vision_v_b = column_parallel(config, r, h, expert)
        self.vision_bridge_k_b = column_parallel(config, br, h, zeros_init)
        self.vision_bridge_v_b = column_parallel(config, br, h, zeros_init)
        self.vision_proj_a = row_parallel(config, h, r, expert)
        self.vision_proj_b = ReplicatedLinear(config, r, h, expert)
        self.checkpoint_core = (
            config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ())
        )

    def forward(self, text: Tensor, vision: Tensor, routing: ModalityRouting) -> Tuple[Tensor, Tensor]:
        """Normed rows (complete, ``[n_text, h]`` / ``[n_vision, h]``) → attention output rows (complete)."""
        heads, d = self.heads_per_rank, self.head_dim
        n_text, n_vision = text.shape[0], vision.shape[0]
        # text projections and text-key bridge deltas
        q_t, k_t, v_t = text_column(text, self.linear_qkv.weight).view(n_text, heads, 3, d).unbind(2)
        bridge_t = expert_column_a(text, self.text_bridge_a.weight)
        dk_t, dv_t = (t.view(n_text, heads, d) for t in
                      bridge_deltas(bridge_t, self.text_bridge_k_b.weight, self.text_bridge_v_b.weight))
        # vision expert projections and vision-key bridge deltas
        a_qkv, a_bridge = expert_column_a(vision, self.vision_qkv_a.weight).split(
            [3 * self.rank, 2 * self.bridge_rank], dim=1)
        q_v, k_v, v_v = (t.view(n_vision, heads, d) for t in
                         batched_b(a_qkv, (self.vision_q_b.weight, self.vision_k_b.weight, self.vision_v_b.weight)))
        dk_v, dv_v = (t.view(n_vision, heads, d) for t in
                      bridge_deltas(a_bridge, self.vision_bridge_k_b.weight, self.vision_bridge_v_b.weight))
        # RoPE on the queries here; on the two key sets once they are assembled (RoPE is linear: R(k+Δk) = Rk + RΔk)
        rotary = routing.rotary
        q_t = apply_rope(q_t, rotary.cos_text, rotary.sin_text)
        q_v = apply_rope(q_v, rotary.cos_vision, rotary.sin_vision)

        core = self._segment_attention if routing.uniform else self._index_attention
        args = (q_t, q_v, k_t, k_v, v_t, v_v, dk_t, dk_v, dv_t, dv_v)
        if self.checkpoint_core:
            o_t, o_v = tensor_parallel.checkpoint(lambda *a: core(routing, *a), False, *args)
        else:
            o_t, o_v = core(routing, *args)

        out_t = text_row(o_t, self.linear_proj.weight)
        out_v = expert_row(o_v, self.vision_proj_a.weight, self.vision_proj_b.weight)
        return out_t, out_v

    # -- attention cores: rows by modality (queries, keys, values, bridge deltas) -> output rows by modality --------
    def _segment_attention(self, routing: ModalityRouting, q_t: Tensor, q_v: Tensor, k_t: Tensor, k_v: Tensor,
                           v_t: Tensor, v_v: Tensor, dk_t: Tensor, dk_v: Tensor, dv_t: Tensor, dv_v: Tensor):
        b, heads, d = routing.batch, self.heads_per_rank, self.head_dim
        segments = routing.time_segments
        own_values = {False: v_t, True: v_v}
        # A run [0, 1) (e.g. <s> before an image) attends one key, its own position: softmax over one score is
        # exactly 1, so its output is that position's value from its own modality (unbridged) — no attention call.
        single = [t0 == 0 and t1 == 1 for t0, t1, _ in segments]
        # key/value sets in sequence order, only as far as the last attending run of their query modality reaches:
        # vision queries see text keys bridged, text queries see vision keys bridged
        needed = {m: max([t1 * b for (_, t1, v), one in zip(segments, single) if v == m and not one], default=0)
                  for m in (False, True)}
        used = {id(own_values[v]) for (_, _, v), one in zip(segments, single) if one}
        # both sets (keys and values) in one merge: text queries' set bridges vision keys, and vice versa
        groups, order = [], [m for m in (False, True) if needed[m]]
        for is_vision in order:
            text_delta, vision_delta = ((dk_t, dv_t), (None, None)) if is_vision else ((None, None), (dk_v, dv_v))
            groups += [(k_t, k_v, text_delta[0], vision_delta[0], needed[is_vision]),
                       (v_t, v_v, text_delta[1], vision_delta[1], needed[is_vision])]
            used.update(id(t) for t in (k_t, k_v, v_t, v_v, *(text_delta if is_vision else vision_delta)))
        merged = routing.full.merge_bridged_many(groups)
        rotary, sets = routing.rotary, {}
        for i, is_vision in enumerate(order):
            rows = needed[is_vision]
            keys = apply_rope(merged[2 * i], rotary.cos.flatten(0, 1)[:rows], rotary.sin.flatten(0, 1)[:rows])
            sets[is_vision] = (keys, merged[2 * i + 1])
        # each modality's query rows, one view per run (a split: its backward is one cat, not a zero-fill per run)
        queries = {}
        for is_vision, q in ((False, q_t), (True, q_v)):
            sizes = [(t1 - t0) * b for t0, t1, v in segments if v == is_vision]
            queries[is_vision] = iter(q.split(sizes) if len(sizes) > 1 else [q])
        outputs: dict = {False: [], True: []}
        for (t0, t1, is_vision), one in zip(segments, single):
            q = next(queries[is_vision])
            if one:
                outputs[is_vision].append(own_values[is_vision][:b].view(1, b, heads, d))
                continue
            used.add(id(q_v if is_vision else q_t))
            keys, values = sets[is_vision]
            k = _rows_view(keys, 0, t1 * b).view(t1, b, heads, d)
            v = _rows_view(values, 0, t1 * b).view(t1, b, heads, d)
            # causal, queries aligned to the end of the keys (plain causal for t0 == 0)
            outputs[is_vision].append(self.core_attention(q.view(t1 - t0, b, heads, d), k, v))  # [t, b, heads, d]
        o_t, o_v = self._rows(outputs[False], q_t), self._rows(outputs[True], q_v)
        # every parameter gets a gradient in every micro-batch (megatron DDP's overlapped grad reduce expects the
        # same set each step), also when a layout leaves a projection unused, e.g. no image in the micro-batch
        unused = [t for t in (q_t, q_v, k_t, k_v, v_t, v_v, dk_t, dk_v, dv_t, dv_v) if id(t) not in used]
        return _KeepInGraph.apply(o_t, *unused) if unused else o_t, o_v

    def _key_value_set(self, routing: ModalityRouting, k_t: Tensor, k_v: Tensor, v_t: Tensor, v_v: Tensor,
                       rows: int, text_delta=None, vision_delta=None) -> Tuple[Tensor, Tensor]:
        """First ``rows`` rows of (R(k + bridge Δk on one modality), v + bridge Δv on the same modality)."""
        plan, rotary = routing.full, routing.rotary
        dk_t, dv_t = text_delta if text_delta is not None else (None, None)
        dk_v, dv_v = vision_delta if vision_delta is not None else (None, None)
        keys = plan.merge_bridged(k_t, k_v, text_delta=dk_t, vision_delta=dk_v, rows=rows)
        keys = apply_rope(keys, rotary.cos.flatten(0, 1)[:rows], rotary.sin.flatten(0, 1)[:rows])
        values = plan.merge_bridged(v_t, v_v, text_delta=dv_t, vision_delta=dv_v, rows=rows)
        return keys, values

    def _rows(self, pieces: List[Tensor], like: Tensor) -> Tensor:
        width = self.heads_per_rank * self.head_dim
        if not pieces:
            return like.new_empty((0, width))
        return torch.cat(pieces).reshape(-1, width) if len(pieces) > 1 else pieces[0].reshape(-1, width)

    def _index_attention(self, routing: ModalityRouting, q_t: Tensor, q_v: Tensor, k_t: Tensor, k_v: Tensor,
                         v_t: Tensor, v_v: Tensor, dk_t: Tensor, dk_v: Tensor, dv_t: Tensor, dv_v: Tensor):
        s, b, heads, d = routing.seq_length, routing.batch, self.heads_per_rank, self.head_dim
        plan, rows = routing.full, routing.full.num_rows

        def sbhd(x: Tensor) -> Tensor:
            return x.view(s, b, heads, d)

        q = sbhd(plan.unsort(torch.cat([q_t, q_v])))
        mask: Optional[Tensor] = routing.attention_mask
        k_text, v_text = self._key_value_set(routing, k_t, k_v, v_t, v_v, rows, vision_delta=(dk_v, dv_v))
        k_vision, v_vision = self._key_value_set(routing, k_t, k_v, v_t, v_v, rows, text_delta=(dk_t, dv_t))
        o_text = self.core_attention(q, sbhd(k_text), sbhd(v_text), mask)
        o_vision = self.core_attention(q, sbhd(k_vision), sbhd(v_vision), mask)
        width = heads * d
        return plan.take(o_text.reshape(rows, width), False), plan.take(o_vision.reshape(rows, width), True)


def _rows_view(x: Tensor, start: int, rows: int) -> Tensor:
    """``x[start:start+rows]`` without an autograd slice when it is all of ``x``."""
    return x if start == 0 and rows == x.shape[0] else x[start:start + rows]


class _KeepInGraph(torch.autograd.Function):
    """Identity on ``out`` that gives zero gradients to tensors the attention did not need this micro-batch."""

    @staticmethod
    def forward(ctx, out: Tensor, *unused: Tensor):  # type: ignore[override]
        ctx.specs = [(u.shape, u.dtype, u.device) for u in unused]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return (grad, *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs])
