"""Routed self-attention with Libra's cross-modal bridge (docs/architecture.md#decoder-layer), one softmax over all keys.

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
from libra_megatron.model.attention_inputs import attention_inputs
from libra_megatron.model.core_attention import SDPACoreAttention
from libra_megatron.model.routed_linear import (
    ReplicatedLinear,
    batched_b,
    column_parallel,
    expert_b_groups,
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
        # text projections (fused QKV, per-head [q; k; v]) and text-key bridge deltas [2, n_t, heads, d]
        qkv_t = text_column(text, self.linear_qkv.weight).view(n_text, heads, 3, d)
        bridge_t = batched_b(expert_column_a(text, self.text_bridge_a.weight),
                             (self.text_bridge_k_b.weight, self.text_bridge_v_b.weight)).view(2, n_text, heads, d)
        # vision expert projections [3, n_v, heads, d] and vision-key bridge deltas [2, n_v, heads, d]
        qkv_v, bridge_v = expert_b_groups(expert_column_a(vision, self.vision_qkv_a.weight), [
            (self.vision_q_b.weight, self.vision_k_b.weight, self.vision_v_b.weight),
            (self.vision_bridge_k_b.weight, self.vision_bridge_v_b.weight)])
        qkv_v, bridge_v = qkv_v.view(3, n_vision, heads, d), bridge_v.view(2, n_vision, heads, d)
        cache = routing.kv_cache
        if cache is not None and cache.has(self.layer_number):
            core = self._decode_attention  # incremental decoding: text queries over the cached text key set
        else:
            core = self._segment_attention if routing.uniform else self._index_attention
        args = (qkv_t, qkv_v, bridge_t, bridge_v)
        if self.checkpoint_core:
            o_t, o_v = tensor_parallel.checkpoint(lambda *a: core(routing, *a), False, *args)
        else:
            o_t, o_v = core(routing, *args)
        out_t = text_row(o_t, self.linear_proj.weight)
        out_v = expert_row(o_v, self.vision_proj_a.weight, self.vision_proj_b.weight)
        return out_t, out_v

    # -- attention: projections (GEMM layouts) -> output rows by modality ------------------------------------------
    def _inputs(self, routing: ModalityRouting, qkv_t: Tensor, qkv_v: Tensor, bridge_t: Tensor, bridge_v: Tensor,
                rows_text: int, rows_vision: int, queries_in_sequence_order: bool = False):
        """Queries (RoPE) and the two bridged key/value sets (RoPE on keys) in one fused op (attention_inputs.py)."""
        plan, rotary = routing.full, routing.rotary
        return attention_inputs(qkv_t, qkv_v, bridge_t, bridge_v, plan.inverse_permutation, plan.permutation,
                                rotary.cos.flatten(0, 1), rotary.sin.flatten(0, 1), rows_text, rows_vision,
                                queries_in_sequence_order)

    def _segment_attention(self, routing: ModalityRouting, qkv_t: Tensor, qkv_v: Tensor, bridge_t: Tensor,
                           bridge_v: Tensor) -> Tuple[Tensor, Tensor]:
        b, heads, d = routing.batch, self.heads_per_rank, self.head_dim
        segments = routing.time_segments
        # A run [0, 1) (e.g. <s> before an image) attends one key, its own position: softmax over one score is
        # exactly 1, so its output is that position's value (its own modality's set leaves it unbridged) — no
        # attention call.
        single = [t0 == 0 and t1 == 1 for t0, t1, _ in segments]
        # each key/value set in sequence order, as far as a query run of its modality reaches: text queries see
        # vision keys bridged, vision queries see text keys bridged
        needed = {m: max([t1 * b for (_, t1, v) in segments if v == m], default=0) for m in (False, True)}
        if routing.kv_cache is not None:  # prefill: the whole text key set goes to the cache
            needed[False] = routing.seq_length * b
        q_t, q_v, k_text, v_text, k_vision, v_vision = self._inputs(routing, qkv_t, qkv_v, bridge_t, bridge_v,
                                                                    needed[False], needed[True])
        if routing.kv_cache is not None:
            routing.kv_cache.extend(self.layer_number, k_text.view(-1, b, heads, d), v_text.view(-1, b, heads, d))
        sets = {False: (k_text, v_text), True: (k_vision, v_vision)}
        # each modality's query rows, one view per run (a split: its backward is one cat, not a zero-fill per run)
        queries = {}
        for is_vision, q in ((False, q_t), (True, q_v)):
            sizes = [(t1 - t0) * b for t0, t1, v in segments if v == is_vision]
            queries[is_vision] = iter(q.split(sizes) if len(sizes) > 1 else [q])
        outputs: dict = {False: [], True: []}
        for (t0, t1, is_vision), one in zip(segments, single):
            q = next(queries[is_vision])
            keys, values = sets[is_vision]
            if one:
                outputs[is_vision].append(values[:b].view(1, b, heads, d))
                continue
            k = _rows_view(keys, 0, t1 * b).view(t1, b, heads, d)
            v = _rows_view(values, 0, t1 * b).view(t1, b, heads, d)
            # causal, queries aligned to the end of the keys (plain causal for t0 == 0)
            outputs[is_vision].append(self.core_attention(q.view(t1 - t0, b, heads, d), k, v))  # [t, b, heads, d]
        return self._rows(outputs[False], q_t), self._rows(outputs[True], q_v)

    def _decode_attention(self, routing: ModalityRouting, qkv_t: Tensor, qkv_v: Tensor, bridge_t: Tensor,
                          bridge_v: Tensor) -> Tuple[Tensor, Tensor]:
        """A decode step (kv_cache.py): the step's text queries attend the cached text key/value set followed by
        their own keys (causal, aligned to the end); the first ``cache.keep`` positions are appended to the cache."""
        if qkv_v.shape[1]:
            raise ValueError("a KV-cache decode step feeds text positions only (image positions go in the prefill)")
        s, b, heads, d = routing.seq_length, routing.batch, self.heads_per_rank, self.head_dim
        cache, rows = routing.kv_cache, routing.seq_length * routing.batch
        q_t, _, k_new, v_new, _, _ = self._inputs(routing, qkv_t, qkv_v, bridge_t, bridge_v, rows, 0)
        k_new, v_new = k_new.view(s, b, heads, d), v_new.view(s, b, heads, d)
        k_all, v_all = cache.extend(self.layer_number, k_new, v_new)  # cached keys, then this step's
        out = self.core_attention(q_t.view(s, b, heads, d), k_all, v_all)
        width = heads * d
        return out.reshape(rows, width), q_t.new_zeros((0, width))

    def _rows(self, pieces: List[Tensor], like: Tensor) -> Tensor:
        width = self.heads_per_rank * self.head_dim
        if not pieces:
            return like.new_zeros((0, width))
        return torch.cat(pieces).reshape(-1, width) if len(pieces) > 1 else pieces[0].reshape(-1, width)

    def _index_attention(self, routing: ModalityRouting, qkv_t: Tensor, qkv_v: Tensor, bridge_t: Tensor,
                         bridge_v: Tensor) -> Tuple[Tensor, Tensor]:
        s, b, heads, d = routing.seq_length, routing.batch, self.heads_per_rank, self.head_dim
        plan, rows = routing.full, routing.full.num_rows
        q, _, k_text, v_text, k_vision, v_vision = self._inputs(routing, qkv_t, qkv_v, bridge_t, bridge_v, rows,
                                                                rows, queries_in_sequence_order=True)
        q = q.view(s, b, heads, d)
        if routing.kv_cache is not None:  # prefill: the text key set goes to the cache
            routing.kv_cache.extend(self.layer_number, k_text.view(s, b, heads, d), v_text.view(s, b, heads, d))
        mask: Optional[Tensor] = routing.attention_mask
        o_text = self.core_attention(q, k_text.view(s, b, heads, d), v_text.view(s, b, heads, d), mask)
        o_vision = self.core_attention(q, k_vision.view(s, b, heads, d), v_vision.view(s, b, heads, d), mask)
        width = heads * d
        return plan.take(o_text.reshape(rows, width), False), plan.take(o_vision.reshape(rows, width), True)


def _rows_view(x: Tensor, start: int, rows: int) -> Tensor:
    """``x[start:start+rows]`` without an autograd slice when it is all of ``x``."""
    return x if start == 0 and rows == x.shape[0] else x[start:start + rows]
