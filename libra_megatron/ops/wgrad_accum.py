"""Weight gradients accumulated in place into megatron's fp32 ``main_grad`` (gradient-accumulation fusion).

Megatron DDP keeps one fp32 ``main_grad`` per trainable weight. Unfused, every backward GEMM writes a fresh
(bf16) weight gradient that autograd hands to DDP's hook, which then runs ``main_grad.add_(grad)``: one extra
launch, one extra read/write of the gradient and a temporary per weight and micro-batch. Fused, the GEMM itself
accumulates: ``main_grad += grad_output^T @ input`` (beta = 1, fp32 accumulation), see
``docs/design.md#gradient-accumulation-fusion``.

- :func:`wgrad_gemm_accum` — the op: cuBLAS with beta = 1 on CUDA (``csrc/wgrad_accum_cuda.cu``), ``addmm_`` on
  CPU (C++ or :func:`wgrad_gemm_accum_reference`, the PyTorch definition both are tested against).
- :func:`install_megatron_module` — registers the op as the module ``fused_weight_gradient_mlp_cuda``
  (``wgrad_gemm_accum_fp32`` / ``wgrad_gemm_accum_fp16``, apex's API) so megatron-core's own linears use it
  when ``TransformerConfig.gradient_accumulation_fusion`` is on.
- :func:`linear` / :func:`stacked_weight_grads` — what Libra's own trainable weights (routed experts, bridges,
  heads) use instead of ``F.linear`` / the batched weight-gradient GEMM inside the model's own batched expert-B
  autograd node. For a weight tagged by :func:`enable_wgrad_accumulation_fusion`
  that has a ``main_grad``, the backward accumulates into it and follows megatron's protocol: it sets
  ``weight.grad_added_to_main_grad = True`` and returns a dummy gradient (zeros under ``zero_out_wgrad``) so
  DDP's hook still fires on the main thread and skips its ``add_``. Untagged weights take plain ``F.linear``.

Every use of a tagged weight must go through these functions: megatron's hook ignores ``param.grad``
once ``grad_added_to_main_grad`` is set, so a gradient arriving through another path would be dropped.
"""
from __future__ import annotations

import sys
import types
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from libra_megatron.ops.extension import get_extension

MEGATRON_MODULE_NAME = "fused_weight_gradient_mlp_cuda"
FUSION_ATTRIBUTE = "fuse_wgrad_accumulation"
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    if main_grad.dim() != 2:
        raise ValueError(f"wgrad_gemm_accum: main_grad must be [out, in], got {tuple(main_grad.shape)}")
    out_features, in_features = main_grad.shape
    if input.shape[-1] != in_features or grad_output.shape[-1] != out_features:
        raise ValueError(f"wgrad_gemm_accum: input {tuple(input.shape)} / grad_output {tuple(grad_output.shape)} "
                         f"do not match main_grad {tuple(main_grad.shape)}")
    if input.numel() // max(in_features, 1) != grad_output.numel() // max(out_features, 1):
        raise ValueError(f"wgrad_gemm_accum: input {tuple(input.shape)} and grad_output "
                         f"{tuple(grad_output.shape)} have different row counts")
    if input.dtype != grad_output.dtype or input.dtype not in _FLOAT_TYPES:
        raise ValueError(f"wgrad_gemm_accum: input/grad_output dtypes {input.dtype}/{grad_output.dtype} must match "
                         "and be float32, float16 or bfloat16")
    if main_grad.dtype not in (torch.float32, input.dtype):
        raise ValueError(f"wgrad_gemm_accum: a {main_grad.dtype} main_grad needs {main_grad.dtype} inputs, "
                         f"got {input.dtype}")


