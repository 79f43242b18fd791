"""The Hugging Face Libra layout (docs/architecture.md#hf-state-dict): released keys, shapes, constant buffers and config fields.

The engine <-> HF name map builds on this (see ``engine_map`` below once the engine naming is fixed).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from libra_megatron.checkpoint.hf_libra_names import hf_buffers
from libra_megatron.checkpoint.hf_writer import (
    MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    atomic_folder,
    released_config_dict,
    write_export_metadata,
)
from libra_megatron.checkpoint.safe_io import CheckpointError, HFCheckpointReader, read_config_json
from libra_megatron.hf_modeling.configuration_libra import LibraConfig

# config.json fields of the release (docs/architecture.md#config) that a LibraConfig carries
RELEASED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings", "rope_theta",
    "attention_bias", "attention_dropout", "vision_down_ratio", "vision_vocab_size", "vision_codebook_num",
    "max_vision_token_length", "newline_token_id", "vision_embd_pdrop", "vision_resid_pdrop", "contiguous_signal_size",
    "image_feature_resolution", "vision_prediction_mode", "use_bridge", "bridge_rank", "concat_signals",
    "norm_signals", "addition_mode", "use_vision_position_embedding", "unified_head", "use_2d_rope", "resid_pdrop",
    "attn_pdrop", "embd_pdrop",
)


def config_fields(config: LibraConfig) -> Dict[str, object]:
    """The released ``config.json`` values of ``config`` (for ``hf_writer.released_config_dict``)."""
    return {name: getattr(config, name) for name in RELEASED_CONFIG_FIELDS}


def hf_key_shapes(config: LibraConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """Every state-dict key of ``LibraForCausalLM(config)`` (buffers included) with its shape, in export order:
    ``model.*`` in module order (embeddings, layer 0..N-1, final norms), then the heads and top-level buffers."""
    from libra_megatron.hf_modeling.modeling_libra import LibraForCausalLM

    with torch.device("meta"):
        model = LibraForCausalLM(config)
    items = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    return [kv for kv in items if kv[0].startswith("model.")] + [kv for kv in items if not kv[0].startswith("model.")]


def write_hf_libra(out_dir: str, config: LibraConfig, tensors: Iterable[Tuple[str, torch.Tensor]],
                   tokenizer_dir: Optional[str] = None, vision_tokenizer_dir: Optional[str] = None,
                   overwrite: bool = False, dtype: torch.dtype = torch.bfloat16,
                   max_shard_bytes: int = MAX_SHARD_BYTES, progress: Optional[Callable[[str], None]] = None) -> str:
    """Write a complete HF Libra folder from streamed ``(key, tensor)`` parameters (the buffers are added here);
    every key and shape is checked against the released layout. Returns ``out_dir``."""
    key_shapes = hf_key_shapes(config)
    writer_config = released_config_dict(config_fields(config))
    writer_config["torch_dtype"] = str(dtype).replace("torch.", "")
    with atomic_folder(out_dir, overwrite) as folder:
        writer = ShardedSafetensorsWriter(folder, key_shapes, dtype, max_shard_bytes)
        buffers = constant_buffers(config)
        for key, value in tensors:
            if key in buffers:
                raise CheckpointError(f"{key}: is a constant buffer, not a parameter to export")
            writer.add(key, value)
            if progress is not None:
                progress(key)
        for key, value in buffers.items():
            writer.add(key, value)
        writer.close()
        write_export_metadata(folder, writer_config, tokenizer_dir, vision_tokenizer_dir)
    return out_dir


def constant_buffers(config: LibraConfig) -> Dict[str, torch.Tensor]:
    """Values of the released buffers: per-layer ``inv_freq`` and the four placeholders (docs/architecture.md#hf-state-dict)."""
    return hf_buffers(config.num_hidden_layers, config.hidden_size // config.num_attention_heads, config.vocab_size,
                      config.vision_vocab_size, config.hidden_size, config.newline_token_id, config.rope_theta)


def load_hf_libra_config(folder: str) -> LibraConfig:
    """``LibraConfig`` from ``<folder>/config.json`` (released or exported); errors name the file and field."""
    path, raw = read_config_json(folder)
    if raw.get("model_type") != "libra":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'libra'")
    fields = {k: v for k, v in raw.items() if k in RELEASED_CONFIG_FIELDS}
    try:
        config = LibraConfig(**fields)
        config.validate_libra()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err
    return config


def validate_hf_libra(reader: HFCheckpointReader, config: LibraConfig) -> None:
    """Every released parameter present with its shape (buffers may be absent: they are constants); no extra keys."""
    expected = dict(hf_key_shapes(config))
    buffers = constant_buffers(config)
    for key in reader.keys():
        if key not in expected:
            raise CheckpointError(f"{reader.folder}: unexpected tensor {key!r} (not in the Libra layout)")
        if tuple(reader.shape(key)) != expected[key]:
            raise CheckpointError(f"{key}: expected shape {list(expected[key])}, found {list(reader.shape(key))}")
    missing = [k for k in expected if k not in buffers and k not in reader.infos]
    if missing:
        raise CheckpointError(f"{reader.folder}: {len(missing)} parameter(s) missing, e.g. {missing[:5]}")
