"""RoPE frequencies, the one definition the engine (``model/rotary.py``) and the checkpoint buffers use.

The shipped HF modeling code keeps its own copy because an export must stand alone
(docs/architecture.md#positions).
"""
from __future__ import annotations

from typing import Optional

import torch


def rope_inv_freq(head_dim: int, base: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """``1 / base^(2i / head_dim)`` for ``i < head_dim / 2``, in fp32 (the ``rotate_half`` layout of LLaMA)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