def wgrad_gemm_accum_reference(input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """PyTorch definition: ``main_grad += grad_output[..., out]^T @ input[..., in]`` in ``main_grad``'s dtype."""
    _check(input, grad_output, main_grad)
    out_features, in_features = main_grad.shape
    x = input.reshape(-1, in_features).to(main_grad.dtype)
    g = grad_output.reshape(-1, out_features).to(main_grad.dtype)
    main_grad.addmm_(g.t(), x)


def wgrad_gemm_accum(input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """``main_grad[out, in] += grad_output[..., out]^T @ input[..., in]`` in place, products summed in fp32.

    ``main_grad`` is fp32 (any float inputs) or the inputs' own 16-bit type. cuBLAS (beta = 1) on CUDA when the
    extension is built with CUDA, else the reference (``addmm_``)."""
    ext = get_extension()
    if ext is not None and (main_grad.device.type == "cpu" or (main_grad.is_cuda and ext.with_cuda)):
        ext.wgrad_gemm_accum(input, grad_output, main_grad)
        return
    wgrad_gemm_accum_reference(input, grad_output, main_grad)


def wgrad_gemm_accum_fp32(input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``: fp32 ``main_grad``."""
    if main_grad.dtype != torch.float32:
        raise ValueError(f"wgrad_gemm_accum_fp32: main_grad is {main_grad.dtype}, expected float32")
    wgrad_gemm_accum(input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(input: Tensor, grad_output: Tensor, main_grad: Tensor) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16``: 16-bit ``main_grad`` of the input dtype."""
    if main_grad.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"wgrad_gemm_accum_fp16: main_grad is {main_grad.dtype}, expected float16 or bfloat16")
    wgrad_gemm_accum(input, grad_output, main_grad)


def install_megatron_module() -> types.ModuleType:
    """Register ``fused_weight_gradient_mlp_cuda`` (ours) for megatron-core and return it.

    Idempotent. If megatron's ``tensor_parallel.layers`` was imported before (and found no such module), its
    availability flag and module reference are updated too, so ``gradient_accumulation_fusion=True`` works."""
    module = sys.modules.get(MEGATRON_MODULE_NAME)
    if module is None or getattr(module, "__libra__", False) is False:
        module = types.ModuleType(MEGATRON_MODULE_NAME, "libra-megatron's gradient-accumulation fusion (apex API)")
        module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
        module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
        module.__libra__ = True
        sys.modules[MEGATRON_MODULE_NAME] = module
    layers = sys.modules.get("megatron.core.tensor_parallel.layers")
    if layers is not None:
        layers.fused_weight_gradient_mlp_cuda = module
        layers._grad_accum_fusion_available = True
    return module


def enable_wgrad_accumulation_fusion(modules: Iterable[torch.nn.Module]) -> int:
    """Tag every trainable parameter of ``modules`` so :func:`linear` / :func:`stacked_weight_grads` accumulate its
    weight gradient into ``main_grad``; returns how many were tagged. Call before wrapping in megatron DDP."""
    tagged = 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                setattr(param, FUSION_ATTRIBUTE, True)
                tagged += 1
    return tagged


def _fused(weight: Tensor) -> bool:
    return weight.requires_grad and torch.is_grad_enabled() and getattr(weight, FUSION_ATTRIBUTE, False)


def _weight_grad(weight: Tensor, input: Tensor, grad_output: Tensor) -> Optional[Tensor]:
    """The gradient to return for ``weight``: accumulated into ``main_grad`` when it has one (megatron's
    ``grad_added_to_main_grad`` protocol), else the plain ``grad_output^T @ input``."""
    main_grad = getattr(weight, "main_grad", None)
    out_features, in_features = weight.shape
    if main_grad is None or not getattr(weight, FUSION_ATTRIBUTE, False):
        return grad_output.reshape(-1, out_features).t().matmul(input.reshape(-1, in_features))
    wgrad_gemm_accum(input, grad_output, main_grad)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    # A dummy gradient keeps DDP's grad-accumulator hook firing on the backward thread (megatron does the same).
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


class _LinearAccumulatingWgrad(torch.autograd.Function):
    """``F.linear(x, weight)`` whose weight gradient goes straight into ``weight.main_grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(weight, x, grad) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias), with the weight gradient accumulated in place for tagged weights."""
    if _fused(weight):
        return _LinearAccumulatingWgrad.apply(x, weight)
    return F.linear(x, weight)


def stacked_weight_grads(weights: Sequence[Tensor], grad_output: Tensor, inputs: Tensor) -> List[Optional[Tensor]]:
    """Gradients of k weights ``[out, r]`` from stacked ``grad_output [k, n, out]`` and ``inputs [k, n, r]`` (any
    strides): one batched GEMM when none is fused, else each fused weight accumulated into its ``main_grad``
    (megatron's protocol, as :func:`linear`) and the others computed alone. For custom batched-GEMM nodes."""
    if not any(getattr(w, FUSION_ATTRIBUTE, False) and getattr(w, "main_grad", None) is not None for w in weights):
        return list(torch.bmm(grad_output.transpose(1, 2), inputs).unbind(0))
    return [_weight_grad(w, inputs[i], grad_output[i]) for i, w in enumerate(weights)]
