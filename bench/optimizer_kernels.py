"""The optimizer step's kernels, fused vs what megatron-core uses without apex/TE (one JSON line per case).

* ``adamw``: one AdamW step over the 7B recipe's trainable parameters of ``--layers`` layers (fp32 main params,
  megatron's two param groups), ``FusedAdamW`` (torch ``fused=True``) vs megatron's plain ``torch.optim.AdamW``.
* ``grad_norm_clip``: megatron's ``get_grad_norm_fp32`` + ``clip_grad_by_total_norm_fp32`` over the same gradients,
  with the multi-tensor kernels of ``libra_megatron.ops.multi_tensor`` vs megatron's local per-tensor fallbacks;
  also counts device-to-host reads (``aten::_local_scalar_dense``).
* ``wgrad``: one expert/bridge/head weight gradient accumulated into an fp32 ``main_grad``: ``wgrad_gemm_accum``
  (cuBLAS beta = 1) vs ``grad_output^T @ input`` in bf16 + ``main_grad.add_`` (the unfused path), at the 7B
  shapes (tokens = micro-batch 4 x 700).

    python bench/optimizer_kernels.py --device cuda            # the GPU check runs this
    python bench/optimizer_kernels.py --device cpu --layers 1  # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H, FFN, RANK_ATTN, RANK_FFN, BRIDGE, VOCAB_V = 4096, 11008, 1024, 2752, 8, 1026


def _trainable_shapes(layers: int) -> List[tuple]:
    """Trainable weights of one Libra-7B layer (the routed expert's A/B, the bridges, the vision norms), x layers,
    plus the vision head (rank from docs/architecture.md: expert rank = out/4)."""
    per_layer = [(3 * RANK_ATTN + 2 * BRIDGE, H), (H, RANK_ATTN), (H, RANK_ATTN), (H, RANK_ATTN),  # qkv(+bridge) A, q/k/v B
                 (BRIDGE * 2, H), (H, BRIDGE), (H, BRIDGE), (H, BRIDGE), (H, BRIDGE),          # text bridge A, bridge B's
                 (RANK_ATTN, H), (H, RANK_ATTN),                                                 # o A/B
                 (2 * RANK_FFN, H), (FFN, RANK_FFN), (FFN, RANK_FFN), (RANK_FFN, FFN), (H, RANK_FFN),  # mlp
                 (H,), (H,)]                                                                     # vision norms
    return per_layer * layers + [(2 * VOCAB_V, H)]


def _timed(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def bench_adamw(shapes, device: str, repeats: int) -> Dict:
    from libra_megatron.training.optimizer import FusedAdamW

    out = {"case": "adamw", "tensors": len(shapes), "params": sum(torch.Size(s).numel() for s in shapes)}
    for name, make in (("megatron_torch_adamw_ms", lambda g: torch.optim.AdamW(g, lr=1e-4, betas=(0.9, 0.99))),
                       ("fused_adamw_ms", lambda g: FusedAdamW(g, lr=1e-4, betas=(0.9, 0.99)))):
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]
        optimizer = make(groups)
        out[name] = round(_timed(optimizer.step, device, repeats), 3)
    return out


def bench_grad_norm_clip(shapes, device: str, repeats: int) -> Dict:
    import megatron.core.optimizer.clip_grads as clip_grads
    from megatron.core import utils

    from libra_megatron.ops import multi_tensor

    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    group = torch.distributed.group.WORLD
    out = {"case": "grad_norm_clip", "tensors": len(shapes)}
    impls = {"megatron_fallback": (utils.local_multi_tensor_applier, utils.local_multi_tensor_l2_norm,
                                   utils.local_multi_tensor_scale, None),
             "multi_tensor": (multi_tensor.multi_tensor_applier, multi_tensor.multi_tensor_l2norm,
                              multi_tensor.multi_tensor_scale, multi_tensor.multi_tensor_scale_tensor)}
    saved = (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
             clip_grads.multi_tensor_scale_tensor_impl)
    try:
        for name, impl in impls.items():
            (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
             clip_grads.multi_tensor_scale_tensor_impl) = impl

            def step() -> None:
                norm = clip_grads.get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=group)
                clip_grads.clip_grad_by_total_norm_fp32(params, 1e-6, norm)  # always clips

            out[f"{name}_ms"] = round(_timed(step, device, repeats), 3)
            with _HostReads() as reads:
                step()
            out[f"{name}_host_reads"] = reads.count
    finally:
        (clip_grads.multi_tensor_applier, clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
         clip_grads.multi_tensor_scale_tensor_impl) = saved
    return out


def bench_wgrad(device: str, repeats: int, tokens: int) -> List[Dict]:
    from libra_megatron.ops.wgrad_accum import wgrad_gemm_accum

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name, out_f, in_f in (("expert_A_qkv", 3 * RANK_ATTN, H), ("expert_B_fc", FFN, RANK_FFN),
                              ("expert_A_down", RANK_FFN, FFN), ("bridge_B", H, BRIDGE), ("vision_head", 2 * VOCAB_V, H)):
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        dy = torch.randn(tokens, out_f, device=device, dtype=dtype)
        main_grad = torch.zeros(out_f, in_f, device=device)
        fused = _timed(lambda: wgrad_gemm_accum(x, dy, main_grad), device, repeats)
        separate = _timed(lambda: main_grad.add_(dy.t() @ x), device, repeats)
        flops = 2 * tokens * out_f * in_f
        rows.append({"case": "wgrad", "weight": name, "shape": [out_f, in_f], "tokens": tokens,
                     "fused_ms": round(fused, 4), "gemm_plus_add_ms": round(separate, 4),
                     "fused_tflops": round(flops / fused / 1e9, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=4,
                        help="layers of trainable parameters (~0.16B each; times scale linearly, the recipe has 32)")
    parser.add_argument("--tokens", type=int, default=4 * 700, help="rows of one micro-batch's wgrad GEMM")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from libra_megatron.utils.cpu import enable_cpu_megatron

    if args.device == "cpu":
        enable_cpu_megatron()
    if not torch.distributed.is_initialized():
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo" if args.device == "cpu" else "nccl", store=store, rank=0,
                                             world_size=1)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    shapes = _trainable_shapes(args.layers)
    for bench in (lambda: [bench_adamw(shapes, args.device, args.repeats)],
                  lambda: [bench_grad_norm_clip(shapes, args.device, args.repeats)],
                  lambda: bench_wgrad(args.device, args.repeats, args.tokens)):
        for row in bench():
            print(json.dumps({"device": args.device, "layers": args.layers, **row}), flush=True)


if __name__ == "__main__":
    main()
