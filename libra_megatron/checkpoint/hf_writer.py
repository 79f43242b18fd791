"""Writing a Hugging Face Libra export folder (docs/architecture.md#hf-export-layout): bf16 safetensors shards of at most 5 GB planned up front,
``model.safetensors.index.json``, ``config.json`` as released plus ``auto_map``, ``generation_config.json``, the
``trust_remote_code`` modeling files, tokenizer and vision-tokenizer files. Tensors are streamed in: only the shard
being filled is held in memory, and the folder appears atomically (``<out>.partial`` renamed at the end).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from libra_megatron.checkpoint.safe_io import CheckpointError

MAX_SHARD_BYTES = 5 * 10**9  # HF's "5GB"; the released shards are 4.98/4.95/4.98/4.97/2.15 GB
INDEX_NAME = "model.safetensors.index.json"
MODELING_FILES = ("configuration_libra.py", "modeling_libra.py", "cache_libra.py", "generation_libra.py")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# ours (ImageTokenizer.save_pretrained) and the released ones (docs/architecture.md#hf-export-layout)
VISION_TOKENIZER_FILES = ("vision_tokenizer.safetensors", "vision_tokenizer_config.json",
                          "vision_tokenizer_config.yaml", "vqgan.ckpt")
AUTO_MAP = {
    "AutoConfig": "configuration_libra.LibraConfig",
    "AutoModelForCausalLM": "modeling_libra.LibraForCausalLM",
}
KeyShapes = Sequence[Tuple[str, Tuple[int, ...]]]


def plan_shards(key_shapes: KeyShapes, dtype: torch.dtype, max_bytes: int = MAX_SHARD_BYTES) -> List[List[str]]:
    """Group keys, in order, into shards of at most ``max_bytes`` of tensor data (a larger tensor gets its own)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: List[List[str]] = [[]]
    used = 0
    for key, shape in key_shapes:
        size = item * int(torch.Size(shape).numel())
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


class ShardedSafetensorsWriter:
    """Accept tensors by key (any order), write each shard as soon as it is complete, then the index."""

    def __init__(self, folder: str, key_shapes: KeyShapes, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder, self.dtype = folder, dtype
        self.shapes: Dict[str, Tuple[int, ...]] = {k: tuple(s) for k, s in key_shapes}
        if len(self.shapes) != len(key_shapes):
            raise CheckpointError("duplicate keys in the export plan")
        self.shards = plan_shards(key_shapes, dtype, max_shard_bytes)
        total = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.shard_of = {k: i for i, keys in enumerate(self.shards) for k in keys}
        self.pending: List[Dict[str, torch.Tensor]] = [dict() for _ in self.shards]
        self.written = [False] * total
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Check key and shape, convert to the export dtype, and flush the shard once it is full."""
        if key not in self.shapes:
            raise CheckpointError(f"unexpected tensor {key!r}: not one of the released keys")
        if tuple(tensor.shape) != self.shapes[key]:
            raise CheckpointError(f"{key}: expected shape {list(self.shapes[key])}, found {list(tensor.shape)}")
        shard = self.shard_of[key]
        if key in self.pending[shard] or self.written[shard]:
            raise CheckpointError(f"{key}: given twice")
        self.pending[shard][key] = tensor.detach().to("cpu", self.dtype).contiguous()
        if len(self.pending[shard]) == len(self.shards[shard]):
            self._flush(shard)

    def _flush(self, shard: int) -> None:
        from safetensors.torch import save_file

        tensors = {k: self.pending[shard][k] for k in self.shards[shard]}
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(self.folder, self.names[shard]), metadata={"format": "pt"})
        self.pending[shard] = {}
        self.written[shard] = True

    def close(self) -> None:
        """Fail naming the missing keys, else write ``model.safetensors.index.json``."""
        missing = [k for i, keys in enumerate(self.shards) if not self.written[i] for k in keys if k not in self.pending[i]]
        if missing:
            raise CheckpointError(f"export incomplete: {len(missing)} key(s) never produced, e.g. {missing[:5]}")
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {k: self.names[self.shard_of[k]] for k in sorted(self.shapes)},
        }
        write_json(os.path.join(self.folder, INDEX_NAME), index)


def write_json(path: str, payload: dict) -> None:
    """HF's JSON style: indent 2, sorted keys, trailing newline."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def released_config_dict(hf_fields: Dict[str, object]) -> Dict[str, object]:
    """``config.json`` as released (docs/architecture.md#config, the transformers-4.38 LlamaConfig + LibraConfig field set) + ``auto_map``."""
    config = {
        "architectures": ["LibraForCausalLM"],
        "model_type": "libra",
        "auto_map": dict(AUTO_MAP),
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "vision_down_ratio": 4, "vision_vocab_size": 514, "vision_codebook_num": 2, "max_vision_token_length": 578,
        "newline_token_id": 13, "vision_embd_pdrop": 0.0, "vision_resid_pdrop": 0.0, "contiguous_signal_size": 4096,
        "image_feature_resolution": 24, "vision_prediction_mode": "1d", "use_bridge": True, "bridge_rank": 8,
        "concat_signals": True, "norm_signals": True, "addition_mode": False, "use_vision_position_embedding": False,
        "unified_head": False, "use_2d_rope": False, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0,
        "torch_dtype": "bfloat16", "transformers_version": "4.38.2",
    }
    unknown = sorted(set(hf_fields) - set(config))
    if unknown:
        raise ValueError(f"not released config.json fields: {unknown}")
    config.update(hf_fields)
    return config


def generation_config_dict(config: Dict[str, object]) -> Dict[str, object]:
    """``generation_config.json`` as released (docs/architecture.md#hf-export-layout)."""
    return {"_from_model_config": True, "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "transformers_version": config["transformers_version"]}


def modeling_source_dir() -> str:
    """Folder of the modeling files shipped in every export."""
    from libra_megatron import hf_modeling

    return os.path.dirname(os.path.abspath(hf_modeling.__file__))


def write_export_metadata(folder: str, config: Dict[str, object], tokenizer_dir: Optional[str] = None,
                          vision_tokenizer_dir: Optional[str] = None) -> List[str]:
    """Write config/generation config, copy the modeling files and any tokenizer files; return the files copied."""
    write_json(os.path.join(folder, "config.json"), config)
    write_json(os.path.join(folder, "generation_config.json"), generation_config_dict(config))
    copied = []
    source = modeling_source_dir()
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        copied.append(name)
    for src_dir, names, what in ((tokenizer_dir, TOKENIZER_FILES, "tokenizer"),
                                 (vision_tokenizer_dir, VISION_TOKENIZER_FILES, "vision tokenizer")):
        if src_dir is None:
            continue
        found = [n for n in names if os.path.exists(os.path.join(src_dir, n))]
        if not found:
            raise CheckpointError(f"{src_dir}: no {what} files found (looked for {', '.join(names)})")
        for name in found:
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(folder, name))
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield ``<out_dir>.partial``; on success it replaces ``out_dir``, on error it is removed."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists (pass --overwrite to replace it)")
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out_dir)
