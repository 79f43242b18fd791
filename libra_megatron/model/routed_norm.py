"""Routed RMSNorm: ``weight`` (LLaMA, text rows) and ``vision_weight`` (vision rows), sequence-parallel safe.

Under sequence parallelism the norm runs on this rank's ``[s/t, b, h]`` chunk, so each rank's weight gradient
is a partial sum over its rows: both weights carry ``sequence_parallel=True`` and megatron-core's
``finalize_model_grads`` all-reduces them over TP (exactly as for megatron's own norms).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.routed_linear import param_device


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim (statistics in fp32 for bf16/fp16 inputs, as HF LLaMA)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RoutedRMSNorm(MegatronModule):
    """Two RMSNorm weights routed by modality (HF: ``input_layernorm`` / ``vision_input_layernorm`` etc.)."""

    def __init__(self, config: LibraConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(config=config)
        self.eps = eps
        device = param_device(config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.vision_weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        for param in (self.weight, self.vision_weight):
            param.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, text: Tensor, vision: Tensor) -> Tuple[Tensor, Tensor]:
        """Text rows and vision rows (of the modality-sorted stream) → their normed rows."""
        return rms_norm(text, self.weight, self.eps), rms_norm(vision, self.vision_weight, self.eps)
