"""Kernel-vs-reference checks of the layer's fused Triton kernels, run by tests/model/test_fusions.py in a subprocess
with ``TRITON_INTERPRET=1`` on CPU (the interpreter must be switched on before triton is imported), and directly on
CUDA by bench/gpu_check.sh."""
from __future__ import annotations

import sys
from typing import Dict

import torch


def _random_attention_inputs(n_text: int, n_vision: int, heads: int, d: int, device: str, dtype: torch.dtype,
                             seed: int) -> Dict:
    g = torch.Generator().manual_seed(seed)
    n = n_text + n_vision

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    fused = rand(n_text, heads * 3 * d).view(n_text, heads, 3, d)
    qkv_vision = rand(3, n_vision, heads * d).view(3, n_vision, heads, d)
    bridge_text = rand(2, n_text, heads * d).view(2, n_text, heads, d)
    bridge_vision = rand(2, n_vision, heads * d).view(2, n_vision, heads, d)
    sorted_to_seq = torch.randperm(n, generator=g)
    seq_to_sorted = torch.empty_like(sorted_to_seq)
    seq_to_sorted[sorted_to_seq] = torch.arange(n)
    angles = torch.rand(n, 1, d // 2, generator=g) * 40
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(device, dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(device, dtype)
    return dict(qkv_text=fused, qkv_vision=qkv_vision, bridge_text=bridge_text, bridge_vision=bridge_vision,
                seq_to_sorted=seq_to_sorted.to(device), sorted_to_seq=sorted_to_seq.to(device), cos=cos,
                sin_signed=sin)


def check_attention_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Fused attention inputs (queries, both bridged key/value sets, RoPE) == the reference, values and grads."""
    from libra_megatron.model.attention_inputs import attention_inputs, attention_inputs_reference, triton_usable

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for n_text, n_vision, heads, d, rows_text, rows_vision, q_seq in [
        (7, 12, 3, 8, 19, 13, False), (5, 9, 2, 16, 14, 14, True), (0, 6, 2, 8, 0, 6, False),
        (9, 0, 3, 8, 9, 0, False), (6, 10, 5, 12, 11, 16, False),
        (2, 3, 32, 128, 5, 5, False),  # the 7B layer's heads and head size (the launch configuration it compiles)
    ]:
        inputs = _random_attention_inputs(n_text, n_vision, heads, d, device, dtype, seed=n_text * 31 + d)
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point() and k not in ("cos", "sin_signed"))
                  for k, v in inputs.items()}
        ref_leaves = {k: v.detach().clone().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                      for k, v in leaves.items()}
        assert triton_usable(leaves["qkv_text"]), "the Triton kernels are not usable here"
        out = attention_inputs(**leaves, rows_text=rows_text, rows_vision=rows_vision,
                               queries_in_sequence_order=q_seq)
        ref = attention_inputs_reference(**ref_leaves, rows_text=rows_text, rows_vision=rows_vision,
                                         queries_in_sequence_order=q_seq)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(r.shape, generator=g) for r in ref]
        for o, r in zip(out, ref):
            assert o.shape == r.shape, (o.shape, r.shape)
            torch.testing.assert_close(o.float(), r.detach(), **tol)
        torch.autograd.backward([o for o in out if o.numel()], [gr.to(device, dtype) for gr, o in zip(grads, out)
                                                                  if o.numel()])
        torch.autograd.backward([r for r in ref if r.numel()], [gr for gr, r in zip(grads, ref) if r.numel()])
        for key in ("qkv_text", "qkv_vision", "bridge_text", "bridge_vision"):
            got, want = leaves[key].grad, ref_leaves[key].grad
            want = torch.zeros_like(ref_leaves[key]) if want is None else want
            torch.testing.assert_close(got.float(), want, **tol)


def check_swiglu(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Fused SwiGLU (one tensor [gate | up] and two tensors) == silu(gate) * up, values and grads."""
    from libra_megatron.model.fusions import swiglu, swiglu_fused, swiglu_reference, triton_usable

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    g = torch.Generator().manual_seed(3)
    for n, f in [(13, 24), (1, 7), (0, 5), (37, 130), (2, 11008)]:  # last: the 7B MLP width
        gate_up = torch.randn(n, 2 * f, generator=g).to(device, dtype).requires_grad_(True)
        ref_in = gate_up.detach().float().requires_grad_(True)
        assert triton_usable(gate_up)
        out = swiglu_fused(gate_up)
        ref = swiglu_reference(*ref_in.chunk(2, dim=-1))
        grad = torch.randn(n, f, generator=g)
        torch.testing.assert_close(out.float(), ref.detach(), **tol)
        out.backward(grad.to(device, dtype))
        ref.backward(grad)
        torch.testing.assert_close(gate_up.grad.float(), ref_in.grad, **tol)
        stacked = torch.randn(2, n, f, generator=g).to(device, dtype).requires_grad_(True)
        stacked_ref = stacked.detach().float().requires_grad_(True)
        out, ref = swiglu_fused(stacked), swiglu_reference(stacked_ref[0], stacked_ref[1])
        torch.testing.assert_close(out.float(), ref.detach(), **tol)
        out.backward(grad.to(device, dtype))
        ref.backward(grad)
        torch.testing.assert_close(stacked.grad.float(), stacked_ref.grad, **tol)
        gate = torch.randn(n, f, generator=g).to(device, dtype).requires_grad_(True)
        up = torch.randn(n, f, generator=g).to(device, dtype).requires_grad_(True)
        gr, ur = gate.detach().float().requires_grad_(True), up.detach().float().requires_grad_(True)
        out, ref = swiglu(gate, up), swiglu_reference(gr, ur)
        torch.testing.assert_close(out.float(), ref.detach(), **tol)
        out.backward(grad.to(device, dtype))
        ref.backward(grad)
        torch.testing.assert_close(gate.grad.float(), gr.grad, **tol)
        torch.testing.assert_close(up.grad.float(), ur.grad, **tol)


def check_rope(device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """The RoPE kernel on a strided view (the k of a fused QKV) == the reference, values and grads."""
    from libra_megatron.model.fusions import apply_rope, rope_reference

    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    g = torch.Generator().manual_seed(5)
    for n, heads, d in [(37, 3, 16), (5, 5, 12), (3, 32, 128)]:  # last: the 7B heads
        x = torch.randn(n, heads, 3, d, generator=g).to(device, dtype)[:, :, 1]
        angles = torch.rand(n, 1, d // 2, generator=g) * 50
        cos = torch.cat([angles.cos(), angles.cos()], -1).to(device, dtype)
        sin = torch.cat([-angles.sin(), angles.sin()], -1).to(device, dtype)
        xr, xf = x.detach().float().requires_grad_(True), x.detach().clone().requires_grad_(True)
        ref, out = rope_reference(xr, cos.float(), sin.float()), apply_rope(xf, cos, sin)
        torch.testing.assert_close(out.float(), ref.detach(), **tol)
        grad = torch.randn(n, heads, d, generator=g)
        ref.backward(grad)
        out.backward(grad.to(device, dtype))
        torch.testing.assert_close(xf.grad.float(), xr.grad, **tol)


def check_layer(device: str = "cpu") -> None:
    """A whole Libra layer (fp32, both routing plans) with the Triton kernels == with the PyTorch references."""
    from megatron.core.transformer.spec_utils import build_module

    from bench.layer import _init_megatron
    from libra_megatron.config import libra_config
    from libra_megatron.model import attention_inputs, fusions
    from libra_megatron.model.rotary import RotaryTables
    from libra_megatron.model.routing import ModalityRouting
    from libra_megatron.model.specs import get_libra_layer_spec

    _init_megatron(device)
    config = libra_config("tiny", num_layers=1, use_cpu_initialization=True)
    torch.manual_seed(0)
    layer = build_module(get_libra_layer_spec(), config=config, layer_number=1).to(device)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "bridge" in name and name.endswith("_b.weight"):
                param.normal_(0.0, 0.05)  # non-zero bridges
    # short synthetic image runs (the layer does not need 578-position images): <s>, image, caption
    vi = torch.full((2, 12), config.vocab.text_vision_index, dtype=torch.long)
    vi[:, 1:6] = torch.arange(5)
    positions = torch.arange(12).expand(2, 12)
    for force_index in (False, True):
        routing = ModalityRouting.build(vi, config.vocab, device=torch.device(device), validate=False,
                                        force_index_plan=force_index)
        routing.rotary = RotaryTables.build(positions.to(device), config.kv_channels, config.rotary_base,
                                            torch.float32)
        stream = [torch.randn(n, config.hidden_size, device=device)
                  for n in (routing.full.num_text, routing.full.num_vision)]
        results = []
        for use_kernels in (True, False):
            usable = fusions.triton_usable if use_kernels else (lambda *t: False)
            saved = fusions.triton_usable, attention_inputs.triton_usable
            fusions.triton_usable = attention_inputs.triton_usable = usable
            try:
                layer.zero_grad()
                leaves = [t.clone().requires_grad_(True) for t in stream]
                outs = layer(leaves, routing)
                torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
                grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
                results.append([o.detach() for o in outs] + [t.grad for t in leaves] + grads)
            finally:
                fusions.triton_usable, attention_inputs.triton_usable = saved
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def main(device: str) -> None:
    """Every check on ``device`` (fp32; bf16 too on CUDA)."""
    for dtype in (torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16):
        check_attention_inputs(device, dtype)
        check_swiglu(device, dtype)
        check_rope(device, dtype)
    check_layer(device)
    print("fused kernels match their references on", device)


if __name__ == "__main__":
    # python fused_kernel_checks.py [DEVICE] [--record FILE]: --record (interpreter only) writes every kernel launch
    # for tests/model/triton_aot.py to compile for a GPU
    argv = sys.argv[1:]
    record = argv[argv.index("--record") + 1] if "--record" in argv else None
    positional = [a for i, a in enumerate(argv) if a != "--record" and (i == 0 or argv[i - 1] != "--record")]
    if record:
        from tests.model.triton_aot import record_launches

        with record_launches(record):
            main(positional[0] if positional else "cpu")
    else:
        main(positional[0] if positional else "cpu")
