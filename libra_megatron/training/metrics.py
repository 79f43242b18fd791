"""What a step reports: losses per modality, lr, grad norm, throughput, honest TFLOP/s and MFU, memory.

The numbers are assembled on the last rank (it sits on the last pipeline stage, where losses exist) after one
all-reduce over the data-parallel group of ``[loss sums and counts, token counts]``. They go to a Megatron-style
iteration line, to TensorBoard (same tag names as Megatron-LM: ``lm loss``, ``learning-rate``, ``grad-norm``,
``throughput``, ...) and optionally to a JSON-lines file. Validation results (``evaluation.py``) get Megatron-LM's
``validation loss at iteration N | lm loss value: ... | lm loss PPL: ...`` block and ``<key> validation`` tags.

TFLOP/s counts *model* FLOPs of the tokens actually trained (padding excluded), per the family's accounting
(Libra: frozen weights 4N, trainable 6N, image tokens on the low-rank expert, attention once, the frozen CLIP tower
2N forward only); activation recompute is not counted (MFU, not hardware utilisation).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from libra_megatron.training.model_family import LOSS_KEYS, BatchStats

# Dense bf16 peak per GPU (TFLOP/s), used for MFU when --peak-tflops is not given.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def detect_peak_tflops(device: str) -> Optional[float]:
    """The dense bf16 peak of this CUDA device by name, or None (CPU, unknown card)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().upper()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


@dataclass
class StepRecord:
    """One optimizer step as logged (values already reduced over DP)."""

    iteration: int
    consumed_samples: int
    losses: Dict[str, float]
    lr: float
    grad_norm: Optional[float]
    skipped: bool
    step_time_s: float
    model_tflops: float
    tokens: int
    samples: int
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> Dict[str, Any]:
        """Flat dict for the JSON-lines metrics file."""
        out = {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "lr": self.lr,
               "grad_norm": self.grad_norm, "skipped": self.skipped, "step_time_s": self.step_time_s,
               "model_tflops": self.model_tflops, "tokens": self.tokens, "samples": self.samples}
        out.update({key.replace(" ", "_"): value for key, value in self.losses.items()})
        out.update(self.extra)
        return out


