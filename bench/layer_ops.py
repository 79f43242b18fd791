"""Host-side op counts of one Libra layer vs a dense LLaMA layer, forward + backward (device-independent).

The layer benchmark on an H100/H200 is host-bound: wall time ≈ (ops issued) × (host cost per op), so the number
of ops a step issues is the figure to drive down. This script counts, per forward + backward step at small
shapes on the CPU (the counts do not depend on the device or the widths):

* ``kernels``: the innermost aten ops that launch a device kernel (everything except views, allocations and
  metadata), forward and backward — on a GPU each is a launch (or a cuBLAS/flash call);
* ``host_aten_calls``: aten ops called from Python or from an autograd node (views included: each is host work);
* ``autograd_nodes``: nodes of the backward graph of one step, of which ``python_functions`` are custom
  ``autograd.Function`` nodes (a Python call forward and one backward each);
* ``by_op``: the kernels by aten op name.

Where the CPU decomposes what is one fused kernel on a GPU, the script counts it as on the GPU: RMSNorm
(``_fused_rms_norm`` on CUDA), RoPE (the Triton kernel of fusions.py) and SDPA (flash attention, also for the
lower-right causal bias, which the CPU materialises as a mask) run as one ``fused::`` region each, forward and
backward, returning input gradients in the inputs' layouts as the CUDA kernels do (these regions are not counted
in ``python_functions``; on a GPU the RoPE kernel is one custom Function per call).

    python bench/layer_ops.py                    # dense_frozen, libra (segment plan), libra_index
    python bench/layer_ops.py --cases libra --by-op
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable, Dict, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.layer import DenseLlamaLayer, _batch, _init_megatron, _libra_layer  # noqa: E402

# aten ops that never launch a device kernel (views, allocation, metadata)
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "select", "slice", "unbind", "split",
    "split_with_sizes", "chunk", "narrow", "expand", "expand_as", "as_strided", "unsqueeze", "squeeze", "view_as",
    "flatten", "unflatten", "detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resolve_conj", "resolve_neg", "result_type", "_reshape_alias", "contiguous", "to",
    "numpy_T", "movedim", "set_", "_local_scalar_dense", "item", "is_same_size", "_has_compatible_shallow_copy_type",
    "clone_noop",
}
# aten ops whose device work is entirely in the aten ops they call (counted there)
_WRAPPERS = {
    "linear", "matmul", "_to_copy", "clone", "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "full",
    "full_like", "new_full", "zero_", "scaled_dot_product_attention", "rms_norm", "stack", "silu_", "index_add",
    "to_dense", "copy", "einsum", "dropout", "sub", "rsub", "neg_", "_convert_indices_from_coo_to_csr",
    "slice_backward", "select_backward", "unbind_backward",
}
_FUSED = "fused::"  # record_function regions that are one kernel on a GPU (see _as_gpu_kernels)


def _step_counts(events) -> dict:
    """Kernel launches and host-side aten calls of the profiled events (one step)."""
    children = collections.defaultdict(list)
    for event in events:
        if event.cpu_parent is not None:
            children[event.cpu_parent.id].append(event)
    kernels: Dict[str, int] = collections.Counter()
    host_calls = 0

    def in_fused(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith(_FUSED):
                return True
            parent = parent.cpu_parent
        return False

    def has_aten_ancestor(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    def launches(event) -> bool:
        name = event.name[len("aten::"):]
        return name not in _NO_LAUNCH and name not in _WRAPPERS

    for event in events:
        if event.name.startswith(_FUSED):
            if in_fused(event):
                continue
            kernels[event.name] += 1
            host_calls += 1
            continue
        if not event.name.startswith("aten::") or in_fused(event):
            continue
        if not has_aten_ancestor(event):
            host_calls += 1
        if launches(event):
            kernels[event.name[len("aten::"):]] += 1
    return dict(kernels=sum(kernels.values()), host_aten_calls=host_calls, by_op=dict(kernels.most_common()))


def _graph_nodes(roots) -> Dict[str, int]:
    """Autograd nodes reachable from ``roots`` (grad_fns), by kind."""
    seen, stack, python = set(), list(roots), 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "_forward_cls") and node._forward_cls is not _FusedRegion:
            python += 1
        stack.extend(n for n, _ in node.next_functions)
    accumulate = sum(1 for n in seen if type(n).__name__ == "AccumulateGrad")
    return dict(autograd_nodes=len(seen) - accumulate, python_functions=python, accumulate_grad=accumulate)


def count(forward: Callable[[], Sequence[torch.Tensor]], grads: Sequence[torch.Tensor]) -> dict:
    """Counts of one forward + backward step (after one warm-up step); ``forward`` returns the outputs that
    ``grads`` flow into (one tensor for a dense layer, the (text, vision) stream for a Libra layer)."""
    from torch.profiler import ProfilerActivity, profile

    torch.autograd.backward(forward(), grads)
    out = forward()
    nodes = _graph_nodes([o.grad_fn for o in out])
    torch.autograd.backward(out, grads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("step::forward"):
            out = forward()
        torch.autograd.backward(out, grads)
    events = prof.events()
    forward_ids = {e.id for e in events if e.name == "step::forward"}

    def under_forward(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.id in forward_ids:
                return True
            parent = parent.cpu_parent
        return False

    total = _step_counts([e for e in events if e.name != "step::forward"])
    fwd = _step_counts([e for e in events if under_forward(e)])
    return dict(kernels=total["kernels"], forward_kernels=fwd["kernels"],
                backward_kernels=total["kernels"] - fwd["kernels"], host_aten_calls=total["host_aten_calls"],
                **nodes, by_op=total["by_op"])


class _FusedRegion(torch.autograd.Function):
    """Runs ``fn`` (forward) and its vjp (backward) each inside one ``fused::<name>`` region."""

    @staticmethod
    def forward(ctx, name, fn, *inputs):  # type: ignore[override]
        ctx.name, ctx.fn = name, fn
        ctx.save_for_backward(*inputs)
        with torch.profiler.record_function(f"{_FUSED}{name}"):
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grad):  # type: ignore[override]
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.profiler.record_function(f"{_FUSED}{ctx.name}_backward"), torch.enable_grad():
            out = ctx.fn(*inputs)
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            pairs = [(o, g) for o, g in zip(out, grad) if o.requires_grad and g is not None]
            wanted = [t for t in inputs if t.requires_grad]
            grads = (list(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                              allow_unused=True)) if wanted and pairs else [None] * len(wanted))
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]
            # a CUDA kernel writes each input gradient in that input's layout (e.g. flash attention's dq)
            grads = iter([g if g is None or g.stride() == t.stride() else torch.empty_like(t).copy_(g)
                          for g, t in zip(grads, wanted)])
        return (None, None, *[next(grads) if t.requires_grad else None for t in inputs])


def _as_gpu_kernels() -> None:
    """Make the CPU op graph look like the GPU one where the CPU decomposes a fused GPU kernel: RMSNorm
    (``_fused_rms_norm`` on CUDA, one node), RoPE, SwiGLU and the attention inputs (Triton kernels, one node
    each) become one region each."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias

    from libra_megatron.model import attention_inputs, bridge_attention, fusions, mlp  # noqa: F401

    def fused_attention_inputs(qkv_t, qkv_v, bridge_t, bridge_v, *rest):
        def fn(a, b, c, d):
            return attention_inputs.attention_inputs_reference(a, b, c, d, *rest)

        return _FusedRegion.apply("attention_inputs", fn, qkv_t, qkv_v, bridge_t, bridge_v)

    def fused_swiglu(gate, up):
        return _FusedRegion.apply("swiglu", fusions.swiglu_reference, gate, up)

    def fused_swiglu_packed(gate_up):
        return _FusedRegion.apply("swiglu", lambda x: fusions.swiglu_reference(*fusions._halves(x)), gate_up)

    bridge_attention.attention_inputs = fused_attention_inputs
    mlp.swiglu, mlp.swiglu_fused = fused_swiglu, fused_swiglu_packed

    rms_norm = F.rms_norm

    def fused_rms_norm(x, shape, weight=None, eps=None):
        return _FusedRegion.apply("rms_norm", lambda a, w: rms_norm(a, shape, w, eps), x, weight)

    def fused_rope(x, cos, sin):
        return _FusedRegion.apply("rope", fusions.rope_reference, x, cos, sin)

    sdpa = F.scaled_dot_product_attention

    def fused_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        # one flash call per direction on a GPU (also for the lower-right causal bias, which the CPU materialises)
        if isinstance(attn_mask, CausalBias):  # its __torch_function__ only recognises the unpatched function
            return _FusedRegion.apply("sdpa", lambda a, b, c: CausalBias._dispatch(a, b, c, attn_mask, **kwargs),
                                      q, k, v)
        return _FusedRegion.apply("sdpa", lambda a, b, c: sdpa(a, b, c, attn_mask=attn_mask, is_causal=is_causal,
                                                               **kwargs), q, k, v)

    F.rms_norm = fused_rms_norm
    F.scaled_dot_product_attention = fused_sdpa
    fusions.apply_rope = fused_rope
    for module in list(sys.modules.values()):
        if getattr(module, "apply_rope", None) is not None and module is not fusions:
            if getattr(module, "__name__", "").startswith(("libra_megatron", "bench")):
                module.apply_rope = fused_rope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dense_frozen,libra,libra_index")
    ap.add_argument("--by-op", action="store_true", help="also print the kernels by aten op")
    args = ap.parse_args()
    args.hidden, args.ffn, args.heads, args.batch, args.seq = 256, 704, 4, 2, 700
    device, dtype = "cpu", torch.float32
    _init_megatron(device)
    _as_gpu_kernels()
    torch.manual_seed(0)
    b, s, h = args.batch, args.seq, args.hidden
    for case in args.cases.split(","):
        if case == "dense_frozen":
            layer = DenseLlamaLayer(h, args.ffn, args.heads).requires_grad_(False)
            x = torch.randn(b, s, h, requires_grad=True)
            d = h // args.heads
            cos, sin = torch.randn(b * s, 1, d), torch.randn(b * s, 1, d)

            grads = [torch.randn(b, s, h)]

            def forward():
                return [layer(x, cos, sin)]
        else:
            from libra_megatron.model.rotary import RotaryTables
            from libra_megatron.model.routing import ModalityRouting

            layer, config = _libra_layer(args, device, dtype, force_index=case == "libra_index")
            vi, position_ids, _, _ = _batch(args, device, config)
            routing = ModalityRouting.build(vi, config.vocab, force_index_plan=case == "libra_index")
            routing.rotary = RotaryTables.build(position_ids, config.kv_channels, config.rotary_base,
                                                dtype)
            # the modality-sorted residual stream a layer reads and writes: (text rows, vision rows)
            stream = [torch.randn(n, h, requires_grad=True) for n in (routing.full.num_text, routing.full.num_vision)]
            grads = [torch.randn_like(t) for t in stream]

            def forward():
                return list(layer(stream, routing))
        result = count(forward, grads)
        by_op = result.pop("by_op")
        if args.by_op:
            result["by_op"] = by_op
        print(json.dumps(dict(case=case, **result)), flush=True)


if __name__ == "__main__":
    main()
