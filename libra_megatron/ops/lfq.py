"""LFQ code packing (sign bits -> ids) with the C++/CUDA kernel and its pure-PyTorch reference.

Semantics, shared by every implementation: ``bit = (u > 0)`` (so NaN, +0.0 and -0.0 give 0), and the
``D`` bits of codebook ``c`` form ``id_c = sum_k bit_{c,k} * 2**(D-1-k)`` (most significant bit first).
"""
from __future__ import annotations

import torch

from libra_megatron.ops.extension import get_extension


def lfq_codes_reference(logits: torch.Tensor, codebooks: int) -> torch.Tensor:
    """Pure-PyTorch LFQ packing: ``[..., codebooks*D]`` float -> ``[..., codebooks]`` int64 ids."""
    if logits.size(-1) % codebooks != 0:
        raise ValueError(f"last dimension {logits.size(-1)} is not divisible by codebooks={codebooks}")
    bits = logits.size(-1) // codebooks
    signs = (logits > 0).view(*logits.shape[:-1], codebooks, bits).long()
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=logits.device, dtype=torch.long)
    return (signs * weights).sum(-1)


def lfq_codes(logits: torch.Tensor, codebooks: int) -> torch.Tensor:
    """LFQ packing through the extension when available for this device, else the reference."""
    ext = get_extension()
    if ext is not None and (logits.device.type == "cpu" or ext.with_cuda):
        return ext.lfq_codes(logits, codebooks)
    return lfq_codes_reference(logits, codebooks)