def pack_step_losses(reports: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """On a last-stage rank: one step's ``[sum, count]`` per loss key and the sum of per-micro-batch token means
    of ``lm loss`` (the reference's objective), float64 ``[2 K + 1]`` on the loss device, without a host sync."""
    parts = torch.stack([torch.stack([r[key].detach().double() for key in LOSS_KEYS]) for r in reports])  # [M, K, 2]
    objective = (parts[:, 0, 0] / parts[:, 0, 1].clamp_min(1.0)).sum()
    return torch.cat([parts.sum(dim=0).flatten(), objective.view(1)])


def reduce_pending_losses(packed: List[torch.Tensor], stats: List[BatchStats], num_microbatches: int,
                          per_token: bool, dp_group: Any) -> List[tuple]:
    """Losses and global token counts of several steps: one all-reduce over DP and one copy to the host for all.

    ``packed[i]`` is :func:`pack_step_losses` of step ``i``, ``stats[i]`` its local token counts. Returns per step
    ``({key: mean loss}, BatchStats of the global batch)``. ``lm loss`` is the objective the optimizer saw: the
    token mean over the global batch with ``--calculate-per-token-loss``, otherwise the mean of the
    per-micro-batch token means (the reference's normalisation). Text and image losses are token means.
    """
    import torch.distributed as dist

    losses_part = torch.stack(packed)
    counts = torch.stack([s.as_tensor() for s in stats]).to(losses_part.device)
    rows = torch.cat([losses_part, counts], dim=1)
    dp = dist.get_world_size(dp_group)
    if dp > 1:
        dist.all_reduce(rows, group=dp_group)
    out = []
    width = 2 * len(LOSS_KEYS)
    for row in rows.cpu():
        losses = {}
        for index, key in enumerate(LOSS_KEYS):
            total, count = float(row[2 * index]), float(row[2 * index + 1])
            losses[key] = total / count if count > 0 else 0.0
        if not per_token:
            losses["lm loss"] = float(row[width]) / (num_microbatches * dp)
        out.append((losses, BatchStats.from_tensor(row[width + 1:])))
    return out


class MetricsLogger:
    """Formats and writes step records (only the last rank writes anything)."""

    def __init__(self, args: Any, active: bool) -> None:
        self.args, self.active = args, active
        self.writer = None
        self.peak = args.peak_tflops if args.peak_tflops is not None else detect_peak_tflops(args.device)
        self.world_size = args.world_size
        self._skipped = self._nan = 0
        self._window: List[StepRecord] = []
        if active and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        self._metrics_file = None
        if active and args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
            self._metrics_file = open(args.metrics_file, "a", buffering=1)

    def log(self, record: StepRecord, nonfinite: bool, timers: Optional[Dict[str, Any]] = None) -> None:
        """Record one step: iteration line every ``--log-interval`` steps, TensorBoard, metrics file; ``timers``
        (``{name: (min ms, max ms)}`` per iteration of the interval, see ``observability.py``) go after the line
        as Megatron-LM's block and to TensorBoard as ``<name>-time`` (max over ranks)."""
        self._skipped += int(record.skipped)
        self._nan += int(nonfinite)
        if not self.active:
            return
        self._window.append(record)
        tflops_per_gpu = record.model_tflops / max(record.step_time_s, 1e-9) / self.world_size
        tokens_per_gpu = record.tokens / max(record.step_time_s, 1e-9) / self.world_size
        record.extra.update(tflops_per_gpu=tflops_per_gpu, tokens_per_sec_per_gpu=tokens_per_gpu,
                            samples_per_sec=record.samples / max(record.step_time_s, 1e-9))
        if self.peak:
            record.extra["mfu"] = tflops_per_gpu / self.peak
        record.extra.update(_memory_stats(self.args.device))
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record.as_json()) + "\n")
        if self.writer is not None:
            self._write_tensorboard(record)
            for name, (_, high) in (timers or {}).items():
                self.writer.add_scalar(f"{name}-time", high, record.iteration)
        if record.iteration % self.args.log_interval == 0 or timers:
            print(self._iteration_line(), flush=True)
            if timers:
                from libra_megatron.training.observability import format_timer_block

                print(format_timer_block(timers), flush=True)
            self._window = []

    def _write_tensorboard(self, record: StepRecord) -> None:
        step, writer = record.iteration, self.writer
        for key, value in record.losses.items():
            writer.add_scalar(key, value, step)
            writer.add_scalar(f"{key} vs samples", value, record.consumed_samples)
        writer.add_scalar("learning-rate", record.lr, step)
        writer.add_scalar("batch-size", self.args.global_batch_size, step)
        if record.grad_norm is not None and math.isfinite(record.grad_norm):
            writer.add_scalar("grad-norm", record.grad_norm, step)
        writer.add_scalar("iteration-time", record.step_time_s, step)
        writer.add_scalar("throughput", record.extra["tflops_per_gpu"], step)
        writer.add_scalar("tokens-per-sec-per-gpu", record.extra["tokens_per_sec_per_gpu"], step)
        writer.add_scalar("samples-per-sec", record.extra["samples_per_sec"], step)
        if "mfu" in record.extra:
            writer.add_scalar("mfu", record.extra["mfu"], step)
        for key in ("mem-allocated-gb", "mem-max-allocated-gb"):
            if key in record.extra:
                writer.add_scalar(key, record.extra[key], step)
        writer.add_scalar("skipped-iterations", self._skipped, step)

    def _iteration_line(self) -> str:
        window = self._window
        last = window[-1]
        elapsed = sum(r.step_time_s for r in window) / len(window)
        tflops = sum(r.model_tflops for r in window) / max(sum(r.step_time_s for r in window), 1e-9) / self.world_size
        tokens = sum(r.tokens for r in window) / max(sum(r.step_time_s for r in window), 1e-9) / self.world_size
        parts = [
            f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {last.iteration:8d}/{self.args.train_iters:8d}",
            f"consumed samples: {last.consumed_samples:12d}",
            f"elapsed time per iteration (ms): {1000 * elapsed:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {tflops:.2f}",
        ]
        if self.peak:
            parts.append(f"MFU: {100 * tflops / self.peak:.1f}%")
        parts += [f"tokens/s/GPU: {tokens:.0f}", f"learning rate: {last.lr:.6E}",
                  f"global batch size: {self.args.global_batch_size:5d}"]
        for key in LOSS_KEYS:
            values = [r.losses[key] for r in window if not r.skipped]
            if values:
                parts.append(f"{key}: {sum(values) / len(values):.6E}")
        if last.grad_norm is not None:
            parts.append(f"grad norm: {last.grad_norm:.3f}")
        if "mem-max-allocated-gb" in last.extra:
            parts.append(f"mem max alloc (GB): {last.extra['mem-max-allocated-gb']:.1f}")
        parts += [f"number of skipped iterations: {self._skipped:3d}", f"number of nan iterations: {self._nan:3d}"]
        return " | ".join(parts) + " |"

    def log_validation(self, iteration: int, consumed_samples: int, losses: Optional[Dict[str, float]],
                       standalone: bool = False) -> None:
        """Megatron-LM's validation block (``validation loss at iteration N | lm loss value: ... | lm loss PPL:
        ... |``), TensorBoard ``<key> validation`` (+ ``vs samples``, ``ppl`` with
        ``--log-validation-ppl-to-tensorboard``); with ``standalone`` (no step record at this iteration) also a
        metrics-file line of its own (otherwise the fields ride on the step's line)."""
        if not self.active or losses is None:
            return
        parts = [f" validation loss at iteration {iteration}"]
        for key, value in losses.items():
            ppl = math.exp(min(20.0, value))
            parts += [f"{key} value: {value:.6E}", f"{key} PPL: {ppl:.6E}"]
            if self.writer is not None:
                self.writer.add_scalar(f"{key} validation", value, iteration)
                self.writer.add_scalar(f"{key} validation vs samples", value, consumed_samples)
                if self.args.log_validation_ppl_to_tensorboard:
                    self.writer.add_scalar(f"{key} validation ppl", ppl, iteration)
                    self.writer.add_scalar(f"{key} validation ppl vs samples", ppl, consumed_samples)
        line = " | ".join(parts) + " |"
        print("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1), flush=True)
        if standalone and self._metrics_file is not None:
            from libra_megatron.training.evaluation import validation_fields

            record = {"iteration": iteration, "consumed_samples": consumed_samples, **validation_fields(losses)}
            self._metrics_file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writers."""
        if self.writer is not None:
            self.writer.close()
        if self._metrics_file is not None:
            self._metrics_file.close()


def _memory_stats(device: str) -> Dict[str, float]:
    if device != "cuda":
        return {}
    return {"mem-allocated-gb": torch.cuda.memory_allocated() / 2**30,
            "mem-max-allocated-gb": torch.cuda.max_memory_allocated() / 2**30}
