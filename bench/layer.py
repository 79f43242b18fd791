"""One Libra decoder layer (the engine's LibraLayer on megatron-core) against a dense LLaMA layer with frozen
weights, forward + backward, in the same run.

    python bench/layer.py --small                 # CPU, small widths (a smoke run)
    python bench/layer.py --device cuda           # 7B shapes, bf16: b=8, s=700 = <s> + 578 image + 121 text
    python bench/layer.py --device cuda --cases dense_frozen,libra,libra_graphed   # + the layer as CUDA graphs

Model FLOPs (honest accounting): frozen text weights 4N per token (input grads
only), the low-rank expert on image tokens 6N (input and weight grads), the bridge maps 6N on every token,
attention counted once (causal: 2·b·s²·h forward, ×3 with backward) — a Libra layer that computed attention
twice is charged for it in time, not credited in FLOPs. The dense layer: 4N on every token + attention.
Prints one JSON line per case and a summary line with the Libra/dense ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from libra_megatron.model.fusions import apply_rope  # noqa: E402  (the same RoPE kernel for both)


class DenseLlamaLayer(torch.nn.Module):
    """A LLaMA-2 decoder layer in plain torch + SDPA (batch-first), the dense baseline."""

    def __init__(self, h: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.Parameter(torch.ones(h)), torch.nn.Parameter(torch.ones(h))
        self.qkv = torch.nn.Linear(h, 3 * h, bias=False)
        self.o = torch.nn.Linear(h, h, bias=False)
        self.gate_up = torch.nn.Linear(h, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = F.rms_norm(x, (h,), self.norm1, 1e-6)
        q, k, v = self.qkv(y).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        q, k = (apply_rope(t.reshape(b * s, self.heads, -1), cos, sin).view(b, s, self.heads, -1).transpose(1, 2)
                for t in (q, k))
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        gate, up = self.gate_up(F.rms_norm(x, (h,), self.norm2, 1e-6)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _timeit(step: Callable[[], None], warmup: int, iters: int, device: str) -> Tuple[float, float]:
    """Median (device time, host time) of one step; the host time is what issuing the step costs the CPU
    (on CUDA, measured from an idle queue: below the device time means the GPU, not the host, bounds the step)."""
    for _ in range(warmup):
        step()
    times, host = [], []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            step()
            end.record()
            host.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            host.append(times[-1])
    times.sort()
    host.sort()
    return times[len(times) // 2], host[len(host) // 2]


def _init_megatron(device: str) -> None:
    from libra_megatron.utils.cpu import enable_cpu_megatron

    enable_cpu_megatron()  # no-op when CUDA is present
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="libra_bench_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def _libra_layer(args, device: str, dtype: torch.dtype, force_index: bool):
    from megatron.core.transformer.spec_utils import build_module

    from libra_megatron.config import libra_config
    from libra_megatron.model.specs import get_libra_layer_spec
    from libra_megatron.model.training_stages import is_trainable_in_stage

    config = libra_config(
        "libra-7b", num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=device == "cpu",
        force_general_routing=force_index,
    )
    layer = build_module(get_libra_layer_spec(), config=config, layer_number=1).to(device)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "bridge" in name and name.endswith("_b.weight"):
                param.normal_(0.0, 0.02)  # the zero-initialised bridge B's would make some GEMMs unrealistically cheap
            param.requires_grad_(is_trainable_in_stage(f"decoder.layers.0.{name}", "pretrain"))
    return layer, config


def _batch(args, device: str, config):
    """<s>, one image, caption: the plain pretraining layout (every sample alike)."""
    from libra_megatron.model.rotary import RotaryTables
    from libra_megatron.model.routing import ModalityRouting

    b, s = args.batch, args.seq
    vi = torch.full((b, s), 578, dtype=torch.long)
    vi[:, 1:579] = torch.arange(578)
    position_ids = torch.arange(s, device=device).expand(b, s)
    return vi, position_ids, ModalityRouting, RotaryTables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="small widths (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=700)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 peak for MFU (H100/H200 SXM: 989e12)")
    ap.add_argument("--profile", default="", help="write the top kernels of the Libra layer to this file ('-': stderr)")
    ap.add_argument("--cases", default="dense_frozen,libra,libra_index",
                    help="comma list of dense_frozen, libra, libra_index, libra_graphed (CUDA graphs; cuda only)")
    args = ap.parse_args()
    args.hidden, args.ffn, args.heads = (256, 704, 4) if args.small else (4096, 11008, 32)
    if args.small:
        args.batch, args.iters, args.warmup = min(args.batch, 2), min(args.iters, 5), min(args.warmup, 2)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _init_megatron(device)
    torch.manual_seed(0)

    b, s, h, f, heads = args.batch, args.seq, args.hidden, args.ffn, args.heads
    n_vision, n_text = b * 578, b * (s - 578)
    r, rf, br = h // 4, f // 4, 8
    p_dense = 4 * h * h + 3 * h * f
    p_expert = 4 * 2 * h * r + 2 * (h * rf + rf * f) + (f * r + r * h)
    p_bridge = 2 * (h * br + br * h)
    attention = 3 * 2 * b * s * s * h
    flops = {
        "dense_frozen": 4 * (n_text + n_vision) * p_dense + attention,
        "libra": 4 * n_text * p_dense + 6 * n_vision * p_expert + 6 * (n_text + n_vision) * p_bridge + attention,
    }
    flops["libra_index"] = flops["libra_graphed"] = flops["libra"]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    common = dict(device=device_name, dtype=str(dtype).replace("torch.", ""), b=b, s=s, h=h, ffn=f, image_tokens=578)

    results: Dict[str, dict] = {}
    for case in args.cases.split(","):
        if case == "dense_frozen":
            layer = DenseLlamaLayer(h, f, heads).to(device, dtype).requires_grad_(False)
            x = torch.randn(b, s, h, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            inv = 1.0 / (10000 ** (torch.arange(0, h // heads, 2, device=device).float() / (h // heads)))
            ang = torch.arange(s, device=device).float()[:, None] * inv
            half = ang.shape[-1]
            ang = torch.cat([ang, ang], -1)[None].expand(b, s, -1).reshape(b * s, 1, -1)  # row (b, t)
            cos = ang.cos().to(dtype)
            sin = torch.cat([-ang[..., :half].sin(), ang[..., half:].sin()], -1).to(dtype)

            def step():
                layer(x, cos, sin).backward(grad)  # noqa: F821 (run by _timeit before the del below)
        else:
            layer, config = _libra_layer(args, device, dtype, force_index=case == "libra_index")
            vi, position_ids, ModalityRouting, RotaryTables = _batch(args, device, config)
            build_times = []
            for _ in range(6):  # the first build pays one-off costs (CUDA lazy module loading): report it apart
                t0 = time.perf_counter()
                routing = ModalityRouting.build(vi, config.vocab, device=torch.device(device),
                                                force_index_plan=case == "libra_index")
                routing.rotary = RotaryTables.build(position_ids, config.kv_channels, config.rotary_base,
                                                    dtype)
                if device == "cuda":
                    torch.cuda.synchronize()
                build_times.append((time.perf_counter() - t0) * 1e3)
            first_build_ms, build_ms = build_times[0], sorted(build_times[1:])[2]
            # the modality-sorted residual stream a layer reads and writes: (text rows, vision rows)
            stream = [torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
                      for n in (routing.full.num_text, routing.full.num_vision)]
            grads = [torch.randn_like(t) for t in stream]

            run = layer
            if case == "libra_graphed":  # the layer captured as CUDA graphs (model/cuda_graphs.py), CUDA only
                from libra_megatron.model.cuda_graphs import LayerGraphs

                run = LayerGraphs(torch.nn.ModuleList([layer]))

            def step():
                torch.autograd.backward(list(run(stream, routing)), grads)
        try:
            if case == "libra_graphed" and device != "cuda":
                raise RuntimeError("libra_graphed needs --device cuda")
            seconds, host_seconds = _timeit(step, args.warmup, args.iters, device)
            results[case] = dict(case=case, ms=round(seconds * 1e3, 3), tflops=round(flops[case] / seconds / 1e12, 1),
                                 mfu=round(flops[case] / seconds / args.peak, 3), host_ms=round(host_seconds * 1e3, 3),
                                 **common)
            if case != "dense_frozen":
                results[case]["routing_build_ms_per_microbatch"] = round(build_ms, 3)
                results[case]["routing_first_build_ms"] = round(first_build_ms, 3)
            if device == "cuda":
                results[case]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                torch.cuda.reset_peak_memory_stats()
        except Exception as error:  # noqa: BLE001 - report and continue with the other cases
            results[case] = dict(case=case, error=repr(error)[:400], **common)
        if args.profile and case == "libra":
            _profile(step, device, args.profile)
        print(json.dumps(results[case]), flush=True)
        del layer, step
        if device == "cuda":
            torch.cuda.empty_cache()
    if "dense_frozen" in results and "ms" in results["dense_frozen"]:
        summary = {"summary": "libra layer / dense frozen layer (same run, same device)", **common}
        for case, res in results.items():
            if case != "dense_frozen" and "ms" in res:
                summary[f"{case}_vs_dense_frozen"] = round(res["ms"] / results["dense_frozen"]["ms"], 3)
        print(json.dumps(summary), flush=True)


def _profile(step: Callable[[], None], device: str, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for _ in range(2):
        step()
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90)
    if path == "-":
        print(table, file=sys.stderr, flush=True)
    else:
        with open(path, "w") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
