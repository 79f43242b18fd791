"""Rotary position tables built once per micro-batch from ``position_ids`` (HF LLaMA ``rotate_half`` layout).

Positions are per sample (packed samples restart at 0), so the tables are ``[s, b, 1, d]`` in Megatron's
sequence-first order, plus the same rows split by modality for the routed queries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from libra_megatron.model.routing import RowPlan
from libra_megatron.rope import rope_inv_freq


@dataclass(eq=False)
class RotaryTables:
    """cos and signed sin (``[-sin_1, sin_2]``, see fusions.rope_reference) in sequence order ``[s, b, 1, d]`` and split by
    modality ``[n_text|n_vision, 1, d]``."""

    cos: Tensor
    sin: Tensor
    cos_text: Tensor
    sin_text: Tensor
    cos_vision: Tensor
    sin_vision: Tensor

    @classmethod
    def build(cls, position_ids: Tensor, plan: RowPlan, head_dim: int, base: float, dtype: torch.dtype) -> "RotaryTables":
        """``position_ids [B, L]`` → tables; frequencies in fp32, cast to the activation dtype like HF."""
        inv_freq = rope_inv_freq(head_dim, base, position_ids.device)
        freqs = position_ids.t().float()[..., None] * inv_freq  # [s, b, d/2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [s, b, 1, d]
        half = head_dim // 2
        sin = angles.sin()
        cos, sin = angles.cos().to(dtype), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).to(dtype)
        cos_text, cos_vision = plan.split_constant(cos)
        sin_text, sin_vision = plan.split_constant(sin)
        return cls(cos, sin, cos_text, sin_text, cos_vision, sin_vision)
