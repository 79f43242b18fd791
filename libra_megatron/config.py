"""LibraConfig: megatron-core's TransformerConfig plus the Libra fields, and the named presets (docs/architecture.md#config).

    config = libra_config("libra-7b", tensor_model_parallel_size=2, bf16=True, params_dtype=torch.bfloat16)
    config = libra_config("tiny")                       # tests and the CPU demo

Everything LLaMA-specific (RMSNorm, SwiGLU, no biases, no dropout, RoPE) is fixed by the presets; the Libra
fields describe the two-plane vocabulary (``config.vocab`` is the shared :class:`LibraVocab`), the CLIP signal
width, the low-rank expert ratio and the bridge rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from libra_megatron.vocab import LibraVocab


@dataclass
class LibraConfig(TransformerConfig):
    """TransformerConfig with the Libra architecture fields (names follow the HF Libra config where one exists)."""

    text_vocab_size: int = 32000
    """Text vocabulary T; also the offset of image ids (HF ``vocab_size``)."""
    codebook_size: int = 512
    """LFQ codes per codebook K; a vision head has K+2 classes (<boi>, <eoi>)."""
    num_codebooks: int = 2
    """Id planes C (HF ``vision_codebook_num``)."""
    image_resolution: int = 24
    """Patches per side; an image is resolution**2 + 2 positions (HF ``image_feature_resolution``)."""
    clip_feature_size: int = 4096
    """Width F of the continuous CLIP signal per patch (HF ``contiguous_signal_size``)."""
    vision_down_ratio: int = 4
    """Expert rank = out_features / ratio (HF ``vision_down_ratio``)."""
    bridge_rank: int = 8
    """Rank of the four cross-modal bridge maps per layer (HF ``bridge_rank``)."""
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    make_vocab_size_divisible_by: int = 128
    """Text vocab is padded to a multiple of this × TP for the vocab-parallel embedding and head."""
    validate_inputs: bool = True
    """Check ids, image spans and CLIP feature shapes once per micro-batch (one host sync); see docs/design.md."""
    force_general_routing: bool = False
    """Testing/benchmark knob: route with index tensors even when every sample has the same layout."""
    layer_cuda_graphs: bool = False
    """Replay each stage's layers as CUDA graphs (forward and backward) for micro-batches of a fixed layout
    (model/cuda_graphs.py); CUDA only, TP=1, no recompute; ignored on CPU."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalization != "RMSNorm":
            raise ValueError(f"LibraConfig.normalization must be 'RMSNorm' (LLaMA), got {self.normalization!r}")
        if not self.gated_linear_unit or self.add_bias_linear:
            raise ValueError("LibraConfig needs gated_linear_unit=True and add_bias_linear=False (LLaMA SwiGLU)")
        if self.hidden_dropout != 0.0 or self.attention_dropout != 0.0:
            raise ValueError(
                f"Libra uses no dropout (docs/architecture.md#config); got hidden_dropout={self.hidden_dropout}, "
                f"attention_dropout={self.attention_dropout}"
            )
        if self.num_query_groups not in (None, self.num_attention_heads):
            raise ValueError("Libra attention is multi-head (num_query_groups must equal num_attention_heads)")
        if self.hidden_size % self.num_codebooks:
            raise ValueError(f"hidden_size {self.hidden_size} must divide into {self.num_codebooks} codebook embeddings")
        for name, size in (("hidden_size", self.hidden_size), ("ffn_hidden_size", self.ffn_hidden_size)):
            if size % self.vision_down_ratio:
                raise ValueError(f"{name}={size} is not divisible by vision_down_ratio={self.vision_down_ratio}")
        tp = self.tensor_model_parallel_size
        if self.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.recompute_granularity == "selective":
            unsupported = set(self.recompute_modules or ()) - {"core_attn", "mlp"}
            if unsupported:
                raise ValueError(f"Libra selective recompute supports 'core_attn' and 'mlp', not {sorted(unsupported)}")

    # ---- derived sizes ---------------------------------------------------------------------------------------
    @property
    def vocab(self) -> LibraVocab:
        """The shared id space (image id offset = text vocab)."""
        return LibraVocab(
            text_vocab_size=self.text_vocab_size,
            codebook_size=self.codebook_size,
            num_codebooks=self.num_codebooks,
            image_resolution=self.image_resolution,
        )

    @property
    def vision_embedding_size(self) -> int:
        """Width of one codebook embedding table (hidden / C; 2048 at 7B)."""
        return self.hidden_size // self.num_codebooks

    @property
    def signal_size(self) -> int:
        """Input width of the vision signal processor: C·(hidden/C) + F (8192 at 7B)."""
        return self.hidden_size + self.clip_feature_size

    @property
    def attention_rank(self) -> int:
        """Expert rank of q/k/v/o (hidden / ratio)."""
        return self.hidden_size // self.vision_down_ratio

    @property
    def ffn_rank(self) -> int:
        """Expert rank of gate/up (ffn / ratio)."""
        return self.ffn_hidden_size // self.vision_down_ratio

    def padded_text_vocab_size(self, tp: int | None = None) -> int:
        """Text vocab padded for the vocab-parallel layers (the padded logits are masked out of the loss)."""
        multiple = self.make_vocab_size_divisible_by * (tp or self.tensor_model_parallel_size)
        return int(math.ceil(self.text_vocab_size / multiple) * multiple)


def _llama_fields() -> Dict[str, Any]:
    return dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


PRESETS: Dict[str, Dict[str, Any]] = {
    # the released libra-11b config (docs/architecture.md#config)
    "libra-7b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008, layernorm_epsilon=1e-6,
        text_vocab_size=32000, codebook_size=512, num_codebooks=2, image_resolution=24, clip_feature_size=4096,
        vision_down_ratio=4, bridge_rank=8, max_position_embeddings=2048, rotary_base=10000.0,
    ),
    # tests and the CPU demo: tiny widths, the real image geometry (24x24 patches, 578 positions)
    "tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176, layernorm_epsilon=1e-6,
        text_vocab_size=512, codebook_size=512, num_codebooks=2, image_resolution=24, clip_feature_size=128,
        vision_down_ratio=4, bridge_rank=8, max_position_embeddings=2048, rotary_base=10000.0,
    ),
}


def libra_config(preset: Optional[str] = "libra-7b", **overrides: Any) -> LibraConfig:
    """Build a LibraConfig from a named preset; any TransformerConfig/LibraConfig field may be overridden. With
    ``preset=None`` the overrides state the whole architecture (every field of a preset)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown Libra preset {preset!r}; choose one of {sorted(PRESETS)}")
    if preset is None:
        missing = sorted(set(PRESETS["libra-7b"]) - set(overrides))
        if missing:
            raise ValueError(f"libra_config(None, ...) needs every architecture field; missing {missing}")
    fields = {**_llama_fields(), **(PRESETS[preset] if preset else {}), **overrides}
    if fields.get("pipeline_model_parallel_size", 1) > 1 and "pipeline_dtype" not in fields:
        fields["pipeline_dtype"] = fields.get("params_dtype", torch.float32)
    return LibraConfig(**fields)
