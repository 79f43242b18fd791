"""Multi-tensor gradient norm and scaling with no host synchronisation (apex ``amp_C`` API, torch ``_foreach``).

megatron-core's gradient clipping (``megatron/core/optimizer/clip_grads.py``) calls
``multi_tensor_applier(l2_norm_impl, ...)`` and ``multi_tensor_applier(multi_tensor_scale[_tensor]_impl, ...)``.
Without apex or transformer-engine it falls back to ``megatron.core.utils.local_multi_tensor_*``, which computes
one norm per tensor, reads every norm back to the host (``torch.tensor(list_of_norms)``: one device-to-host sync
per gradient tensor), then reads the total again, and scales tensor by tensor.

The versions here keep everything on the device:

- :func:`multi_tensor_l2norm` — ``torch._foreach_norm`` (fp32) over all tensors, then one norm of the stacked
  per-tensor norms: ``sqrt(sum_i ||g_i||^2)``, returned as a ``[1]`` fp32 tensor like apex's.
- :func:`multi_tensor_scale` / :func:`multi_tensor_scale_tensor` — ``dst = src * scale`` via ``_foreach_mul``,
  with a Python float or a device-side scalar tensor (megatron then computes ``clip_coeff`` on the device and
  clamps it there, so clipping needs no host read of the norm at all).

:func:`install_into_megatron` plugs them into megatron's ``clip_grads`` when it uses its local fallbacks; the
single host read left per step is the trainer logging the grad norm (``docs/design.md#optimizer-step``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

CHUNK_SIZE = 2048 * 32  # apex's chunk size; unused by the foreach kernels, kept for the applier signature


def multi_tensor_applier(op: Callable, noop_flag_buffer: Tensor, tensor_lists: Sequence[List[Tensor]], *args):
    """apex's ``multi_tensor_applier``: ``op(chunk_size, noop_flag, tensor_lists, *args)``."""
    return op(CHUNK_SIZE, noop_flag_buffer, tensor_lists, *args)


def _device_of(tensors: Sequence[Tensor], fallback: Tensor) -> torch.device:
    return tensors[0].device if tensors else fallback.device


def multi_tensor_l2norm(chunk_size: int, noop_flag: Tensor, tensor_lists: Sequence[List[Tensor]],
                        per_tensor: bool, *args) -> Tuple[Tensor, Optional[Tensor]]:
    """L2 norm of all tensors of ``tensor_lists[0]`` as one vector: ``([1] fp32, per-tensor norms or None)``.

    Norms are accumulated in fp32 whatever the gradient dtype; no value leaves the device."""
    tensors = [t for t in tensor_lists[0] if t.numel() > 0]
    if not tensors:
        device = _device_of(tensor_lists[0], noop_flag)
        return torch.zeros(1, dtype=torch.float32, device=device), (
            torch.zeros(len(tensor_lists[0]), dtype=torch.float32, device=device) if per_tensor else None)
    norms = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    total = torch.linalg.vector_norm(norms).reshape(1)
    if not per_tensor:
        return total, None
    if len(tensors) != len(tensor_lists[0]):  # put zeros back for empty tensors
        full = torch.zeros(len(tensor_lists[0]), dtype=torch.float32, device=total.device)
        full[[i for i, t in enumerate(tensor_lists[0]) if t.numel() > 0]] = norms
        norms = full
    return total, norms


def _scaled_into(sources: List[Tensor], destinations: List[Tensor], scale) -> None:
    if len(sources) != len(destinations):
        raise ValueError(f"multi_tensor_scale: {len(sources)} sources but {len(destinations)} destinations")
    if not sources:
        return
    if all(s is d for s, d in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


def multi_tensor_scale(chunk_size: int, noop_flag: Tensor, tensor_lists: Sequence[List[Tensor]],
                       scale: float) -> None:
    """``tensor_lists[1][i] = tensor_lists[0][i] * scale`` for every i (in place when the lists alias)."""
    _scaled_into(tensor_lists[0], tensor_lists[1], float(scale))


def multi_tensor_scale_tensor(chunk_size: int, noop_flag: Tensor, tensor_lists: Sequence[List[Tensor]],
                              scale: Tensor) -> None:
    """:func:`multi_tensor_scale` with a one-element device tensor as the factor (never read on the host)."""
    if scale.numel() != 1:
        raise ValueError(f"multi_tensor_scale_tensor: scale must have one element, got shape {tuple(scale.shape)}")
    _scaled_into(tensor_lists[0], tensor_lists[1], scale.reshape(()))


def install_into_megatron() -> bool:
    """Use these kernels in megatron's gradient clipping if it fell back to its per-tensor local versions.

    Returns True when installed (or already installed), False when megatron found apex/transformer-engine kernels
    (already fused; left alone). Idempotent."""
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core import utils

    if clip_grads.l2_norm_impl is multi_tensor_l2norm:
        return True
    if clip_grads.l2_norm_impl is not getattr(utils, "local_multi_tensor_l2_norm", None):
        return False
    clip_grads.multi_tensor_applier = multi_tensor_applier
    clip_grads.l2_norm_impl = multi_tensor_l2norm
    clip_grads.multi_tensor_scale_impl = multi_tensor_scale
    clip_grads.multi_tensor_scale_tensor_impl = multi_tensor_scale_tensor
    return True
