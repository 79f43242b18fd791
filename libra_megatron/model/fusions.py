"""Element-wise kernels of the layer (RoPE, SwiGLU), eager by default; ``config.compile_elementwise`` fuses each
into one Triton kernel per direction with ``torch.compile`` (GPU only; any compile failure falls back to eager)."""
from __future__ import annotations

import logging
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG = logging.getLogger(__name__)


def rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """HF ``x*cos + rotate_half(x)*sin`` as ``x*cos + roll(x, d/2)*sin_signed`` (sin_signed = [-sin_1, sin_2])."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """LLaMA's ``silu(gate) * up``."""
    return F.silu(gate) * up


_COMPILED: Dict[str, Callable] = {}


def elementwise(fn: Callable, enabled: bool) -> Callable:
    """``fn`` itself, or its compiled version when ``enabled`` and CUDA is present."""
    if not enabled or not torch.cuda.is_available():
        return fn
    name = fn.__name__
    if name not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        def guarded(*args: Tensor) -> Tensor:
            if _COMPILED.get(name) is fn:
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as error:  # noqa: BLE001 - a missing toolchain must not stop training
                _LOG.warning("torch.compile of %s failed (%s); using eager kernels", name, error)
                _COMPILED[name] = fn
                return fn(*args)

        _COMPILED[name] = guarded
    return _COMPILED[name]
