"""Routed SwiGLU MLP: LLaMA's gate/up/down for text rows, the low-rank expert for vision rows (docs/architecture.md#decoder-layer).

Text: megatron's fused ``linear_fc1`` (``[gate; up]``, stride 2 so rank r holds ``[gate_r; up_r]``) and
``linear_fc2``; checkpoints store fc1 through megatron's SwiGLU sharded factory, so they reshard across TP like
any megatron-core GPT checkpoint. Vision: one fused A for gate and up (``vision_fc1_a`` = gate_A, up_A stacked on
rows, replicated), separate column-parallel B's (no fused sharded weight, no factory needed), row-parallel
down A and replicated down B.
"""
from __future__ import annotations

from typing import Tuple

from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.model.fusions import swiglu_fused
from libra_megatron.model.routed_linear import (
    ReplicatedLinear,
    batched_b,
    column_parallel,
    expert_column_a,
    expert_row,
    normal_init,
    row_parallel,
    text_column,
    text_row,
)


class LibraRoutedMLP(MegatronModule):
    """SwiGLU with a frozen text path and a low-rank vision expert."""

    def __init__(self, config: LibraConfig, pg_collection=None, **kwargs) -> None:
        super().__init__(config=config)
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.ffn_rank, down_rank = config.ffn_rank, config.attention_rank
        expert = normal_init(config.init_method_std)
        self.linear_fc1 = column_parallel(config, h, 2 * ffn, config.init_method, stride=2)
        self.linear_fc2 = row_parallel(config, ffn, h, config.output_layer_init_method)
        self.vision_fc1_a = ReplicatedLinear(config, h, 2 * self.ffn_rank, expert)
        self.vision_gate_b = column_parallel(config, self.ffn_rank, ffn, expert)
        self.vision_up_b = column_parallel(config, self.ffn_rank, ffn, expert)
        self.vision_fc2_a = row_parallel(config, ffn, down_rank, expert)
        self.vision_fc2_b = ReplicatedLinear(config, down_rank, h, expert)
        self.checkpoint_mlp = config.recompute_granularity == "selective" and "mlp" in (config.recompute_modules or ())

    def forward(self, text: Tensor, vision: Tensor) -> Tuple[Tensor, Tensor]:
        """Normed rows (complete) → MLP output rows (complete)."""
        if self.checkpoint_mlp:
            return tensor_parallel.checkpoint(self._forward, False, text, vision)
        return self._forward(text, vision)

    def _forward(self, text: Tensor, vision: Tensor) -> Tuple[Tensor, Tensor]:
        out_t = text_row(swiglu_fused(text_column(text, self.linear_fc1.weight)), self.linear_fc2.weight)
        gate_up = batched_b(expert_column_a(vision, self.vision_fc1_a.weight),
                            (self.vision_gate_b.weight, self.vision_up_b.weight))  # [2, n_v, ffn/t]
        hidden_v = swiglu_fused(gate_up)
        out_v = expert_row(hidden_v, self.vision_fc2_a.weight, self.vision_fc2_b.weight)
        return out_t, out_v

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Default sharding, with megatron's SwiGLU factory for the fused text ``linear_fc1.weight``."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}linear_fc1.weight"
        state[key] = apply_swiglu_sharded_factory(
            state[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False),
            tp_group=self.linear_fc1.tp_group, dp_group=metadata["dp_cp_group"],
        )
        return state
