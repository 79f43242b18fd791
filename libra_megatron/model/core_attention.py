"""Attention cores: the softmax(QK^T)V step of the bridge attention, a spec submodule so the backend is swappable.

``LibraBridgeAttention`` builds its core from ``LibraAttentionSubmodules.core_attention`` (as megatron-core's
``SelfAttentionSubmodules.core_attention``), so a transformer-engine or flash-attn core is a spec change, not a layer
edit (see ``specs.py``). Every core implements one call:

    core(query [sq, b, heads, d], key [sk, b, heads, d], value [sk, b, heads, d], attention_mask=None)
        -> [sq, b, heads, d]

Megatron's sequence-first layout (any strides: the layer passes views of its row buffers). Without a mask the
attention is causal with the queries aligned to the *end* of the keys (query ``i`` sees keys ``0 .. sk - sq + i``;
for ``sq == sk`` plain causal) — the segment path's runs attend all earlier positions. ``attention_mask`` is a
bool ``[b, 1, sq, sk]`` (True = may attend), used by the index path (packing, mixed layouts). The scale is
``1/sqrt(d)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from libra_megatron.config import LibraConfig


class SDPACoreAttention(MegatronModule):
    """``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels on GPU; the
    lower-right causal bias is served by the flash kernels)."""

    def __init__(self, config: LibraConfig, layer_number: int = 1, **kwargs) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """See the module docstring."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d] views
        sq, sk = q.shape[2], k.shape[2]
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        elif sq == sk:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk))
        return out.permute(2, 0, 1, 3)


class EagerCoreAttention(MegatronModule):
    """The textbook computation in fp32 (scores, mask, softmax, weighted sum): a reference core for tests and for
    devices without fused attention kernels."""

    def __init__(self, config: LibraConfig, layer_number: int = 1, **kwargs) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """See the module docstring."""
        q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attention_mask is None:
            rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
            attention_mask = torch.arange(sk, device=q.device)[None, :] <= rows
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return out.to(query.dtype).permute(2, 0, 1, 3)
