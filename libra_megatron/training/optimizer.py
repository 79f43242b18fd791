"""The optimizer step's kernels: fused AdamW and host-sync-free gradient norm/clipping for megatron-core.

Without apex or transformer-engine, megatron-core 0.19.2 builds a plain ``torch.optim.AdamW`` (neither ``fused``
nor ``foreach`` set: torch then picks the foreach path, several launches per parameter group and op) and clips
with per-tensor norms read back to the host one by one. :func:`fused_optimizer_kernels` is the one hook that
changes both, around ``get_megatron_optimizer`` (see ``docs/design.md#optimizer-step``):

- megatron picks its ``Adam`` class from whichever fused provider it found (TE, else apex). When it found none,
  :class:`FusedAdamW` is offered as that provider while the optimizer is built: ``torch.optim.AdamW`` with
  ``fused=True`` (one multi-tensor kernel per step on CUDA, a vectorised loop on CPU). Same math (AdamW,
  decoupled weight decay, the same betas/eps/lr/per-group weight decay from megatron's param groups), same state
  (``step``, ``exp_avg``, ``exp_avg_sq``): checkpoints written before load unchanged (``load_state_dict``
  re-applies ``fused`` and moves each ``step`` onto its parameter's device, as fused AdamW keeps it).
- megatron's gradient clipping gets multi-tensor norm and scale kernels (``libra_megatron.ops.multi_tensor``):
  the norm stays on the device and the clip coefficient is applied as a device tensor.

When megatron found apex or transformer-engine, both are left as megatron configured them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import torch

from libra_megatron.ops import multi_tensor


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(..., fused=True)`` with apex FusedAdam's constructor signature (what megatron calls).

    ``adam_w_mode`` must be True (decoupled weight decay: the only mode the trainer uses)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, capturable: bool = False,
                 adam_w_mode: bool = True) -> None:
        if not adam_w_mode:
            raise ValueError("FusedAdamW implements AdamW (decoupled weight decay); megatron asked for L2-mode Adam "
                             "(OptimizerConfig.decoupled_weight_decay=False), which the trainer never configures")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         capturable=capturable, fused=True)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load any AdamW state (fused or not, e.g. written before this class existed) and keep running fused."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None  # saved groups may say fused=None
            for param in group["params"]:
                state = self.state.get(param)
                if state and "step" in state:
                    step = state["step"]
                    # One float32 step tensor per parameter, on its device (what fused AdamW creates itself);
                    # a shared or CPU step would be counted several times or rejected by the fused kernel.
                    state["step"] = (step.detach().to(device=param.device, dtype=torch.float32, copy=True)
                                     if torch.is_tensor(step)
                                     else torch.tensor(float(step), dtype=torch.float32, device=param.device))


@contextlib.contextmanager
def fused_optimizer_kernels() -> Iterator[bool]:
    """Context for ``get_megatron_optimizer``: fused AdamW and device-side grad norm/clip when megatron has no
    apex/TE kernels. Yields whether ours are used. The clipping kernels stay installed (they run at step time)."""
    import megatron.core.optimizer as megatron_optimizer

    if not getattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        yield False  # apex or transformer-engine: megatron already uses their fused kernels
        return
    multi_tensor.install_into_megatron()
    saved = megatron_optimizer.Adam, megatron_optimizer.USING_PYTORCH_OPTIMIZER
    megatron_optimizer.Adam, megatron_optimizer.USING_PYTORCH_OPTIMIZER = FusedAdamW, False
    try:
        yield True
    finally:
        megatron_optimizer.Adam, megatron_optimizer.USING_PYTORCH_OPTIMIZER = saved
