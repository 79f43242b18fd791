"""Gradient-accumulation fusion: the in-place wgrad GEMM equals a separate GEMM + ``add_`` (C++ CPU path, the
PyTorch reference, and the cuBLAS kernel where CUDA exists), megatron finds it under apex's module name, and the
autograd wrappers follow megatron's ``grad_added_to_main_grad`` protocol."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from libra_megatron.ops import wgrad_accum
from libra_megatron.ops.extension import get_extension


def _cuda_available() -> bool:
    ext = get_extension()
    return torch.cuda.is_available() and ext is not None and ext.with_cuda


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_available(),
                                                                 reason="needs CUDA and a CUDA build of _C"))]


def _case(rows, in_features, out_features, dtype, grad_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype).to(device)
    dy = torch.randn(rows, out_features, generator=g).to(dtype).to(device)
    main_grad = torch.randn(out_features, in_features, generator=g).to(grad_dtype).to(device)
    return x, dy, main_grad


def _separate(x, dy, main_grad):
    """The unfused path: a fresh fp64 GEMM, then add_ (fp64 so the comparison bounds the fused error alone)."""
    wgrad = dy.double().reshape(-1, dy.shape[-1]).t() @ x.double().reshape(-1, x.shape[-1])
    return (main_grad.double() + wgrad)


@pytest.fixture(scope="module")
def ext():
    module = get_extension()
    assert module is not None, "libra_megatron._C must be built for the kernel tests (make ext)"
    return module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(37, 24, 16), (256, 64, 8), (1, 5, 3), (0, 4, 6)])
def test_accumulated_wgrad_equals_separate_gemm_and_add(ext, device, dtype, grad_dtype, shape):
    x, dy, main_grad = _case(*shape, dtype, grad_dtype, device)
    expected = _separate(x, dy, main_grad)
    tolerance = 1e-5 if grad_dtype == torch.float32 else 2e-2
    for op in (ext.wgrad_gemm_accum, wgrad_accum.wgrad_gemm_accum, wgrad_accum.wgrad_gemm_accum_reference):
        out = main_grad.clone()
        pointer = out.data_ptr()
        op(x, dy, out)
        assert out.data_ptr() == pointer, "must accumulate in place"
        torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance * shape[0] ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_3d_inputs(ext, device):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(50, 3 * 8, generator=g).to(device)
    x = wide.view(50, 3, 8)[:, 1, :]  # row stride 24, unit inner stride: no copy needed
    dy3 = torch.randn(5, 10, 6, generator=g).to(device)  # [s, b, out] as megatron passes before flattening
    main_grad = torch.zeros(6, 8, device=device)
    ext.wgrad_gemm_accum(x, dy3.reshape(50, 6), main_grad)
    expected = dy3.reshape(50, 6).t() @ x
    torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5)
    transposed = torch.randn(8, 50, generator=g).to(device).t()  # no unit inner stride: copied
    main_grad.zero_()
    ext.wgrad_gemm_accum(transposed, dy3, main_grad)
    torch.testing.assert_close(main_grad, dy3.reshape(50, 6).t() @ transposed, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem(ext):
    x, dy, main_grad = _case(4, 3, 2, torch.float32, torch.float32, "cpu")
    with pytest.raises((RuntimeError, ValueError), match="features"):
        ext.wgrad_gemm_accum(x, dy, main_grad.t().contiguous())
    with pytest.raises(ValueError, match="do not match"):
        wgrad_accum.wgrad_gemm_accum_reference(x, dy, main_grad.t().contiguous())
    with pytest.raises((RuntimeError, ValueError), match="must match"):
        ext.wgrad_gemm_accum(x.bfloat16(), dy, main_grad)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.wgrad_gemm_accum(x, dy, torch.zeros(3, 2).t())
    with pytest.raises(ValueError, match="expected float32"):
        wgrad_accum.wgrad_gemm_accum_fp32(x.bfloat16(), dy.bfloat16(), main_grad.bfloat16())
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        wgrad_accum.wgrad_gemm_accum_fp16(x, dy, main_grad)


def test_megatron_finds_the_module():
    from megatron.core.tensor_parallel import layers

    module = wgrad_accum.install_megatron_module()
    assert sys.modules["fused_weight_gradient_mlp_cuda"] is module
    assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda is module
    x, dy, main_grad = _case(9, 4, 3, torch.float32, torch.float32, "cpu")
    expected = _separate(x, dy, main_grad)
    module.wgrad_gemm_accum_fp32(x, dy, main_grad)
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert wgrad_accum.install_megatron_module() is module


def _tagged_weight(out_features, in_features, seed, main_grad=True, protocol=True):
    weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))
    wgrad_accum.enable_wgrad_accumulation_fusion([torch.nn.ParameterList([weight])])
    if main_grad:
        weight.main_grad = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed + 1))
    if protocol:
        weight.grad_added_to_main_grad = False
    return weight


def test_linear_accumulates_into_main_grad_with_megatron_protocol():
    weight = _tagged_weight(6, 5, 0)
    start = weight.main_grad.clone()
    x = torch.randn(3, 4, 5, requires_grad=True)
    dy = torch.randn(3, 4, 6)
    out = wgrad_accum.linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight))
    out.backward(dy)
    torch.testing.assert_close(x.grad, dy @ weight.detach())
    torch.testing.assert_close(weight.main_grad, start + dy.reshape(-1, 6).t() @ x.detach().reshape(-1, 5))
    assert weight.grad_added_to_main_grad is True
    assert weight.grad is not None and weight.grad.shape == weight.shape  # the dummy that keeps DDP's hook firing


def test_linear_zero_out_wgrad_returns_zeros_and_untagged_weights_are_plain():
    weight = _tagged_weight(4, 3, 2)
    weight.zero_out_wgrad = True
    wgrad_accum.linear(torch.randn(5, 3), weight).sum().backward()
    assert torch.count_nonzero(weight.grad) == 0
    plain = torch.nn.Parameter(torch.randn(4, 3))
    plain.main_grad = torch.zeros(4, 3)
    x = torch.randn(5, 3)
    wgrad_accum.linear(x, plain).sum().backward()
    torch.testing.assert_close(plain.grad, torch.ones(5, 4).t() @ x)
    assert torch.count_nonzero(plain.main_grad) == 0
    no_main = _tagged_weight(4, 3, 3, main_grad=False)
    wgrad_accum.linear(x, no_main).sum().backward()
    torch.testing.assert_close(no_main.grad, torch.ones(5, 4).t() @ x)


def test_stacked_weight_grads_match_the_batched_gemm_and_accumulate():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(7, 3 * 4 + 2, generator=g)
    inputs = a[:, :12].unflatten(1, (3, 4)).transpose(0, 1)  # [k, n, r] strided view, as the model's expert-B node
    grad = torch.randn(3, 7, 5, generator=g)
    expected = list(torch.bmm(grad.transpose(1, 2), inputs).unbind(0))
    plain = [torch.nn.Parameter(torch.randn(5, 4, generator=g)) for _ in range(3)]
    for got, want in zip(wgrad_accum.stacked_weight_grads(plain, grad, inputs), expected):
        torch.testing.assert_close(got, want)
    fused = [_tagged_weight(5, 4, 10 + i) for i in range(3)]
    starts = [w.main_grad.clone() for w in fused]
    dummies = wgrad_accum.stacked_weight_grads(fused, grad, inputs)
    for w, start, want, dummy in zip(fused, starts, expected, dummies):
        torch.testing.assert_close(w.main_grad, start + want)
        assert w.grad_added_to_main_grad and dummy.shape == w.shape
