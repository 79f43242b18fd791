"""Element-wise kernels of the layer: rotary embedding (a fused Triton kernel on GPU, PyTorch elsewhere) and
SwiGLU.

``rope_reference`` is the PyTorch definition (HF's ``x*cos + rotate_half(x)*sin``, with the sign of the first
half folded into ``sin_signed``); ``apply_rope`` runs one Triton kernel per direction on CUDA tensors — one read
and one write of the rows, any row/head strides (so the strided q/k views of the fused QKV need no copy), fp32
arithmetic — and falls back to the reference on CPU or without Triton. tests/model/test_fusions.py checks the
kernel against the reference on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is a megatron-core dependency; kernels launch only on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None


def rope_reference(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``x*cos + roll(x, d/2)*sin_signed`` with ``sin_signed = [-sin_1, sin_2]`` (= HF's rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin_signed


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """LLaMA's ``silu(gate) * up``."""
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xn, stride_xh, stride_cn, stride_on, stride_oh,
                     D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     BACKWARD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col = tl.arange(0, BLOCK_D)
        col_ok = col < D
        rolled = (col + HALF) % D
        cos = tl.load(cos_ptr + row * stride_cn + col, mask=col_ok, other=0.0).to(tl.float32)
        # forward: out_i = x_i c_i + x_r(i) s_i ; backward: dx_j = g_j c_j + g_r(j) s_r(j)   (r(i) = i + d/2 mod d)
        sin = tl.load(sin_ptr + row * stride_cn + (rolled if BACKWARD else col), mask=col_ok, other=0.0).to(tl.float32)
        mask = (head[:, None] < heads) & col_ok[None, :]
        base = x_ptr + row * stride_xn + head[:, None] * stride_xh
        x = tl.load(base + col[None, :], mask=mask, other=0.0).to(tl.float32)
        x_rolled = tl.load(base + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
        out = x * cos[None, :] + x_rolled * sin[None, :]
        dst = out_ptr + row * stride_on + head[:, None] * stride_oh + col[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    n, heads, d = x.shape
    out = torch.empty((n, heads, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // triton.next_power_of_2(d)))
    grid = (n, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
                       D=d, HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d), BACKWARD=backward)
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _launch(grad, cos, sin, backward=True), None, None


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotary embedding of ``x [n, heads, d]`` with per-row tables ``[n, 1, d]`` (see the module docstring)."""
    if triton is None or not x.is_cuda or x.dim() != 3 or x.stride(-1) != 1 or x.shape[-1] % 2:
        return rope_reference(x, cos, sin_signed)
    n, d = x.shape[0], x.shape[-1]
    return _FusedRope.apply(x, cos.reshape(n, d).contiguous(), sin_signed.reshape(n, d).contiguous())
