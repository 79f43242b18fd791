"""Routed linears: the frozen LLaMA weight for text rows, the low-rank expert ``y = B(Ax)`` for vision rows.

Weights live in megatron-core's own parallel layers (so init, TP attributes and ``sharded_state_dict`` are
theirs) or in :class:`ReplicatedLinear`; the forward is a plain ``F.linear`` on the rows of one modality (``linear``
of ``ops/wgrad_accum.py``: under megatron DDP with gradient-accumulation fusion the weight gradient accumulates
straight into ``main_grad``), with the tensor-parallel communication placed explicitly by the helpers below. Every helper takes *complete*
activations (identical on all TP ranks) and returns complete activations, so text and vision paths can be
merged row-wise without mixing partial and complete gradients.

TP plan (``t`` = TP size, ``r`` = expert rank = out/4):

=============  ===================================================  =======================================
role           text path (frozen LLaMA)                              vision path (low-rank expert)
=============  ===================================================  =======================================
column         ``copy_to_tp(x)`` → ColumnParallel ``W[out/t, in]``   ``A[r, in]`` replicated → ``copy_to_tp``
(q,k,v,gate,                                                         on the r-wide ``Ax`` → ColumnParallel
up, bridges)                                                          ``B[out/t, r]``
row (o, down)  RowParallel ``W[out, in/t]`` → all-reduce (h wide)    RowParallel ``A[r, in/t]`` → all-reduce
                                                                     (r wide) → ``B[out, r]`` replicated
=============  ===================================================  =======================================

Why this plan: the expert's big weights (B of q/k/v/gate/up, A of o/down) are sharded exactly like the dense
weight they stand in for, so memory per rank scales as 1/t; the replicated halves are the small ones, their
gradients are complete on every rank without any extra reduction (the copy sits *after* A, so A sees the
all-reduced r-wide gradient), and the expert's communication is r wide (4x narrower than h) — in backward for
the column role, in forward for the row role. The math is exact: no rank ever adds a partial sum into a
complete tensor.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from libra_megatron.config import LibraConfig
from libra_megatron.ops.wgrad_accum import linear, stacked_weight_grads


def normal_init(std: float) -> Callable[[Tensor], Tensor]:
    """N(0, std) initialiser (docs/architecture.md#initialisation: every new Libra weight uses std 0.02)."""

    def init(tensor: Tensor) -> Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def zeros_init(tensor: Tensor) -> Tensor:
    """Zero initialiser (the bridge B matrices: the bridge starts as the identity)."""
    return torch.nn.init.zeros_(tensor)


def param_device(config: LibraConfig) -> Optional[torch.device]:
    """Where parameters are created: ``None`` (CPU) with ``use_cpu_initialization``, else the current CUDA device."""
    return None if config.use_cpu_initialization else torch.device(torch.cuda.current_device())


class ReplicatedLinear(MegatronModule):
    """A bias-free ``weight [out, in]`` held identically on every TP rank (checkpointed as replicated)."""

    def __init__(self, config: LibraConfig, input_size: int, output_size: int, init_method: Callable) -> None:
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=param_device(config))
        )
        if config.perform_initialization:
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


def column_parallel(
    config: LibraConfig, input_size: int, output_size: int, init_method: Callable, stride: int = 1
) -> ColumnParallelLinear:
    """megatron ColumnParallelLinear used as a weight holder ``[out/t, in]`` (forward via the helpers below)."""
    return ColumnParallelLinear(
        input_size, output_size, config=config, init_method=init_method, bias=False, gather_output=False,
        stride=stride, skip_bias_add=True, disable_grad_reduce=True,
    )


def row_parallel(config: LibraConfig, input_size: int, output_size: int, init_method: Callable) -> RowParallelLinear:
    """megatron RowParallelLinear used as a weight holder ``[out, in/t]``."""
    return RowParallelLinear(
        input_size, output_size, config=config, init_method=init_method, bias=False, input_is_parallel=True,
        skip_bias_add=True,
    )


def copy_to_tp(x: Tensor) -> Tensor:
    """megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward); at TP=1 it is
    the identity both ways, so no autograd node is added (each costs host time per step)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return copy_to_tensor_model_parallel_region(x)


def reduce_from_tp(x: Tensor) -> Tensor:
    """megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward); the identity at TP=1."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x)


