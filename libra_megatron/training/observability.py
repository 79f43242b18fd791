"""Megatron-LM-style step timers (``--timing-log-level``) and the torch profiler window (``--profile``).

Timers are megatron-core's :class:`megatron.core.timers.Timers`, installed as ``config.timers`` of the model and
the optimizer, so the schedules, DDP's ``finalize_model_grads`` and the optimizer time themselves exactly as in
Megatron-LM. Levels (Megatron-LM's):

* 0: none beyond the iteration time the loop always measures (no device syncs are added);
* 1: ``forward-backward``, ``batch-generator`` (the step's data: loader, stats, host-to-device), ``optimizer``
  (+ megatron's ``optimizer-*`` parts), ``all-grads-sync`` (gradient reduce), ``params-all-gather``
  (distributed optimizer); each timer synchronises the device at its start and stop;
* 2: also ``forward-compute``, ``backward-compute`` and the pipeline send/recv timers.

Every ``--log-interval`` steps all ranks exchange their accumulated times in one all-gather (the timers' only
collective) and the logging rank prints Megatron-LM's ``(min, max) time across ranks (ms):`` block, writes
``<name>-time`` TensorBoard scalars (max over ranks, per iteration) and a ``timers_ms`` field in the metrics file.

``--profile --profile-step-start N --profile-step-end M --profile-ranks R...`` records iterations ``N+1..M`` (the
steps Megatron-LM profiles for that window: it counts iterations before the increment) with
:mod:`torch.profiler` on the listed global ranks, one step of warm-up before, each iteration inside a
``iteration-K`` range; the trace is written as ``rank<R>.<time>.pt.trace.json.gz`` into ``--profile-dir`` (default
``--tensorboard-dir``), which Perfetto (ui.perfetto.dev) and TensorBoard's profiler plugin open.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

# Megatron-LM's ``training_log`` order, then ours; a timer that no rank started is left out of the report.
TIMER_NAMES: Tuple[str, ...] = (
    "forward-backward", "forward-compute", "backward-compute", "batch-generator", "forward-recv", "forward-send",
    "backward-recv", "backward-send", "forward-send-forward-recv", "forward-send-backward-recv",
    "backward-send-forward-recv", "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
    "layernorm-grads-all-reduce", "embedding-grads-all-reduce", "all-grads-sync", "params-all-gather",
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
    "optimizer-count-zeros", "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
)


def build_timers(args: argparse.Namespace, model_config: Any, optimizer: Any) -> Optional[Any]:
    """megatron-core ``Timers`` at ``--timing-log-level``, installed on the model and optimizer configs (None at
    level 0: nothing is timed beyond the loop's own wall clock)."""
    if args.timing_log_level <= 0:
        return None
    from megatron.core.timers import Timers

    timers = Timers(args.timing_log_level, "minmax")
    model_config.timers = timers
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner.config.timers = timers
    return timers


@contextlib.contextmanager
def timed(timers: Optional[Any], name: str, log_level: int = 1) -> Iterator[None]:
    """``with timed(timers, "optimizer"):`` -- a megatron timer around the block (nothing when ``timers`` is None)."""
    if timers is None:
        yield
        return
    timer = timers(name, log_level=log_level)
    timer.start()
    try:
        yield
    finally:
        timer.stop()


def gather_timer_times(timers: Optional[Any], steps: int) -> Dict[str, Tuple[float, float]]:
    """``{name: (min ms, max ms)}`` per iteration over all ranks, then reset (collective: call on every rank)."""
    if timers is None or steps <= 0:
        return {}
    times = timers._get_global_min_max_time(list(TIMER_NAMES), reset=True, barrier=False, normalizer=steps / 1000.0)
    return {name: times[name] for name in TIMER_NAMES if name in times}


def format_timer_block(times: Dict[str, Tuple[float, float]]) -> str:
    """Megatron-LM's block: ``(min, max) time across ranks (ms):`` then one dotted line per timer."""
    lines = ["(min, max) time across ranks (ms):"]
    lines += [f"    {(name + ' ').ljust(48, '.')}: ({low:.2f}, {high:.2f})" for name, (low, high) in times.items()]
    return "\n".join(lines)


class StepProfiler:
    """The ``--profile`` window on this rank: call :meth:`step_range` around every training step."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.enabled = bool(args.profile) and rank in (args.profile_ranks or [0])
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.rank, self.device = rank, args.device
        self.folder = args.profile_dir or args.tensorboard_dir
        self._profiler = None
        self.done = False
        self.trace_path: Optional[str] = None

    def _begin(self, warmup: int) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        os.makedirs(self.folder, exist_ok=True)
        self._profiler = profile(
            activities=activities, record_shapes=True,
            schedule=schedule(wait=0, warmup=warmup, active=self.end - self.start, repeat=1),
            on_trace_ready=self._write,
        )
        self._profiler.start()

    def _write(self, profiler: Any) -> None:
        from torch.profiler import tensorboard_trace_handler

        handler = tensorboard_trace_handler(self.folder, worker_name=f"rank{self.rank}", use_gzip=True)
        handler(profiler)
        traces = sorted(name for name in os.listdir(self.folder) if name.startswith(f"rank{self.rank}."))
        self.trace_path = os.path.join(self.folder, traces[-1]) if traces else None

    @contextlib.contextmanager
    def step_range(self, iteration: int) -> Iterator[None]:
        """Profile the step that produces ``iteration`` when it lies in the window (one warm-up step before)."""
        in_window = self.start < iteration <= self.end
        if self.enabled and not self.done and self._profiler is None:
            if iteration == self.start and self.start > 0:
                self._begin(warmup=1)  # the step before the window: traced, not saved (warms the profiler up)
            elif in_window:  # window starting at 0, or a run resumed inside it
                self._begin(warmup=0)
        if self._profiler is None:
            yield
            return
        with torch.profiler.record_function(f"iteration-{iteration}") if in_window else contextlib.nullcontext():
            yield
        self._profiler.step()
        if iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stop the profiler (a window cut short by the end of training is written as far as it got)."""
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.stop()
        self.done = self.enabled
