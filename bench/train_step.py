#!/usr/bin/env python
"""Full training steps of the trainer on one device: time, tokens/s, honest TFLOP/s and MFU, peak memory, and the
``--dry-run`` memory estimate of the same configuration (to check the estimator). One JSON line per result.

    python bench/train_step.py --device cuda --model libra-7b --num-layers 4 --micro-batch-size 4   # H100/H200
    python bench/train_step.py --device cpu --model tiny --micro-batch-size 2 --steps 3              # smoke test

Runs ``pretrain_libra.py``'s own Trainer in this process (world size 1: DDP + DistributedOptimizer, bf16 on CUDA via
Float16Module, the frozen CLIP on the first stage; ``--image-tokenizer random:0`` = ViT-L/14-336 geometry with random
weights) on ``--mock-data`` pretraining samples (578 image positions + caption, seq 700 at 7B shapes). Extra flags
after ``--`` go to the trainer (e.g. ``-- --recompute-granularity full``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="libra-7b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=None, help="default 700 (7B) / 600 (tiny)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--stage", default="pretrain")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")

    from libra_megatron.training.arguments import parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.dry_run import _clip_parameters, estimate_memory
    from libra_megatron.training.loop import Trainer
    from libra_megatron.training.families import get_family
    from libra_megatron.training.model_setup import count_parameters
    from libra_megatron.training.model_family import unwrap_model

    seq = args.seq_length or (700 if args.model == "libra-7b" else 600)
    warmup = 2
    flags = ["--model", args.model, "--num-layers", str(args.num_layers), "--stage", args.stage,
             "--seq-length", str(seq), "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.micro_batch_size * args.num_microbatches),
             "--train-iters", str(args.steps + warmup), "--mock-data", "--num-workers", "2",
             "--image-tokenizer", "random:0" if args.model == "libra-7b" else "tiny:0",
             "--use-distributed-optimizer", "--device", args.device, "--log-interval", "1",
             "--lr", "1e-4"] + (["--bf16"] if args.device == "cuda" else []) + extra
    train_args = parse_args(flags)
    family = get_family(train_args.model_family)
    train_args = validate_args(train_args, 1, family.shape(train_args), dataset_files)
    trainer = Trainer(train_args, family)
    total, trainable = count_parameters([unwrap_model(m) for m in trainer.model])
    history = trainer.train()
    timed = history[warmup:] if len(history) > warmup else history
    step = statistics.median(r["step_time_s"] for r in timed)
    result = {
        "bench": "train_step", "device": args.device, "model": args.model, "num_layers": args.num_layers,
        "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches, "seq_length": seq,
        "extra_flags": extra, "params": total, "trainable": trainable, "median_step_s": step,
        "tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in timed),
        "tflops_per_gpu": statistics.median(r["model_tflops"] / r["step_time_s"] for r in timed),
        "losses": [round(r["lm_loss"], 4) for r in history],
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name()
        result["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["mfu"] = timed[-1].get("mfu")
    config = trainer.config
    clip = _clip_parameters(train_args) if family.needs_vision else None
    estimate = estimate_memory(train_args, config, 0, total, trainable, config.num_layers, clip, trainer.vocab)
    result["dry_run_estimate_gb"] = {k: round(v, 2) for k, v in estimate.items()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
