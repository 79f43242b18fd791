"""The training step and loop on megatron-core's pipeline schedules (Megatron-LM's ``train_step``/``train``).

One step: zero DDP grad buffers → ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved, chosen by
the parallel state) over ``num_microbatches`` micro-batches of this DP rank → agree across all ranks whether any
loss was non-finite → ``optimizer.step()`` (grad clipping inside) → scheduler step (in samples). The frozen CLIP
tower runs inside the forward step on the first pipeline stage only. Validation (``evaluation.py``) runs after the
steps ``evaluation_due`` names, on every rank, without touching the training stream or RNG.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from libra_megatron.training.model_family import ModelFamily, unwrap_model


class NonFiniteLossError(RuntimeError):
    """A non-finite loss with ``--on-nan stop``."""


@dataclass
class StepOutcome:
    """What one step produced on this rank (``grad_norm`` may still be a device tensor: read it when logging)."""

    reports: List[Dict[str, torch.Tensor]]
    grad_norm: Optional[Union[float, torch.Tensor]]
    skipped: bool
    nonfinite_samples: List[int]
    stop_signal: bool


def make_forward_step(family: ModelFamily, vision_encoder: Optional[Callable], vocab: Any,
                      image_loss_weight: float = 1.0) -> Callable:
    """The ``forward_step_func(data_iterator, model)`` the schedules call, returning ``(output, loss_func)``."""

    def forward_step(data_iterator: Any, model: torch.nn.Module):
        batch = next(data_iterator)
        clip_features = None
        if vision_encoder is not None and unwrap_model(model).pre_process:
            pixels = batch.get("pixels")
            if pixels is not None and pixels.shape[0] > 0:
                clip_features = vision_encoder(pixels)
        output = family.run_model(model, batch, clip_features)
        return output, partial(_loss_func, family, batch, vocab, image_loss_weight)

    return forward_step


def _loss_func(family: ModelFamily, batch: Dict[str, torch.Tensor], vocab: Any, image_loss_weight: float,
               output: torch.Tensor):
    loss_sum, num_tokens, parts = family.reduce_loss(output, batch, vocab, image_loss_weight)
    report = {key: value.detach().clone() for key, value in parts.items()}
    report["sample_ids"] = batch["sample_ids"]
    return loss_sum, num_tokens, report


def _agree_on_flags(reports: List[Dict[str, torch.Tensor]], stop_requested: bool,
                    device: torch.device) -> tuple:
    """``(any non-finite loss on any rank, SIGTERM on any rank)``: built on the device, one all-reduce(MAX) over
    the world and one read to the host -- the step's only sync before the optimizer."""
    import torch.distributed as dist

    flags = torch.zeros(2, device=device)
    if reports:
        losses = torch.stack([report["lm loss"] for report in reports])
        flags[0] = (~losses.isfinite()).any().to(flags.dtype)
    if stop_requested:
        flags[1] = 1.0
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return bool(nonfinite), bool(stop)


def _nonfinite_samples(reports: List[Dict[str, torch.Tensor]]) -> List[int]:
    """Sample ids of the micro-batches whose loss is not finite (only on the rare non-finite path)."""
    finite = torch.stack([report["lm loss"] for report in reports]).isfinite().all(dim=1).cpu().tolist()
    return [int(i) for report, ok in zip(reports, finite) if not ok for i in report["sample_ids"].flatten().tolist()]


