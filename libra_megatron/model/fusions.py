"""Element-wise kernels of the layer: rotary embedding and SwiGLU (fused Triton kernels on GPU, PyTorch elsewhere;
the bridge merges + RoPE of all key/value sets are in attention_inputs.py).

``rope_reference`` is the PyTorch definition (HF's ``x*cos + rotate_half(x)*sin``, with the sign of the first
half folded into ``sin_signed``); ``apply_rope`` runs one Triton kernel per direction on CUDA tensors — one read
and one write of the rows, any row/head strides (so the strided q/k views of the fused QKV need no copy), fp32
arithmetic — and falls back to the reference on CPU or without Triton. tests/model/test_fusions.py checks the
kernel against the reference on a GPU. ``swiglu``/``swiglu_fused`` compute ``silu(gate) * up`` in one kernel per
direction (fp32 arithmetic); ``swiglu_fused`` takes megatron's ``[gate | up]`` fc1 output as one tensor and returns
its gradient as one tensor (no split/cat). Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors
(tests/model/fused_kernel_checks.py).
"""
from __future__ import annotations

import os
from typing import Tuple

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


def triton_usable(*tensors: Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors (CUDA, or the interpreter on CPU)."""
    if triton is None:
        return False
    return all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """LLaMA's ``silu(gate) * up`` (the PyTorch definition)."""
    return F.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``: one fused kernel per direction on GPU, the reference elsewhere."""
    if not triton_usable(gate, up) or gate.dim() != 2 or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return swiglu_reference(gate, up)
    return _FusedSwiGLU.apply(gate, up)


def swiglu_fused(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of one tensor holding both: megatron's fc1 output ``[n, 2f]`` = ``[gate | up]``, or the
    expert's stacked ``[2, n, f]``; the gradient is one tensor of that layout (no split/cat)."""
    if not triton_usable(gate_up) or gate_up.dim() not in (2, 3) or gate_up.stride(-1) != 1:
        return swiglu_reference(*_halves(gate_up))
    return _FusedSwiGLUPacked.apply(gate_up)


def _halves(gate_up: Tensor) -> Tuple[Tensor, Tensor]:
    """(gate, up) views of ``[n, 2f]`` (column halves) or ``[2, n, f]`` (planes)."""
    if gate_up.dim() == 3:
        return gate_up[0], gate_up[1]
    gate, up = gate_up.chunk(2, dim=-1)
    return gate, up


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


if triton is not None:

    @triton.jit
    def _swiglu_kernel(g_ptr, u_ptr, go_ptr, out_ptr, dg_ptr, du_ptr, f, sg, su, sgo, so, sdg, sdu,
                       BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < f
        gate = tl.load(g_ptr + row * sg + col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(u_ptr + row * su + col, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        if BACKWARD:
            grad = tl.load(go_ptr + row * sgo + col, mask=ok, other=0.0).to(tl.float32)
            tl.store(dg_ptr + row * sdg + col, (grad * up * sig * (1.0 + gate * (1.0 - sig))).to(
                dg_ptr.dtype.element_ty), mask=ok)
            tl.store(du_ptr + row * sdu + col, (grad * silu).to(du_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(out_ptr + row * so + col, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)


def _swiglu_launch(gate: Tensor, up: Tensor, grad: Tensor = None, dgate: Tensor = None, dup: Tensor = None):
    n, f = gate.shape
    block = min(1024, triton.next_power_of_2(max(f, 1)))
    out = None if grad is not None else gate.new_empty((n, f))
    if n and f:
        dummy = out if out is not None else grad
        _swiglu_kernel[(n, triton.cdiv(f, block))](
            gate, up, grad if grad is not None else dummy, dummy, dgate if dgate is not None else dummy,
            dup if dup is not None else dummy, f, gate.stride(0), up.stride(0), dummy.stride(0), dummy.stride(0),
            dgate.stride(0) if dgate is not None else 0, dup.stride(0) if dup is not None else 0,
            BLOCK=block, BACKWARD=grad is not None)
    return out


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return _swiglu_launch(gate, up)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(up)
        _swiglu_launch(gate, up, grad.contiguous(), dgate, dup)
        return dgate, dup


class _FusedSwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor):  # type: ignore[override]
        ctx.save_for_backward(gate_up)
        return _swiglu_launch(*_halves(gate_up))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (gate_up,) = ctx.saved_tensors
        d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        gate, up = _halves(gate_up)
        dgate, dup = _halves(d_gate_up)
        _swiglu_launch(gate, up, grad.contiguous(), dgate, dup)
        return d_gate_up


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
    if not triton_usable(x) or x.dim() != 3 or x.stride(-1) != 1 or x.shape[-1] % 2:
        return rope_reference(x, cos, sin_signed)
    n, d = x.shape[0], x.shape[-1]
    return _FusedRope.apply(x, cos.reshape(n, d).contiguous(), sin_signed.reshape(n, d).contiguous())
