"""``--dry-run``: plan a job on one CPU: resolved layout, parameters per rank, and a memory estimate per GPU.

The model is built on the ``meta`` device (no memory, no initialisation) exactly as each rank would build it, under
a fake process group of the job's world size, so per-rank counts include the real TP sharding, vocab padding and
pipeline split. The model total is counted at TP=1, PP=1 (the checkpoint's parameter count).

The memory estimate per GPU (bf16 weights, fp32 grads, Adam with fp32 master weights) is:

* weights: 2 B per parameter held by the rank (4 B without ``--bf16``);
* gradients: 4 B per *trainable* parameter (DDP's fp32 grad buffer; frozen parameters have none);
* optimizer: 12 B per trainable parameter (fp32 main copy + two Adam moments; 8 B without ``--bf16``), divided
  by DP with ``--use-distributed-optimizer``;
* activations, bf16, per token per layer (Libra: norm in/out, Q/K/V, both bridge deltas, the per-modality K/V of
  the two attention calls, attention output, residual ≈ 15h; SwiGLU gate/up/product/activation ≈ 4·ffn), divided
  by TP for the sharded part (and entirely with sequence parallel); ``full`` recompute keeps only each layer's
  input plus one layer's working set; ``selective`` drops the attention intermediates. Multiplied by the
  micro-batches in flight on the stage (1 without pipelining; ``PP - stage`` for 1F1B; Megatron's warm-up count
  for the interleaved schedule);
* the last stage's fp32 logits of one micro-batch, the first stage's frozen CLIP tower (bf16) and its forward
  workspace, and a fixed 3 GB for the CUDA context, NCCL buffers and allocator fragmentation;
* the optimizer step's workspace, which exists only while the activations are gone: torch's foreach AdamW (what
  megatron-core builds without apex/TE, and what the trainer ran before ``training/optimizer.py`` made it fused)
  allocates ``sqrt(exp_avg_sq)`` for every parameter of a group at once, 4 B per trainable parameter (/DP with
  the distributed optimizer); the fused AdamW the trainer now builds needs none.
  The peak is ``weights + grads + optimizer + CLIP weights + max(forward/backward working memory, optimizer step
  workspace)``: with the foreach AdamW under full recompute (activations ~1 GB at 7B) the optimizer step was the
  peak, which is why the 7B bench measured the same 101 GB with and without recompute (docs/design.md, "Training
  throughput").
The activation and logits terms assume every micro-batch is ``--seq-length`` long (an upper bound under dynamic
padding). It is an estimate to choose a layout, not a guarantee; ``torch.cuda.max_memory_allocated`` in the training log is
the measurement.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Tuple

import torch

from libra_megatron.training.model_family import ModelFamily
from libra_megatron.training.model_setup import build_model_chunks, count_parameters
from libra_megatron.training.run_config import RunConfig

GB = 1024**3
FRAMEWORK_OVERHEAD_GB = 3.0


def _fake_world(world_size: int, rank: int, args: argparse.Namespace):
    """Context: a fake default process group of ``world_size`` with megatron's groups for ``args``' layout."""
    import contextlib

    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    @contextlib.contextmanager
    def world():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
                create_gloo_process_groups=False,
            )
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()

    return world()


def _meta_chunks(family: ModelFamily, args: argparse.Namespace) -> Tuple[List[torch.nn.Module], Any]:
    """This (fake) rank's chunks exactly as the trainer builds them, on the meta device."""
    config = family.build_config(args)
    with torch.device("meta"):
        return build_model_chunks(family, args, config), config