def text_column(x: Tensor, weight: Tensor) -> Tensor:
    """Column role, text rows: complete ``x`` → this rank's output shard."""
    return linear(copy_to_tp(x), weight)


def text_row(x_shard: Tensor, weight: Tensor) -> Tensor:
    """Row role, text rows: this rank's input shard → complete output (h-wide all-reduce)."""
    return reduce_from_tp(linear(x_shard, weight))


def expert_column_a(x: Tensor, weight_a: Tensor) -> Tensor:
    """Column role, vision rows, first half: complete ``x`` → complete ``Ax`` ready for the sharded B's.

    The copy after A all-reduces the r-wide gradient, so A's weight gradient and ``x``'s gradient are complete.
    """
    return copy_to_tp(linear(x, weight_a))


def expert_row(x_shard: Tensor, weight_a_shard: Tensor, weight_b: Tensor) -> Tensor:
    """Row role, vision rows: this rank's input shard → ``B · allreduce(A_shard x_shard)`` (r-wide all-reduce)."""
    return linear(reduce_from_tp(linear(x_shard, weight_a_shard)), weight_b)


def batched_b(a: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """Several expert B's of equal shape ``[out, rank]`` in one batched GEMM: ``a = [a_1 ‖ … ‖ a_k]`` ``[n, k·rank]``
    (any row stride) → ``[k, n, out]`` = stacked ``a_i B_i^T`` (see :func:`expert_b_groups`)."""
    return expert_b_groups(a, [weights])[0]


def expert_b_groups(a: Tensor, groups: Sequence[Sequence[Tensor]]) -> Tuple[Tensor, ...]:
    """The expert B's of several groups reading consecutive column blocks of one A output ``a [n, Σ k_g·r_g]``:
    group ``g`` (``k_g`` weights ``[out_g, r_g]``) → ``[k_g, n, out_g]`` = stacked ``a_gi B_gi^T``.

    One autograd node and one batched GEMM per group each way (the expert's GEMMs are small enough to be
    launch-bound on the host): the backward writes the input gradient straight into ``a``'s layout (no split or
    copy) and the weight gradients as one batched GEMM per group. Consumers read the stacked outputs (and write
    their gradients) in place, so there are no unbind/stack copies either.
    """
    flat = [w for group in groups for w in group]
    return _ExpertB.apply(a, tuple(len(group) for group in groups), *flat)


class _ExpertB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, sizes: Tuple[int, ...], *weights: Tensor):  # type: ignore[override]
        outs, stacks, col, index = [], [], 0, 0
        for k in sizes:
            stack = torch.stack(weights[index:index + k])  # [k, out, r]
            r = stack.shape[2]
            outs.append(torch.bmm(_blocks(a, col, k, r), stack.transpose(1, 2)))
            stacks.append(stack)
            col, index = col + k * r, index + k
        ctx.sizes, ctx.weights = sizes, weights  # the parameters: main_grad / fusion protocol (ops/wgrad_accum.py)
        ctx.save_for_backward(a, *stacks)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        a, *stacks = ctx.saved_tensors
        need_a = ctx.needs_input_grad[0]
        grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device) if need_a else None
        weight_grads, col, index = [], 0, 2
        for k, stack, grad in zip(ctx.sizes, stacks, grads):
            r = stack.shape[2]
            if need_a:
                torch.bmm(grad, stack, out=_blocks(grad_a, col, k, r))
            if any(ctx.needs_input_grad[index:index + k]):
                weight_grads += stacked_weight_grads(ctx.weights[index - 2:index - 2 + k], grad, _blocks(a, col, k, r))
            else:
                weight_grads += [None] * k
            col, index = col + k * r, index + k
        return (grad_a, None, *weight_grads)


def _blocks(x: Tensor, col: int, k: int, r: int) -> Tensor:
    """Columns ``[col, col + k·r)`` of ``x [n, C]`` as ``[k, n, r]`` (a strided view)."""
    return x[:, col:col + k * r].unflatten(1, (k, r)).transpose(0, 1)


def bridge_deltas(a: Tensor, weight_k: Tensor, weight_v: Tensor) -> Tuple[Tensor, Tensor]:
    """The k and v bridge B's of one modality: ``a = [a_k ‖ a_v]`` ``[n, 2r]`` → ``(a_k B_k^T, a_v B_v^T)``."""
    delta_k, delta_v = batched_b(a, (weight_k, weight_v)).unbind(0)
    return delta_k, delta_v
