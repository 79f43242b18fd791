"""Host -> device copies that never stall the host."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def to_device_async(tensor: Tensor, device: Union[torch.device, str, None]) -> Tensor:
    """``tensor`` on ``device`` through an asynchronous copy.

    A ``non_blocking`` copy from pageable host memory is synchronous in practice (the driver stages it and the host
    waits), so a CPU tensor bound for a GPU is pinned first; the caching host allocator keeps the pinned block alive
    until the copy has run. Tensors already on ``device``, and CPU targets, are returned as they are."""
    if device is None:
        return tensor
    device = torch.device(device)
    if tensor.device == device or (device.type == tensor.device.type == "cpu"):
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
