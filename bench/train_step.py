#!/usr/bin/env python
"""Full training steps of the trainer on one device, with the step broken down as the issue asks: forward-backward,
optimizer, everything else, GPU idle; honest TFLOP/s, MFU, peak memory and the ``--dry-run`` estimate of the same
configuration (to check the estimator). One JSON line per case plus a readable table.

    python bench/train_step.py --recipe 7b                       # H100/H200: Libra 7B and the dense LLaMA-7B
    python bench/train_step.py --recipe 7b -- --recompute-granularity full
    python bench/train_step.py --recipe 7b --device cpu          # CPU smoke run at tiny size (not a measurement)
    python bench/train_step.py --device cuda --model libra-7b --num-layers 4 --micro-batch-size 4   # one case

``--recipe 7b`` = the 7B pretraining recipe's per-GPU work: 32 layers, micro-batch 4 x 5 micro-batches, seq 700,
bf16, distributed optimizer; case 1 is Libra (``--model-family libra``), case 2 the dense LLaMA-2-7B baseline
(``--model-family gpt --model llama2-7b``, every weight trainable) on the same mock samples, in the same process.
On CPU the recipe shrinks to the tiny models (2 layers, 2 x 2 micro-batches) so the path is exercised in tests.

How each number is taken (pretrain_libra.py's own Trainer pieces: stream, ``train_step``, optimizer):

* ``warmup`` steps untimed, then ``steps`` steps with megatron timers at level 1 (each timer syncs the device):
  ``forward-backward`` and ``optimizer`` per step, ``everything else`` = step wall time minus both (data, the
  non-finite check, scheduler, Python);
* one more step with the timers off under :mod:`torch.profiler`: ``GPU idle`` = that step's wall time minus the
  union of its kernel/memcpy/memset intervals; its trace goes to ``--trace-dir`` when given (gzipped JSON,
  Perfetto/TensorBoard);
* TFLOP/s = the family's model FLOPs of the real tokens / median step time.

Extra flags after ``--`` go to the trainer of every case (e.g. ``-- --recompute-granularity full``). A case that
runs out of memory is reported as such (with its dry-run estimate) and the next case still runs.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

RECIPE_7B = {"num_layers": 32, "micro_batch_size": 4, "num_microbatches": 5, "seq_length": 700}
CPU_RECIPE = {"num_layers": 2, "micro_batch_size": 2, "num_microbatches": 2, "seq_length": 600}


def _cases(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if args.recipe != "7b":
        return [{"family": args.model_family, "model": args.model, "num_layers": args.num_layers,
                 "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches,
                 "seq_length": args.seq_length or (700 if args.model in ("libra-7b", "llama2-7b") else 600)}]
    shape = RECIPE_7B if args.device == "cuda" else CPU_RECIPE
    libra, dense = ("libra-7b", "llama2-7b") if args.device == "cuda" else ("tiny", "gpt-tiny")
    return [dict(shape, family="libra", model=libra), dict(shape, family="gpt", model=dense)]


def _trainer_flags(case: Dict[str, Any], args: argparse.Namespace, extra: List[str]) -> List[str]:
    tokenizer = "tiny:0" if case["model"] == "tiny" else "random:0"
    flags = ["--model-family", case["family"], "--model", case["model"], "--num-layers", str(case["num_layers"]),
             "--stage", args.stage, "--seq-length", str(case["seq_length"]),
             "--micro-batch-size", str(case["micro_batch_size"]),
             "--global-batch-size", str(case["micro_batch_size"] * case["num_microbatches"]),
             "--train-iters", str(args.warmup + args.steps + 1), "--mock-data", "--num-workers", "2",
             "--use-distributed-optimizer", "--device", args.device, "--log-interval", "1", "--lr", "1e-4",
             "--timing-log-level", "1"]
    if case["family"] == "libra":
        flags += ["--image-tokenizer", tokenizer]
    return flags + (["--bf16"] if args.device == "cuda" else []) + extra


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gpu_busy_s(trace_path: str) -> float:
    """Union of the device intervals (kernels, copies, sets) in a profiler trace, in seconds."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy / 1e6


def _profiled_step(trainer: Any, args: argparse.Namespace, iteration: int, trace_dir: Optional[str],
                   name: str) -> Dict[str, Any]:
    """One step with the timers off, under torch.profiler: wall time, GPU busy/idle, trace file."""
    from torch.profiler import ProfilerActivity, profile

    from libra_megatron.training.loop import train_step

    trainer.config.timers = None
    for inner in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner.config.timers = None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    _sync(args.device)
    with profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        micro_batches, _ = trainer.stream.next_step()
        train_step(trainer.forward_step, micro_batches, trainer.model, trainer.optimizer, trainer.scheduler,
                   trainer.args, iteration)
        _sync(args.device)
        wall = time.perf_counter() - start
    out: Dict[str, Any] = {"profiled_step_s": wall}
    folder = trace_dir or "/tmp"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"train_step_{name}.pt.trace.json")
    prof.export_chrome_trace(path)
    with open(path, "rb") as source, gzip.open(path + ".gz", "wb") as target:
        target.write(source.read())
    os.remove(path)
    if args.device == "cuda":
        busy = _gpu_busy_s(path + ".gz")
        out.update(gpu_busy_s=busy, gpu_idle_s=max(0.0, wall - busy))
    if trace_dir:
        out["trace"] = path + ".gz"
    else:
        os.remove(path + ".gz")
    return out


