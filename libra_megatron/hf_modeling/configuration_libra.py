"""Hugging Face configuration of Libra (docs/architecture.md#config): the released ``libra-11b-{base,chat}`` ``config.json`` fields.

This file is copied into every export next to ``modeling_libra.py`` so that
``AutoConfig.from_pretrained(path, trust_remote_code=True)`` works without libra-megatron installed: it imports
only ``transformers``.
"""
from __future__ import annotations

from typing import Any, Dict

try:  # transformers >= 4.57 spells it PreTrainedConfig; older releases only have PretrainedConfig
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - exercised on transformers 4.4x only
    from transformers import PretrainedConfig as _BaseConfig

# Variants present in the reference code but switched off in the release (docs/architecture.md#dormant-variants); this implementation
# supports only the released values and says so at construction time.
_RELEASED_ONLY = {
    "vision_prediction_mode": "1d",
    "concat_signals": True,
    "norm_signals": True,
    "addition_mode": False,
    "unified_head": False,
    "use_2d_rope": False,
    "use_vision_position_embedding": False,
}


class LibraConfig(_BaseConfig):
    """LLaMA-2 fields plus Libra's vision fields; defaults are the released 7B backbone (``libra-11b``)."""

    model_type = "libra"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: Dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        # vision part (docs/architecture.md#config)
        vision_down_ratio: int = 4,
        vision_vocab_size: int = 514,
        vision_codebook_num: int = 2,
        max_vision_token_length: int = 578,
        newline_token_id: int = 13,
        vision_embd_pdrop: float = 0.0,
        vision_resid_pdrop: float = 0.0,
        contiguous_signal_size: int = 4096,
        image_feature_resolution: int = 24,
        vision_prediction_mode: str = "1d",
        use_bridge: bool = True,
        bridge_rank: int = 8,
        concat_signals: bool = True,
        norm_signals: bool = True,
        addition_mode: bool = False,
        use_vision_position_embedding: bool = False,
        unified_head: bool = False,
        use_2d_rope: bool = False,
        resid_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        embd_pdrop: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Libra is MHA only: the released config carries num_key_value_heads == num_attention_heads.
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.rope_theta = rope_theta
        if rope_scaling is not None:
            raise ValueError(f"LibraConfig.rope_scaling={rope_scaling!r}: Libra uses plain RoPE (docs/architecture.md#positions); scaling is not supported")
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout

        self.vision_down_ratio = vision_down_ratio
        self.vision_vocab_size = vision_vocab_size
        self.vision_codebook_num = vision_codebook_num
        self.max_vision_token_length = max_vision_token_length
        self.newline_token_id = newline_token_id
        self.vision_embd_pdrop = vision_embd_pdrop
        self.vision_resid_pdrop = vision_resid_pdrop
        self.contiguous_signal_size = contiguous_signal_size
        self.image_feature_resolution = image_feature_resolution
        self.vision_prediction_mode = vision_prediction_mode
        self.use_bridge = use_bridge
        self.bridge_rank = bridge_rank
        self.concat_signals = concat_signals
        self.norm_signals = norm_signals
        self.addition_mode = addition_mode
        self.use_vision_position_embedding = use_vision_position_embedding
        self.unified_head = unified_head
        self.use_2d_rope = use_2d_rope
        self.resid_pdrop = resid_pdrop
        self.attn_pdrop = attn_pdrop
        self.embd_pdrop = embd_pdrop
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate_libra(self) -> None:
        """Raise ``ValueError`` naming the field when the config asks for something this model cannot run."""
        for field, released in _RELEASED_ONLY.items():
            if getattr(self, field) != released:
                raise ValueError(
                    f"LibraConfig.{field}={getattr(self, field)!r} is a dormant reference variant (docs/architecture.md#dormant-variants); "
                    f"only the released value {released!r} is implemented"
                )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"LibraConfig.num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                f"{self.num_attention_heads} (Libra is multi-head attention only)"
            )
        if self.image_feature_resolution**2 + 2 != self.max_vision_token_length:
            raise ValueError(
                f"LibraConfig.max_vision_token_length={self.max_vision_token_length} must equal "
                f"image_feature_resolution**2 + 2 = {self.image_feature_resolution**2 + 2}"
            )
        if self.hidden_size % self.vision_codebook_num:
            raise ValueError(
                f"LibraConfig.hidden_size={self.hidden_size} must be divisible by vision_codebook_num={self.vision_codebook_num}"
            )
        for field in ("hidden_size", "intermediate_size"):
            if getattr(self, field) % self.vision_down_ratio:
                raise ValueError(
                    f"LibraConfig.{field}={getattr(self, field)} must be divisible by vision_down_ratio={self.vision_down_ratio}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LibraConfig.hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"
            )
