"""Rotary position tables built once per micro-batch from ``position_ids`` (HF LLaMA ``rotate_half`` layout).

Positions are per sample (packed samples restart at 0), so the tables are ``[s, b, 1, d]`` in Megatron's
sequence-first order (the fused attention inputs read the row of each query and key there, attention_inputs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from libra_megatron.rope import rope_inv_freq


@dataclass(eq=False)
class RotaryTables:
    """cos and signed sin (``[-sin_1, sin_2]``, see fusions.rope_reference) in sequence order ``[s, b, 1, d]``."""

    cos: Tensor
    sin: Tensor

    @classmethod
    def build(cls, position_ids: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> "RotaryTables":
        """``position_ids [B, L]`` → tables; frequencies in fp32, cast to the activation dtype like HF."""
        inv_freq = rope_inv_freq(head_dim, base, position_ids.device)
        freqs = (position_ids.t().float()[..., None] * inv_freq).unsqueeze(2)  # [s, b, 1, d/2]
        cos_half, sin_half = freqs.cos().to(dtype), freqs.sin().to(dtype)  # trig on half the width (HF repeats it)
        cos, sin = torch.cat([cos_half, cos_half], dim=-1), torch.cat([-sin_half, sin_half], dim=-1)
        return cls(cos, sin)
