"""Engine parameter names ⇄ HF Libra names (docs/architecture.md#hf-state-dict), and the tensor-parallel merge/split of every parameter.

Engine names are ``LibraModel.named_parameters()`` names at TP=1 with *global* layer indices
(``decoder.layers.{i}.…``; a pipeline stage's local index ``j`` is global ``j + offset``, see
:func:`global_layer_name`). HF names are the released ``LibraForCausalLM`` keys. Each engine parameter maps to one
or more HF tensors with one of these layouts:

* ``copy``   – the same tensor;
* ``rows``   – HF tensors stacked on dim 0 (fused A's, the two codebook tables/heads, text ``[gate; up]``);
* ``qkv``    – megatron's per-head interleaved ``[q_0; k_0; v_0; q_1; …]`` of the text q/k/v;
* ``vocab``  – text embedding / head padded with extra rows for the vocab-parallel layout (stripped on export).

TP sharding kinds (:func:`merge_tp_shards` / :func:`split_tp`): ``replicated``, ``column`` (dim 0), ``row``
(dim 1), ``swiglu`` (rank r holds ``[gate_r; up_r]``). This module is what the HF converters build on
(libra_megatron/checkpoint/, tools/convert_checkpoint.py); the freezing rule of ``model/training_stages.py`` is
checked against it (``pretrain`` trains exactly the engine parameters whose HF names contain "vision").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from libra_megatron.rope import rope_inv_freq

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamMap:
    """How one engine parameter relates to HF tensors."""

    hf: Tuple[str, ...]
    layout: str  # copy | rows | qkv | vocab
    tp: str  # replicated | column | row | swiglu


_A, _M = "self_attn.", "mlp."
LAYER_MAP: Dict[str, ParamMap] = {
    "input_layernorm.weight": ParamMap(("input_layernorm.weight",), "copy", "replicated"),
    "input_layernorm.vision_weight": ParamMap(("vision_input_layernorm.weight",), "copy", "replicated"),
    "self_attention.linear_qkv.weight": ParamMap(
        (_A + "q_proj.weight", _A + "k_proj.weight", _A + "v_proj.weight"), "qkv", "column"),
    "self_attention.linear_proj.weight": ParamMap((_A + "o_proj.weight",), "copy", "row"),
    "self_attention.text_bridge_a.weight": ParamMap(
        (_A + "vision_k_bridge_on_language.weight_A", _A + "vision_v_bridge_on_language.weight_A"), "rows", "replicated"),
    "self_attention.text_bridge_k_b.weight": ParamMap((_A + "vision_k_bridge_on_language.weight_B",), "copy", "column"),
    "self_attention.text_bridge_v_b.weight": ParamMap((_A + "vision_v_bridge_on_language.weight_B",), "copy", "column"),
    "self_attention.vision_qkv_a.weight": ParamMap(
        (_A + "vision_q_proj.weight_A", _A + "vision_k_proj.weight_A", _A + "vision_v_proj.weight_A",
         _A + "vision_k_bridge_on_vision.weight_A", _A + "vision_v_bridge_on_vision.weight_A"), "rows", "replicated"),
    "self_attention.vision_q_b.weight": ParamMap((_A + "vision_q_proj.weight_B",), "copy", "column"),
    "self_attention.vision_k_b.weight": ParamMap((_A + "vision_k_proj.weight_B",), "copy", "column"),
    "self_attention.vision_v_b.weight": ParamMap((_A + "vision_v_proj.weight_B",), "copy", "column"),
    "self_attention.vision_bridge_k_b.weight": ParamMap((_A + "vision_k_bridge_on_vision.weight_B",), "copy", "column"),
    "self_attention.vision_bridge_v_b.weight": ParamMap((_A + "vision_v_bridge_on_vision.weight_B",), "copy", "column"),
    "self_attention.vision_proj_a.weight": ParamMap((_A + "vision_o_proj.weight_A",), "copy", "row"),
    "self_attention.vision_proj_b.weight": ParamMap((_A + "vision_o_proj.weight_B",), "copy", "replicated"),
    "pre_mlp_layernorm.weight": ParamMap(("post_attention_layernorm.weight",), "copy", "replicated"),
    "pre_mlp_layernorm.vision_weight": ParamMap(("vision_post_attention_layernorm.weight",), "copy", "replicated"),
    "mlp.linear_fc1.weight": ParamMap((_M + "gate_proj.weight", _M + "up_proj.weight"), "rows", "swiglu"),
    "mlp.linear_fc2.weight": ParamMap((_M + "down_proj.weight",), "copy", "row"),
    "mlp.vision_fc1_a.weight": ParamMap((_M + "vision_gate_proj.weight_A", _M + "vision_up_proj.weight_A"), "rows", "replicated"),
    "mlp.vision_gate_b.weight": ParamMap((_M + "vision_gate_proj.weight_B",), "copy", "column"),
    "mlp.vision_up_b.weight": ParamMap((_M + "vision_up_proj.weight_B",), "copy", "column"),
    "mlp.vision_fc2_a.weight": ParamMap((_M + "vision_down_proj.weight_A",), "copy", "row"),
    "mlp.vision_fc2_b.weight": ParamMap((_M + "vision_down_proj.weight_B",), "copy", "replicated"),
}

TOP_MAP: Dict[str, ParamMap] = {
    "embedding.word_embeddings.weight": ParamMap(("model.embed_tokens.weight",), "vocab", "column"),
    "embedding.vision_embeddings.weight": ParamMap(
        ("model.vision_embed_tokens.0.weight", "model.vision_embed_tokens.1.weight"), "rows", "replicated"),
    "embedding.vision_signal_norm_weight": ParamMap(("model.vision_signal_norm.weight",), "copy", "replicated"),
    "embedding.vision_signal_processor.weight": ParamMap(
        ("model.vision_contiguous_signal_processor.weight",), "copy", "replicated"),
    "decoder.final_layernorm.weight": ParamMap(("model.norm.weight",), "copy", "replicated"),
    "decoder.final_layernorm.vision_weight": ParamMap(("model.vision_norm.weight",), "copy", "replicated"),
    "output_layer.weight": ParamMap(("lm_head.weight",), "vocab", "column"),
    "vision_output_layer.weight": ParamMap(
        ("vision_lm_head.heads.0.weight", "vision_lm_head.heads.1.weight"), "rows", "replicated"),
    "vision_hidden_placeholder": ParamMap(("vision_hidden_placeholder",), "copy", "replicated"),
}


def param_map(engine_name: str, num_codebooks: int = 2) -> Tuple[ParamMap, Tuple[str, ...]]:
    """(map, HF names) of one engine parameter; HF names carry the layer index of ``engine_name``."""
    match = _LAYER.match(engine_name)
    if match:
        layer, rest = match.groups()
        if rest not in LAYER_MAP:
            raise KeyError(f"no HF Libra name for engine parameter {engine_name!r}")
        entry = LAYER_MAP[rest]
        return entry, tuple(f"model.layers.{layer}.{name}" for name in entry.hf)
    if engine_name not in TOP_MAP:
        raise KeyError(f"no HF Libra name for engine parameter {engine_name!r}")
    entry = TOP_MAP[engine_name]
    names = entry.hf
    if engine_name in ("embedding.vision_embeddings.weight", "vision_output_layer.weight"):
        stem = names[0].rsplit(".0.", 1)[0]
        names = tuple(f"{stem}.{c}.weight" for c in range(num_codebooks))
    return entry, names


def hf_names(engine_name: str, num_codebooks: int = 2) -> Tuple[str, ...]:
    """The HF Libra names an engine parameter holds."""
    return param_map(engine_name, num_codebooks)[1]


def global_layer_name(local_name: str, layer_offset: int) -> str:
    """``decoder.layers.{j}.x`` of a pipeline stage → ``decoder.layers.{j + offset}.x`` (other names unchanged)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{match.group(2)}"


