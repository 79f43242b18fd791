"""Shared helpers for tests that compare megatron-core models across parallel layouts.

Parameters are addressed by their *global* checkpoint key (megatron's ``sharded_state_dict``), so a TP
shard or a pipeline stage can be compared with, or loaded from, a single-process model.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

GlobalPiece = Tuple[str, Tuple[int, ...], Tuple[int, ...], torch.Tensor]


def _sharded_tensors(model: torch.nn.Module) -> Iterable:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            yield value


def _param_by_storage(model: torch.nn.Module) -> Dict[int, torch.nn.Parameter]:
    return {p.data_ptr(): p for p in model.parameters()}


def global_pieces(model: torch.nn.Module, pick: Callable[[torch.nn.Parameter], Optional[torch.Tensor]]) -> List[GlobalPiece]:
    """For each parameter shard: (global key, global shape, global offset, pick(param) as a CPU copy)."""
    params = _param_by_storage(model)
    pieces = []
    for st in _sharded_tensors(model):
        param = params.get(st.data.data_ptr())
        if param is None:
            continue
        value = pick(param)
        if value is None:
            continue
        local_shape = (1,) * st.prepend_axis_num + tuple(param.shape)  # stacked layers: a leading layer axis
        pieces.append(
            (st.key, tuple(st.global_shape), tuple(st.global_offset), value.detach().float().cpu().clone().view(local_shape))
        )
    return pieces


def assemble(pieces_per_rank: Iterable[List[GlobalPiece]]) -> Dict[str, torch.Tensor]:
    """Join shards returned by several ranks into full tensors keyed by global key."""
    full: Dict[str, torch.Tensor] = {}
    for pieces in pieces_per_rank:
        for key, shape, offset, value in pieces:
            target = full.setdefault(key, torch.full(shape, float("nan")))
            index = tuple(slice(o, o + n) for o, n in zip(offset, value.shape))
            target[index] = value
    return full


def load_global(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    """Copy each parameter's slice out of full tensors keyed by global key."""
    params = _param_by_storage(model)
    with torch.no_grad():
        for st in _sharded_tensors(model):
            param = params.get(st.data.data_ptr())
            if param is None:
                continue
            local_shape = (1,) * st.prepend_axis_num + tuple(param.shape)
            index = tuple(slice(o, o + n) for o, n in zip(st.global_offset, local_shape))
            param.copy_(weights[st.key][index].reshape(param.shape))


def assert_close_dicts(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol: float, what: str) -> None:
    """Every key present in both, finite, and equal within ``rtol`` relative to the tensor's max magnitude."""
    assert set(actual) == set(expected), f"{what}: keys differ: {set(actual) ^ set(expected)}"
    for key in expected:
        a, e = actual[key], expected[key]
        assert torch.isfinite(a).all(), f"{what}: {key} has unset or non-finite entries"
        scale = e.abs().max().clamp_min(1e-12)
        err = ((a - e).abs().max() / scale).item()
        assert err <= rtol, f"{what}: {key} differs, relative error {err:.2e} > {rtol:.0e}"