def run_case(case: Dict[str, Any], args: argparse.Namespace, extra: List[str]) -> Dict[str, Any]:
    """Build the trainer for ``case``, run warm-up + timed + profiled steps, return the result record."""
    from libra_megatron.training.arguments import parse_args, validate_args
    from libra_megatron.training.data_stream import dataset_files
    from libra_megatron.training.dry_run import _clip_parameters, estimate_memory
    from libra_megatron.training.families import get_family
    from libra_megatron.training.loop import Trainer, train_step
    from libra_megatron.training.model_family import unwrap_model
    from libra_megatron.training.model_setup import count_parameters
    from libra_megatron.training.observability import gather_timer_times, timed

    train_args = parse_args(_trainer_flags(case, args, extra))
    family = get_family(train_args.model_family)
    train_args = validate_args(train_args, 1, family.shape(train_args), dataset_files)
    name = f"{case['model']}-{case['num_layers']}l"
    result: Dict[str, Any] = {"bench": "train_step", "case": name, "device": args.device, "extra_flags": extra,
                              "date": time.strftime("%Y-%m-%d"), **case}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = Trainer(train_args, family)
        total, trainable = count_parameters([unwrap_model(m) for m in trainer.model])
        result.update(params=total, trainable=trainable)
        config = trainer.config
        clip = _clip_parameters(train_args) if family.needs_vision else None
        estimate = estimate_memory(train_args, config, 0, total, trainable, config.num_layers, clip, trainer.vocab)
        result["dry_run_estimate_gb"] = {k: round(v, 2) for k, v in estimate.items()}
        steps: List[Dict[str, Any]] = []
        for index in range(args.warmup + args.steps):
            _sync(args.device)
            start = time.perf_counter()
            with timed(trainer.timers, "batch-generator"):
                micro_batches, stats = trainer.stream.next_step()
            outcome = train_step(trainer.forward_step, micro_batches, trainer.model, trainer.optimizer,
                                 trainer.scheduler, train_args, index + 1, timers=trainer.timers)
            _sync(args.device)
            wall = time.perf_counter() - start
            times = gather_timer_times(trainer.timers, 1)
            if index >= args.warmup:
                steps.append({"step_s": wall, "fb_s": times["forward-backward"][1] / 1e3,
                              "opt_s": times["optimizer"][1] / 1e3, "data_s": times["batch-generator"][1] / 1e3,
                              "flops": trainer.step_flops(stats), "skipped": outcome.skipped,
                              "tokens": stats.text_tokens + stats.image_tokens})
        step = statistics.median(s["step_s"] for s in steps)
        fb = statistics.median(s["fb_s"] for s in steps)
        opt = statistics.median(s["opt_s"] for s in steps)
        result.update(
            median_step_s=step, forward_backward_s=fb, optimizer_s=opt, everything_else_s=max(0.0, step - fb - opt),
            data_s=statistics.median(s["data_s"] for s in steps),
            tflops_per_gpu=statistics.median(s["flops"] / s["step_s"] for s in steps) / 1e12,
            tokens_per_s=statistics.median(s["tokens"] / s["step_s"] for s in steps),
        )
        if args.peak_tflops:
            result["mfu"] = result["tflops_per_gpu"] / args.peak_tflops
        result.update(_profiled_step(trainer, args, args.warmup + args.steps + 1, args.trace_dir, name))
        if args.device == "cuda":
            result["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            # the dry run's total includes a 3 GB CUDA/NCCL margin that max_memory_allocated does not see
            result["estimate_vs_peak"] = estimate["total"] / result["max_allocated_gb"] - 1.0
    except torch.OutOfMemoryError as error:
        result["error"] = f"out of memory: {str(error).splitlines()[0]}"
    finally:
        del trainer
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def _table(results: List[Dict[str, Any]]) -> str:
    lines = [f"{'case':<28} {'step ms':>8} {'fwd-bwd':>8} {'optim':>7} {'else':>7} {'GPU idle':>8} {'TFLOP/s':>8} "
             f"{'peak GB':>8} {'est GB':>7}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<28} {r['error']}")
            continue
        idle = r.get("gpu_idle_s")
        lines.append(
            f"{r['case']:<28} {1e3 * r['median_step_s']:>8.1f} {1e3 * r['forward_backward_s']:>8.1f} "
            f"{1e3 * r['optimizer_s']:>7.1f} {1e3 * r['everything_else_s']:>7.1f} "
            f"{'-' if idle is None else f'{1e3 * idle:.1f}':>8} {r['tflops_per_gpu']:>8.2f} "
            f"{r.get('max_allocated_gb', float('nan')):>8.1f} {r['dry_run_estimate_gb']['total']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, choices=["7b"], help="the 7B recipe: Libra and the dense baseline")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model-family", default="libra", choices=["libra", "gpt"])
    parser.add_argument("--model", default="libra-7b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=None, help="default 700 (7B) / 600 (tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known cards)")
    parser.add_argument("--trace-dir", default=None, help="keep the profiled step's trace here (.pt.trace.json.gz)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.peak_tflops is None and args.device == "cuda":
        from libra_megatron.training.metrics import detect_peak_tflops

        args.peak_tflops = detect_peak_tflops("cuda")
    results = []
    for case in _cases(args):
        result = run_case(case, args, extra)
        results.append(result)
        print(json.dumps(result), flush=True)
    print(_table(results), flush=True)


if __name__ == "__main__":
    main()
