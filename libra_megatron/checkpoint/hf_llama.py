"""HF LLaMA-2 -> Libra: the LLaMA <-> Megatron text-path transforms (docs/architecture.md#llama-megatron-mapping) and a LLaMA checkpoint
seen as a Libra checkpoint in HF key space, with the new vision parameters initialised as docs/architecture.md#initialisation.

Text-path transforms (all on *global* tensors; TP slicing is megatron's ``sharded_state_dict`` business):

* QKV: HF ``q, k, v [nh*d, h]`` -> Megatron ``linear_qkv [(nh + 2 ng) d, h]`` interleaved per query group
  (``[q_g; k_g; v_g]`` for g in groups; for Libra's MHA, per head) — and back.
* SwiGLU: HF ``gate, up [f, h]`` -> ``linear_fc1 [2f, h] = cat(gate, up)`` (the global layout; megatron's swiglu
  sharded factory chunks each half by TP) — and back.
* Vocabulary: rows padded to the engine's padded text vocab (zeros; the padded logits never enter the loss) and
  stripped on export.

A LLaMA-2 checkpoint has exactly Libra's text parameters under the same names (``model.embed_tokens``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the two norms, ``model.norm``,
``lm_head``); :class:`LlamaAsLibra` serves those and creates every vision parameter deterministically from
``(seed, key)``, so the same LLaMA + seed gives the same Libra start at any TP/PP.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Tuple

import torch

from libra_megatron.checkpoint.safe_io import CheckpointError, HFCheckpointReader, read_config_json
from libra_megatron.hf_modeling.configuration_libra import LibraConfig


# ---------------------------------------------------------------------------------------------------- transforms
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v -> Megatron ``linear_qkv`` (per-group interleave)."""
    hidden = q.shape[-1]
    d = q.shape[0] // num_heads
    per_group = num_heads // num_groups
    fused = torch.cat([q.reshape(num_groups, per_group * d, -1), k.reshape(num_groups, d, -1),
                       v.reshape(num_groups, d, -1)], dim=1)
    return fused.reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron ``linear_qkv`` -> HF q, k, v."""
    hidden = qkv.shape[-1]
    per_group = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per_group + 2))
    grouped = qkv.reshape(num_groups, (per_group + 2) * d, -1)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate/up -> Megatron ``linear_fc1`` global layout ``cat(gate, up)``."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron ``linear_fc1`` -> HF gate, up."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows`` (vocab-parallel embedding / output layer)."""
    if padded_rows < weight.shape[0]:
        raise CheckpointError(f"cannot pad a vocabulary of {weight.shape[0]} rows to {padded_rows}")
    if padded_rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])], dim=0)


def strip_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Drop the padding rows of a vocab-parallel weight."""
    if weight.shape[0] < rows:
        raise CheckpointError(f"vocabulary weight has {weight.shape[0]} rows, fewer than the {rows} text ids")
    return weight[:rows]


# ---------------------------------------------------------------------------------------------- LLaMA as Libra
LLAMA_TO_LIBRA_FIELDS = {  # LLaMA config.json field -> LibraConfig field that must agree
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
}


def read_llama_config(folder: str) -> Dict[str, object]:
    """The LLaMA ``config.json`` of ``folder`` (errors name the file)."""
    path, config = read_config_json(folder, "LLaMA config")
    if config.get("model_type") not in ("llama", None):
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}, expected 'llama'")
    return config


def check_llama_matches(llama: Dict[str, object], libra: LibraConfig, source: str) -> None:
    """The LLaMA dimensions must be the Libra model's text dimensions; MHA and untied head only."""
    for llama_field, libra_field in LLAMA_TO_LIBRA_FIELDS.items():
        if llama_field in llama and llama[llama_field] != getattr(libra, libra_field):
            raise CheckpointError(f"{source}: {llama_field}={llama[llama_field]} but the Libra model has "
                                  f"{libra_field}={getattr(libra, libra_field)}")
    heads = llama.get("num_attention_heads")
    if llama.get("num_key_value_heads", heads) != heads:
        raise CheckpointError(f"{source}: num_key_value_heads={llama.get('num_key_value_heads')} (GQA); Libra is MHA")
    if llama.get("tie_word_embeddings", False):
        raise CheckpointError(f"{source}: tie_word_embeddings=true; Libra has an untied lm_head")
    eps = llama.get("rms_norm_eps")
    if eps is not None and abs(float(eps) - libra.rms_norm_eps) > 1e-12:
        import warnings

        warnings.warn(f"{source}: rms_norm_eps={eps} but the Libra model uses {libra.rms_norm_eps} (the released Libra "
                      "config has 1e-6, from the first LLaMA-2 HF configs); the weights convert unchanged")


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_new_parameter(key: str, shape: Tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """docs/architecture.md#initialisation for a parameter LLaMA lacks: norms 1, bridge B 0, everything else N(0, std); seeded by key."""
    if key.endswith("layernorm.weight") or key.endswith("norm.weight"):
        return torch.ones(shape)
    if "bridge" in key and key.endswith("weight_B"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(_key_seed(seed, key))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


class LlamaAsLibra:
    """A LLaMA-2 checkpoint read lazily in Libra's HF key space (parameters only, buffers excluded)."""

    def __init__(self, folder: str, config: LibraConfig, seed: int = 1234, copy_eos_to_pad: bool = True) -> None:
        from libra_megatron.checkpoint.hf_libra import constant_buffers, hf_key_shapes

        self.folder = folder
        self.reader = HFCheckpointReader(folder)
        check_llama_matches(read_llama_config(folder), config, os.path.join(folder, "config.json"))
        self.config, self.seed, self.copy_eos_to_pad = config, seed, copy_eos_to_pad
        buffers = constant_buffers(config)
        self.shapes: Dict[str, Tuple[int, ...]] = {k: s for k, s in hf_key_shapes(config) if k not in buffers}
        self.from_llama = [k for k in self.shapes if k in self.reader.infos]
        ignored = [k for k in self.reader.keys() if k not in self.shapes and not k.endswith("rotary_emb.inv_freq")]
        if ignored:
            raise CheckpointError(f"{folder}: tensors that are not LLaMA-2 text parameters: {ignored[:5]}")
        text = [k for k in self.shapes if not _is_vision_key(k)]
        missing = [k for k in text if k not in self.reader.infos]
        if missing:
            raise CheckpointError(f"{folder}: LLaMA parameters missing: {missing[:5]}")
        for key in self.from_llama:
            if tuple(self.reader.shape(key)) != self.shapes[key]:
                raise CheckpointError(f"{key}: expected shape {list(self.shapes[key])}, found {list(self.reader.shape(key))}")

    def keys(self) -> List[str]:
        return list(self.shapes)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str) -> torch.Tensor:
        """LLaMA weight (embedding pad row := eos row, docs/architecture.md#initialisation) or a freshly initialised vision weight."""
        if key in self.reader.infos:
            value = self.reader.get(key)
            if key == "model.embed_tokens.weight" and self.copy_eos_to_pad:
                value = value.clone()
                value[self.config.pad_token_id] = value[self.config.eos_token_id]
            return value
        return init_new_parameter(key, self.shapes[key], self.config.initializer_range, self.seed)


def _is_vision_key(key: str) -> bool:
    return "vision" in key