def _layer_range(chunks: List[torch.nn.Module]) -> str:
    """Global layer numbers held by a stage, as runs: ``0-7,16-23``."""
    numbers = sorted(int(layer.layer_number) - 1 for chunk in chunks
                     for layer in getattr(getattr(chunk, "decoder", None), "layers", []))
    runs: List[List[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs) or "-"


def _clip_parameters(args: argparse.Namespace) -> Tuple[int, Dict[str, int]]:
    """(parameters, geometry) of the truncated frozen CLIP tower of ``--image-tokenizer`` (ViT-L/14-336 when the
    folder is not on this machine)."""
    from libra_megatron.tokenizer.clip_encoder import LIBRA_SELECT_LAYERS, TINY_CLIP, VIT_L14_336, ClipFeatureEncoder
    from libra_megatron.training.vision import clip_geometry, is_tiny_spec

    spec = args.image_tokenizer or ""
    geometry = clip_geometry(spec)
    clip = dict(TINY_CLIP if is_tiny_spec(spec) else VIT_L14_336)
    clip.update(hidden_size=geometry["hidden"], intermediate_size=geometry["ffn"])
    with torch.device("meta"):
        encoder = ClipFeatureEncoder(clip, LIBRA_SELECT_LAYERS)
    return sum(p.numel() for p in encoder.parameters()), geometry


def _in_flight(args: argparse.Namespace, stage: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at its peak, in units of the stage's full depth."""
    pp, vpp, m = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size, args.num_microbatches
    if pp == 1:
        return 1.0
    if vpp is None:
        return float(min(pp - stage, m))
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp  # megatron's interleaved warm-up (group size = PP)
    return min(warmup + 1, m * vpp) / vpp


def _activation_bytes_per_token_layer(args: argparse.Namespace, config: Any) -> Tuple[float, float]:
    """(stored per token per layer, one layer's working set per token) in bytes, bf16."""
    h, f, t = config.hidden_size, config.ffn_hidden_size, args.tensor_model_parallel_size
    sp = args.sequence_parallel
    replicated = 5 * h / (t if sp else 1)  # norm inputs/outputs and the residual stream
    sharded = (10 * h + 4 * f) / t  # Q/K/V, bridge deltas, per-modality K/V, attention output, SwiGLU
    full_layer = 2.0 * (replicated + sharded)
    if args.recompute_granularity == "full":
        return 2.0 * h / (t if sp else 1), full_layer
    if args.recompute_granularity == "selective":
        return full_layer - 2.0 * 4 * h / t, 0.0
    return full_layer, 0.0


def optimizer_step_workspace_bytes(args: argparse.Namespace) -> float:
    """Bytes per trainable parameter (held by the rank) the optimizer's step allocates transiently: 0 for the fused
    AdamW the trainer builds (``training/optimizer.py``; apex/TE FusedAdam alike), 4 for torch's foreach AdamW
    (``torch._foreach_sqrt(exp_avg_sqs)``, one fp32 copy of every parameter of the group) when ``args.fused_adam``
    is explicitly False (planning a run of a build without the fused hook, e.g. the measured 101 GB)."""
    return 4.0 if getattr(args, "fused_adam", True) is False else 0.0


def estimate_memory(args: argparse.Namespace, config: Any, stage: int, params: int, trainable: int,
                    layers: int, clip: Tuple[int, Dict[str, int]] | None, vocab: Any) -> Dict[str, float]:
    """The per-GPU memory estimate (GB) of one rank of pipeline stage ``stage``; see the module docstring."""
    pp, dp, t = args.pipeline_model_parallel_size, args.data_parallel_size, args.tensor_model_parallel_size
    tokens = args.micro_batch_size * args.seq_length
    stored, working = _activation_bytes_per_token_layer(args, config)
    optimizer_shards = dp if args.use_distributed_optimizer else 1
    out = {
        "weights": params * (2 if args.bf16 else 4) / GB,
        "grads": trainable * 4 / GB,
        "optimizer": trainable * (12 if args.bf16 else 8) / optimizer_shards / GB,
        "activations": (tokens * layers * stored * _in_flight(args, stage) + tokens * working) / GB,
        "clip": 0.0,
        "logits": 0.0,
        "optimizer_step": trainable * optimizer_step_workspace_bytes(args) / optimizer_shards / GB,
    }
    clip_workspace = 0.0
    if stage == 0 and clip is not None:
        clip_params, geometry = clip
        clip_workspace = args.micro_batch_size * geometry["tokens"] * (4 * geometry["hidden"] + geometry["ffn"]) * 2 / GB
        out["clip"] = clip_params * 2 / GB + clip_workspace
    if stage == pp - 1:
        image_positions = vocab.image_positions if args.seq_length > vocab.image_positions else 0
        text_tokens = args.micro_batch_size * (args.seq_length - image_positions)
        vision_tokens = args.micro_batch_size * image_positions
        out["logits"] = (text_tokens * vocab.text_vocab_size / t + vision_tokens * 2 * vocab.vision_vocab_size) * 4 * 2 / GB
    resident = out["weights"] + out["grads"] + out["optimizer"] + out["clip"] - clip_workspace
    working = out["activations"] + out["logits"] + clip_workspace  # forward/backward only
    out["total"] = resident + max(working, out["optimizer_step"]) + FRAMEWORK_OVERHEAD_GB
    return out


def dry_run(args: argparse.Namespace, family: ModelFamily) -> Dict[str, Any]:
    """Print the plan of the job described by ``args`` (validated for ``args.world_size`` GPUs); returns it."""
    from libra_megatron.utils.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    args = RunConfig.freeze(args).replace(device="cpu", meta_device=True)
    tp, pp, dp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size
    single = args.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                          virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
    with _fake_world(1, 0, single):
        chunks, _ = _meta_chunks(family, single)
        total, trainable = count_parameters(chunks)
    del chunks
    vocab = family.vocab(args)
    clip = _clip_parameters(args) if family.needs_vision else None
    stages = []
    for stage in range(pp):
        with _fake_world(args.world_size, stage * tp * dp, args):
            chunks, config = _meta_chunks(family, args)
            params, train = count_parameters(chunks)
            layers = sum(len(getattr(getattr(c, "decoder", None), "layers", [])) for c in chunks)
            memory = estimate_memory(args, config, stage, params, train, layers, clip, vocab)
            stages.append({"stage": stage, "layers": _layer_range(chunks), "params": params, "trainable": train,
                           "memory_gb": memory})
        del chunks
    plan = {"total": total, "trainable": trainable, "stages": stages, "clip_params": clip[0] if clip else 0}
    _print_plan(args, plan)
    return plan


def _print_plan(args: argparse.Namespace, plan: Dict[str, Any]) -> None:
    tp, pp, dp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    print(f"libra-megatron dry run: model {args.model} ({args.model_family}), stage {args.stage}, "
          f"{'bf16' if args.bf16 else 'fp32'}")
    print(f"layout: {args.world_size} GPUs = TP {tp} x PP {pp} x DP {dp}" + (f", VPP {vpp}" if vpp else "")
          + (", sequence parallel" if args.sequence_parallel else "")
          + (", distributed optimizer" if args.use_distributed_optimizer else "")
          + f"; recompute {args.recompute_granularity or 'none'}")
    print(f"batch: seq {args.seq_length}, micro-batch {args.micro_batch_size}, global batch {args.global_batch_size} "
          f"= {args.num_microbatches} micro-batches x {args.micro_batch_size} x DP {dp}; {args.train_iters} iterations, "
          f"{args.train_iters * args.global_batch_size:,} samples")
    print(f"model parameters: {plan['total']:,} (trainable in {args.stage}: {plan['trainable']:,})")
    if plan["clip_params"]:
        print(f"frozen CLIP tower on the first stage: {plan['clip_params']:,} parameters (not in the model)")
    header = (f"{'stage':>5} {'layers':>10} {'params/rank':>15} {'trainable/rank':>15} {'weights':>8} {'grads':>7} "
              f"{'optim':>7} {'activ':>7} {'clip':>6} {'logits':>7} {'opt-step':>8} {'total GB':>9}")
    print("per rank (every TP rank of a stage holds the same amount):")
    print(header)
    worst = 0.0
    for row in plan["stages"]:
        m = row["memory_gb"]
        worst = max(worst, m["total"])
        print(f"{row['stage']:>5} {row['layers']:>10} {row['params']:>15,} {row['trainable']:>15,} "
              f"{m['weights']:>8.1f} {m['grads']:>7.1f} {m['optimizer']:>7.1f} {m['activations']:>7.1f} "
              f"{m['clip']:>6.1f} {m['logits']:>7.1f} {m['optimizer_step']:>8.1f} {m['total']:>9.1f}")
    verdict = "fits" if worst <= args.gpu_memory_gb else "DOES NOT FIT"
    print(f"peak estimate per GPU: {worst:.1f} GB of {args.gpu_memory_gb:.0f} GB -> {verdict} "
          f"(includes {FRAMEWORK_OVERHEAD_GB:.0f} GB CUDA/NCCL/fragmentation overhead; the optimizer step's "
          "workspace counts instead of activations when it is larger)")