class _SignalFlag:
    """Remembers a SIGTERM so the loop can save and exit at the next step boundary; :meth:`restore` puts the
    process's previous handler back (the loop may run inside a longer-lived process)."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous: Any = signal.signal(signal.SIGTERM, self._handle) if enabled else None
        self._enabled = enabled

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def restore(self) -> None:
        """Reinstate the SIGTERM handler that was in place before this flag."""
        if self._enabled:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._enabled = False


def train_step(forward_step: Callable, micro_batches: List[Dict[str, torch.Tensor]], model: List[torch.nn.Module],
               optimizer: Any, scheduler: Any, args: argparse.Namespace, iteration: int,
               stop_requested: bool = False, timers: Optional[Any] = None) -> StepOutcome:
    """Forward/backward over the step's micro-batches, then the optimizer update unless a loss was non-finite.

    Host syncs: one read of the agreed ``[non-finite, SIGTERM]`` flags after the backward pass (plus whatever
    the optimizer needs for its grad norm); losses stay on the device until the logger reads them.
    """
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from libra_megatron.training.observability import timed
    from libra_megatron.training.padding import step_seq_length

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [iter(micro_batches) for _ in model]
    seq_length = step_seq_length(micro_batches)  # one shape per step (all pipeline stages read the same samples)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(model) > 1 else iterators[0], model=model,
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=args.micro_batch_size,
        decoder_seq_length=seq_length, forward_only=False,
    )
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    nonfinite, stop_signal = _agree_on_flags(reports, stop_requested, device)
    if nonfinite:  # rare: tell every rank which samples it was (only the last stages know)
        bad_samples = _nonfinite_samples(reports) if reports else []
        gathered: List[List[int]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, bad_samples)
        bad_samples = sorted({i for ids in gathered for i in ids})
        action = "stopping" if args.on_nan == "stop" else "skipping the update"
        if dist.get_rank() == 0:
            print(f"WARNING: non-finite loss at iteration {iteration} in samples {bad_samples}: {action}", flush=True)
        if args.on_nan == "stop":
            raise NonFiniteLossError(f"non-finite loss at iteration {iteration} in samples {bad_samples} "
                                     "(--on-nan stop)")
        return StepOutcome(reports, None, True, bad_samples, stop_signal)
    with timed(timers, "optimizer"):
        update_successful, grad_norm, _ = optimizer.step()
        if update_successful:
            scheduler.step(increment=args.global_batch_size)
    return StepOutcome(reports, grad_norm, not update_successful, [], stop_signal)


class Trainer:
    """Builds everything from the flags and runs the loop (also usable in-process, e.g. from tests)."""

    def __init__(self, args: argparse.Namespace, family: ModelFamily) -> None:
        from megatron.core import parallel_state

        from libra_megatron.training.data_stream import MicroBatchStream, build_train_dataset
        from libra_megatron.training.distributed import initialize_distributed, is_last_rank, resolve_device, set_seeds
        from libra_megatron.training.metrics import MetricsLogger
        from libra_megatron.training.model_setup import (
            build_model_chunks,
            build_optimizer,
            build_scheduler,
            wrap_model_chunks,
        )

        self.args, self.family = args, family
        resolve_device(args)
        initialize_distributed(args)
        set_seeds(args.seed)
        self.config = family.build_config(args)
        self.step_flops = family.flops_counter(args, self.config)
        chunks = build_model_chunks(family, args, self.config)
        self.model = wrap_model_chunks(chunks, args, self.config)
        self.optimizer = build_optimizer(self.model, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        self.resume = self._load()
        self.vision_encoder = None
        if family.build_vision is not None and parallel_state.is_pipeline_first_stage(ignore_virtual=True):
            self.vision_encoder = family.build_vision(args)
        self.vocab = family.vocab(args)
        self.prepare = None  # the family's per-micro-batch host step (Libra: its one routing), bound to the config
        if family.prepare_batch is not None:
            device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else None
            self.prepare = partial(family.prepare_batch, self.config, device)
        dataset, total_samples = build_train_dataset(args, self.vocab)
        self.stream = MicroBatchStream(dataset, total_samples, args, self.resume.consumed_samples,
                                       parallel_state.get_data_parallel_rank(),
                                       parallel_state.get_data_parallel_world_size(), self.vocab, self.prepare)
        self.forward_step = make_forward_step(family, self.vision_encoder, self.vocab, args.image_loss_weight)
        self.valid_stream = self._build_valid_stream() if args.eval_iters > 0 else None
        self.captioner = None
        if args.eval_captioning:  # zero-shot captioning (libra_megatron/evaluation/engine_captioning.py)
            from libra_megatron.evaluation.engine_captioning import EngineCaptioner

            self.captioner = EngineCaptioner(args, self.vocab, self.vision_encoder)
        self.logger = MetricsLogger(args, active=is_last_rank())
        self.history: List[Dict[str, Any]] = []
        import torch.distributed as dist

        from libra_megatron.training.observability import StepProfiler, build_timers

        self.timers = build_timers(args, self.config, self.optimizer)
        self.profiler = StepProfiler(args, dist.get_rank())

    def _load(self):
        from libra_megatron.training.checkpointing import (
            ResumeState,
            checkpoint_dir,
            latest_checkpoint,
            load_checkpoint,
        )

        args = self.args
        if args.load and args.ckpt_step is not None:
            path = checkpoint_dir(args.load, args.ckpt_step)
            if not os.path.isfile(os.path.join(path, "metadata.json")):
                raise FileNotFoundError(f"--ckpt-step {args.ckpt_step}: no finished checkpoint at {path}")
        else:  # the run's own root: a broken newest checkpoint is set aside (loudly) and the marker repaired
            path = latest_checkpoint(args.load, repair=True) if args.load else None
        if path is not None:
            return load_checkpoint(path, self.model, self.optimizer, self.scheduler, args, weights_only=args.finetune)
        if args.pretrained_checkpoint:
            source = latest_checkpoint(args.pretrained_checkpoint) or args.pretrained_checkpoint
            return load_checkpoint(source, self.model, self.optimizer, self.scheduler, args, weights_only=True)
        return ResumeState()

    def _build_valid_stream(self):
        from megatron.core import parallel_state

        from libra_megatron.training.data_stream import build_valid_dataset
        from libra_megatron.training.evaluation import ValidationStream

        dataset, samples = build_valid_dataset(self.args, self.vocab)
        return ValidationStream(dataset, samples, self.args, parallel_state.get_data_parallel_rank(),
                                parallel_state.get_data_parallel_world_size(), self.vocab, self.prepare)

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Validation losses now (collective: call on every rank); a dict on last-stage ranks, else ``None``."""
        from libra_megatron.training.evaluation import evaluate

        if self.valid_stream is None:
            raise RuntimeError("no validation set: pass --eval-iters > 0 (and --valid-data-path or --mock-data)")
        return self._without_timers(evaluate, self.forward_step, self.valid_stream, self.model, self.args)

    def _without_timers(self, function: Callable, *args: Any) -> Any:
        """``function(*args)`` with the megatron timers detached (validation and captioning are not step time)."""
        self.config.timers = None
        try:
            return function(*args)
        finally:
            self.config.timers = self.timers

    def save(self, iteration: int, consumed: int) -> None:
        """Checkpoint the current state into ``--save``."""
        from libra_megatron.training.checkpointing import save_checkpoint

        save_checkpoint(self.args.save, iteration, consumed, self.model, self.optimizer, self.scheduler, self.args)

    def train(self) -> List[Dict[str, Any]]:
        """Run until ``--train-iters`` (or a SIGTERM with ``--exit-signal-handler``); returns the per-step records
        this rank logged (losses only on the last pipeline stage).

        Losses, grad norms and token counts stay on the device until a log boundary (every ``--log-interval``
        steps, before an evaluation, captioning or a checkpoint, at the end): then one all-reduce over DP and one
        copy to the host cover every step since the last boundary, and the steps are logged in order.
        """
        from libra_megatron.evaluation.engine_captioning import captioning_due, captioning_fields, log_captioning
        from libra_megatron.training.evaluation import evaluation_due, validation_fields
        from libra_megatron.training.observability import gather_timer_times, timed
        from libra_megatron.training.padding import step_seq_length

        args = self.args
        iteration, consumed = self.resume.iteration, self.resume.consumed_samples
        last_saved = iteration if self.resume.loaded_from and not args.finetune else None
        signals = _SignalFlag(args.exit_signal_handler)
        evaluated_at = None
        self._pending: List[_PendingStep] = []
        try:
            while iteration < args.train_iters:
                start = time.perf_counter()
                lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step's update uses
                with self.profiler.step_range(iteration + 1):
                    with timed(self.timers, "batch-generator"):
                        micro_batches, stats = self.stream.next_step()
                    outcome = train_step(self.forward_step, micro_batches, self.model, self.optimizer,
                                         self.scheduler, args, iteration + 1, stop_requested=signals.received,
                                         timers=self.timers)
                iteration += 1
                consumed += args.global_batch_size
                # a SIGTERM (preemption) saves and exits at once: no evaluation or captioning eats the grace period
                evaluate_now = evaluation_due(args, iteration) and not outcome.stop_signal
                caption_now = captioning_due(args, iteration) and not outcome.stop_signal
                save_now = bool(args.save and args.save_interval and iteration % args.save_interval == 0)
                stop_now = outcome.stop_signal or bool(args.exit_interval and iteration % args.exit_interval == 0)
                boundary = (iteration % args.log_interval == 0 or iteration >= args.train_iters or evaluate_now
                            or caption_now or save_now or stop_now)
                self._pending.append(_PendingStep(iteration, consumed, lr, outcome, stats))
                self._pending[-1].extra["seq_length"] = step_seq_length(micro_batches)  # after dynamic padding
                times = None
                if boundary:
                    self._resolve_pending()  # the interval's one host sync, so the step time below is complete
                    times = gather_timer_times(self.timers, len(self._pending))  # before any evaluation
                self._pending[-1].step_time_s = time.perf_counter() - start
                validation = None
                if evaluate_now:  # after the step's timing, before its checkpoint
                    validation, evaluated_at = self.evaluate(), iteration
                    self._pending[-1].extra.update(validation_fields(validation or {}))
                captioning = None
                if caption_now:  # greedy captions of held-out images, training untouched
                    captioning = self._without_timers(self.captioner.run, self.model)
                    self._pending[-1].extra.update(captioning_fields(captioning))
                if boundary:
                    self._log_pending(times)
                self.logger.log_validation(iteration, consumed, validation)
                log_captioning(self.logger, iteration, consumed, captioning)
                if save_now:
                    self.save(iteration, consumed)
                    last_saved = iteration
                if stop_now:
                    break
            if args.eval_iters > 0 and iteration >= args.train_iters and evaluated_at != iteration:
                validation = self.evaluate()  # nothing left to train (e.g. --train-iters 0): evaluate the weights
                self.logger.log_validation(iteration, consumed, validation, standalone=True)
                if validation is not None:
                    self.history.append({"iteration": iteration, "consumed_samples": consumed,
                                         **validation_fields(validation)})
            if args.save and last_saved != iteration:
                self.save(iteration, consumed)
        finally:
            signals.restore()
            self.profiler.close()
            self.logger.close()
        return self.history

    def _resolve_pending(self) -> None:
        """Bring the pending steps' losses, token counts and grad norms to the host (one DP all-reduce + copy)."""
        from megatron.core import parallel_state

        from libra_megatron.training.metrics import pack_step_losses, reduce_pending_losses

        args, pending = self.args, [step for step in self._pending if step.losses is None]
        if not pending:
            return
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            reduced = reduce_pending_losses([pack_step_losses(step.outcome.reports) for step in pending],
                                            [step.stats for step in pending], args.num_microbatches,
                                            args.calculate_per_token_loss, parallel_state.get_data_parallel_group())
        else:
            reduced = [({}, step.stats) for step in pending]
        for step, (losses, global_stats) in zip(pending, reduced):
            step.losses, step.global_stats = losses, global_stats
            norm = step.outcome.grad_norm
            step.grad_norm = float(norm) if norm is not None else None
            step.outcome = dataclasses.replace(step.outcome, reports=[])  # free the device tensors

    def _log_pending(self, times: Optional[Dict[str, Any]]) -> None:
        """Log the resolved steps in order; the interval's timer times go with the last one."""
        from libra_megatron.training.metrics import StepRecord

        args = self.args
        for step in self._pending:
            record = StepRecord(
                iteration=step.iteration, consumed_samples=step.consumed, losses=step.losses, lr=step.lr,
                grad_norm=step.grad_norm, skipped=step.outcome.skipped, step_time_s=step.step_time_s,
                model_tflops=self.step_flops(step.global_stats) / 1e12,
                tokens=step.global_stats.text_tokens + step.global_stats.image_tokens,
                samples=args.global_batch_size, extra=step.extra,
            )
            if step.outcome.nonfinite_samples:
                record.extra["nonfinite_sample_ids"] = step.outcome.nonfinite_samples
            if step is self._pending[-1] and times:
                record.extra["timers_ms"] = {name: high for name, (_, high) in times.items()}
            self.logger.log(record, bool(step.outcome.nonfinite_samples), timers=times if step is self._pending[-1]
                            else None)
            self.history.append(record.as_json())
        self._pending = []


@dataclass
class _PendingStep:
    """A finished step whose losses (device tensors) have not been read yet."""

    iteration: int
    consumed: int
    lr: float
    outcome: StepOutcome
    stats: Any
    step_time_s: float = 0.0
    losses: Optional[Dict[str, float]] = None
    global_stats: Any = None
    grad_norm: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def pretrain(args: argparse.Namespace, family: Optional[ModelFamily] = None) -> List[Dict[str, Any]]:
    """Build from the (validated) flags and train; returns this rank's per-step records."""
    from libra_megatron.training.families import get_family

    trainer = Trainer(args, family or get_family(args.model_family))
    return trainer.train()
