"""The layer's fused kernels against their PyTorch references: RoPE, SwiGLU and the attention inputs (Triton; on CPU
through Triton's interpreter, on GPU natively), the batched bridge GEMM, and the swappable attention core."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from libra_megatron.model.fusions import apply_rope, rope_reference
from tests.model.helpers import make_batch


def _tables(n: int, d: int, dtype=torch.float32, device="cpu"):
    angles = torch.rand(n, 1, d // 2, device=device) * 50
    angles = torch.cat([angles, angles], dim=-1)
    sin = angles.sin()
    sin_signed = torch.cat([-sin[..., : d // 2], sin[..., d // 2:]], dim=-1)
    return angles.cos().to(dtype), sin_signed.to(dtype), angles


def test_reference_is_hf_rotate_half() -> None:
    x = torch.randn(7, 3, 16)
    cos, sin_signed, angles = _tables(7, 16)
    half = 8
    hf = x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()
    torch.testing.assert_close(rope_reference(x, cos, sin_signed), hf, rtol=0, atol=1e-6)
    assert torch.equal(apply_rope(x, cos, sin_signed), rope_reference(x, cos, sin_signed))  # CPU: the reference


def test_bridge_deltas_equal_two_linears() -> None:
    from libra_megatron.model.routed_linear import bridge_deltas

    a, wk, wv = torch.randn(11, 16), torch.randn(40, 8), torch.randn(40, 8)
    dk, dv = bridge_deltas(a, wk, wv)
    torch.testing.assert_close(dk, a[:, :8] @ wk.t())
    torch.testing.assert_close(dv, a[:, 8:] @ wv.t())
    assert dk.is_contiguous() and dv.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton RoPE kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,d", [(32, 128), (3, 16), (5, 96)])
def test_triton_rope_matches_reference(dtype, heads: int, d: int) -> None:
    n = 1031
    fused = torch.randn(n, heads, 3, d, device="cuda", dtype=dtype)
    x = fused[:, :, 1]  # a strided view, as the k of megatron's fused QKV
    cos, sin_signed, _ = _tables(n, d, dtype, "cuda")
    xr = x.detach().float().requires_grad_(True)
    xf = x.detach().clone().requires_grad_(True)
    out_ref = rope_reference(xr, cos.float(), sin_signed.float())
    out = apply_rope(xf, cos, sin_signed)
    assert out.is_contiguous() and out.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), out_ref, **tol)
    grad = torch.randn(n, heads, d, device="cuda", dtype=dtype)
    out_ref.backward(grad.float())
    out.backward(grad)
    torch.testing.assert_close(xf.grad.float(), xr.grad, **tol)
    empty = apply_rope(x[:0], cos[:0], sin_signed[:0])
    assert empty.shape == (0, heads, d)


def test_triton_kernels_match_references_in_the_interpreter_and_compile_for_sm90(tmp_path) -> None:
    """Every Triton kernel of the layer (attention inputs, SwiGLU, RoPE) against its reference, values and grads,
    run by Triton's interpreter on CPU tensors (it must be switched on before triton is imported: a subprocess).
    The interpreter accepts code the GPU compiler refuses, so every launch it made is then compiled ahead of time
    to an sm_90 cubin in bf16, each kernel once in fp32 too (tests/model/triton_aot.py; no GPU needed)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    record = str(tmp_path / "launches.json")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    result = subprocess.run([sys.executable, os.path.join(root, "tests", "model", "fused_kernel_checks.py"), "cpu",
                             "--record", record], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fused kernels match their references on cpu" in result.stdout
    env.pop("TRITON_INTERPRET")
    compiled = subprocess.run([sys.executable, os.path.join(root, "tests", "model", "triton_aot.py"), record],
                              env=env, capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert "compiled for sm_90" in compiled.stdout and "_attention_inputs_bwd" in compiled.stdout


def test_cpu_fallbacks_are_the_references() -> None:
    from libra_megatron.model.fusions import swiglu, swiglu_fused, swiglu_reference

    gate_up = torch.randn(5, 12)
    assert torch.equal(swiglu_fused(gate_up), swiglu_reference(gate_up[:, :6], gate_up[:, 6:]))
    assert torch.equal(swiglu(gate_up[:, :6], gate_up[:, 6:]), swiglu_reference(gate_up[:, :6], gate_up[:, 6:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run natively on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_references_on_cuda(dtype) -> None:
    from tests.model.fused_kernel_checks import check_attention_inputs, check_rope, check_swiglu

    check_attention_inputs("cuda", dtype)
    check_swiglu("cuda", dtype)
    check_rope("cuda", dtype)


def _swapped_core_outputs():
    from megatron.core.transformer.spec_utils import build_module

    from libra_megatron.model.core_attention import EagerCoreAttention, SDPACoreAttention
    from libra_megatron.model.micro_batch import build_micro_batch_routing
    from libra_megatron.model.specs import get_libra_layer_spec
    from tests.model.helpers import tiny_config

    config = tiny_config()
    out = {}
    for layout in ("bos_image_caption", "mixed_offsets"):  # segment plan (lower-right causal runs), index plan
        batch = make_batch(layout)
        routing = build_micro_batch_routing(config, batch["vision_indices"], batch["position_ids"])
        torch.manual_seed(0)
        stream = [torch.randn(n, config.hidden_size) for n in (routing.full.num_text, routing.full.num_vision)]
        results = []
        for core in (SDPACoreAttention, EagerCoreAttention):
            torch.manual_seed(1)
            layer = build_module(get_libra_layer_spec(core_attention=core), config=config, layer_number=1)
            assert type(layer.self_attention.core_attention) is core
            leaves = [t.clone().requires_grad_(True) for t in stream]
            outs = layer(leaves, routing)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
            results.append([o.detach() for o in outs] + [t.grad for t in leaves])
        out[layout] = results
    return out


def test_core_attention_is_swappable_through_the_spec() -> None:
    """The eager reference core, swapped in through the layer spec, gives the SDPA core's outputs and gradients."""
    from tests.distributed import run_on_ranks

    (out,) = run_on_ranks(_swapped_core_outputs, world_size=1)
    for layout, (sdpa, eager) in out.items():
        for a, b in zip(sdpa, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=layout)