# -- tensor layouts -----------------------------------------------------------------------------------------------
def split_qkv(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Megatron's interleaved ``linear_qkv`` ``[3h, h]`` → HF q, k, v ``[h, h]`` (multi-head attention)."""
    hidden = qkv.shape[1]
    per_head = qkv.view(num_heads, 3, hidden // num_heads, hidden)
    return tuple(per_head[:, i].reshape(hidden, hidden) for i in range(3))  # type: ignore[return-value]


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Inverse of :func:`split_qkv`."""
    hidden = q.shape[1]
    parts = [t.reshape(num_heads, hidden // num_heads, hidden) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * hidden, hidden)


def _row_sizes(engine_name: str, rows: int, count: int, config) -> List[int]:
    if engine_name.endswith("self_attention.vision_qkv_a.weight"):
        return [config.attention_rank] * 3 + [config.bridge_rank] * 2
    return [rows // count] * count


def engine_to_hf(state: Dict[str, Tensor], config) -> Dict[str, Tensor]:
    """TP=1 engine tensors (global layer names) → HF Libra tensors (vocab padding stripped, fused weights split).

    ``config`` is the engine's LibraConfig (heads, text vocab, codebooks, expert and bridge ranks).
    """
    out: Dict[str, Tensor] = {}
    for name, tensor in state.items():
        entry, names = param_map(name, config.num_codebooks)
        if entry.layout == "copy":
            out[names[0]] = tensor
        elif entry.layout == "vocab":
            out[names[0]] = tensor[: config.text_vocab_size]
        elif entry.layout == "qkv":
            out.update(zip(names, split_qkv(tensor, config.num_attention_heads)))
        else:
            sizes = _row_sizes(name, tensor.shape[0], len(names), config)
            out.update(zip(names, torch.split(tensor, sizes, dim=0)))
    return out


def hf_to_engine(hf: Dict[str, Tensor], engine_names: Sequence[str], config, padded_vocab_size: int) -> Dict[str, Tensor]:
    """HF Libra tensors → TP=1 engine tensors for ``engine_names`` (vocab rows zero-padded to ``padded_vocab_size``)."""
    out: Dict[str, Tensor] = {}
    for name in engine_names:
        entry, names = param_map(name, config.num_codebooks)
        parts = [hf[n] for n in names]
        if entry.layout == "copy":
            out[name] = parts[0]
        elif entry.layout == "vocab":
            pad = padded_vocab_size - parts[0].shape[0]
            out[name] = torch.cat([parts[0], parts[0].new_zeros(pad, parts[0].shape[1])]) if pad else parts[0]
        elif entry.layout == "qkv":
            out[name] = fuse_qkv(*parts, num_heads=config.num_attention_heads)
        else:
            out[name] = torch.cat(parts, dim=0)
    return out


# -- tensor parallelism -------------------------------------------------------------------------------------------
def tp_kind(engine_name: str) -> str:
    """``replicated`` | ``column`` | ``row`` | ``swiglu``."""
    return param_map(engine_name)[0].tp


def merge_tp_shards(engine_name: str, shards: Sequence[Tensor]) -> Tensor:
    """This parameter's local tensors on TP ranks 0..t-1 → the TP=1 tensor."""
    kind = tp_kind(engine_name)
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "column":
        return torch.cat(list(shards), dim=0)
    if kind == "row":
        return torch.cat(list(shards), dim=1)
    gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
    return torch.cat([*gates, *ups], dim=0)


def split_tp(engine_name: str, full: Tensor, tp: int) -> List[Tensor]:
    """Inverse of :func:`merge_tp_shards`: the TP=1 tensor → local tensors of TP ranks 0..t-1."""
    kind = tp_kind(engine_name)
    if kind == "replicated" or tp == 1:
        return [full] * tp
    if kind == "column":
        return list(full.chunk(tp, dim=0))
    if kind == "row":
        return list(full.chunk(tp, dim=1))
    gate, up = full.chunk(2, dim=0)
    return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]


def hf_buffers(num_layers: int, head_dim: int, text_vocab_size: int, vision_vocab_size: int, hidden_size: int,
               newline_id: int = 13, rope_base: float = 10000.0) -> Dict[str, Tensor]:
    """The non-parameter entries of the released state dict (docs/architecture.md#hf-state-dict), with their values."""
    inv_freq = rope_inv_freq(head_dim, rope_base)
    total = text_vocab_size + vision_vocab_size
    newline = torch.full((1, 1, 1, total), float("-inf"))
    newline[..., newline_id] = float("inf")
    out = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(num_layers)}
    out.update({
        "naive_placeholder": torch.zeros(hidden_size),
        "vision_logits_placeholder": torch.full((1, vision_vocab_size), float("-inf")),
        "language_logits_placeholder": torch.full((1, text_vocab_size), float("-inf")),
        "eoi_to_newline_logits_placeholder": newline,
    })
    return out
