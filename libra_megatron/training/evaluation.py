"""Periodic validation (Megatron-LM's ``evaluate``): ``--eval-iters`` global batches, forward only, on every rank.

Every ``--eval-interval`` iterations and at the end of training, all ranks run the validation batches through
``get_forward_backward_func(..., forward_only=True)`` under ``torch.no_grad()`` with the model chunks in eval mode
(back to train mode afterwards). The last pipeline stage sums the per-micro-batch ``[loss sum, token count]``
reports and all-reduces them over data parallelism once, so ``lm loss`` / ``text loss`` / ``image loss`` are token
means over all evaluated tokens (Megatron-LM's ``numerator / denominator``), independent of the layout.

Evaluation never changes training: the validation stream has its own DataLoader (its own sampler starting at
sample 0 at every evaluation, its own ``torch.Generator`` for the loader's worker seed, so the global RNG is not
drawn from), the consumed-samples count is untouched, and every RNG state (Python, NumPy, torch, CUDA, megatron's
model-parallel tracker) is restored after it. With ``--overlap-param-gather`` the forward pre-hooks are disabled
around it with a synchronous parameter all-gather, as Megatron-LM does.
"""
from __future__ import annotations

import argparse
import contextlib
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from libra_megatron.training.model_family import LOSS_KEYS


class ValidationStream:
    """This DP rank's validation micro-batches; every call of :meth:`batches` restarts at global sample 0.

    Samples are split over DP exactly like training batches (block of ``MBS x DP`` per micro-batch step, rank ``r``
    takes slice ``r``), so the union over DP ranks of one evaluation is samples ``[0, eval_iters x GBS)``.
    """

    def __init__(self, dataset: Any, num_samples: int, args: argparse.Namespace, dp_rank: int, dp_size: int,
                 vocab: Any, prepare: Optional[Callable[[Dict], None]] = None) -> None:
        from libra_megatron.training.data_stream import MicroBatchStream

        self.eval_iters = args.eval_iters
        # its own loader generator: the DataLoader would otherwise draw its worker base seed from the global torch
        # RNG and shift the training stream at every evaluation
        self.stream = MicroBatchStream(
            dataset, num_samples, args, 0, dp_rank, dp_size, vocab, prepare, prefetch_factor=2,
            loader_seed=args.seed, start=False,
            exhausted="the validation dataset ran out of samples (it holds --eval-iters x --global-batch-size)")

    def batches(self) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """``eval_iters`` lists of ``num_microbatches`` micro-batches (on the training device), from sample 0."""
        self.stream.restart()
        for _ in range(self.eval_iters):
            yield self.stream.next_step()[0]


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore Python, NumPy, torch (CPU and current CUDA device) and megatron tracker RNG states on exit."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state() if cuda else None,
             {name: state.clone() for name, state in tracker.get_states().items()})
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state(saved[3])
        tracker.set_states(saved[4])


@contextlib.contextmanager
def inference_guard(model: Sequence[torch.nn.Module], overlap_param_gather: bool = False) -> Iterator[None]:
    """Model chunks in eval mode, ``no_grad``, every RNG state restored, gather hooks off (synchronous param
    gather first) under ``--overlap-param-gather``; train mode and hooks back on exit."""
    if overlap_param_gather:
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad(), preserved_rng_state():
            yield
    finally:
        for chunk in model:
            chunk.train()
        if overlap_param_gather:
            for chunk in model:
                chunk.enable_forward_pre_hook()


def evaluate(forward_step: Callable, stream: ValidationStream, model: List[torch.nn.Module],
             args: argparse.Namespace) -> Optional[Dict[str, float]]:
    """Validation losses over ``--eval-iters`` global batches; a dict on last-stage ranks, ``None`` elsewhere.

    Must be called on every rank (pipeline p2p and the DP all-reduce are collective). Keys are the ``LOSS_KEYS``
    that had tokens (e.g. no ``image loss`` on a text-only validation set).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from libra_megatron.training.padding import step_seq_length

    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    totals: Optional[torch.Tensor] = None  # [len(LOSS_KEYS), 2] of (loss sum, token count), on the loss device
    with inference_guard(model, args.overlap_param_gather):  # every weight current, no gather hooks
        for micro_batches in stream.batches():
            iterators = [iter(micro_batches) for _ in model]
            seq_length = step_seq_length(micro_batches)
            reports = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators if len(model) > 1 else iterators[0],
                model=model, num_microbatches=len(micro_batches), seq_length=seq_length,
                micro_batch_size=args.micro_batch_size, decoder_seq_length=seq_length, forward_only=True,
            )
            if last_stage:
                step = torch.stack([torch.stack([r[key].detach().double() for key in LOSS_KEYS])
                                    for r in reports]).sum(dim=0)
                totals = step if totals is None else totals + step
    if not last_stage:
        return None
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    totals = totals.cpu()
    return {key: float(totals[i, 0] / totals[i, 1]) for i, key in enumerate(LOSS_KEYS) if totals[i, 1] > 0}


def evaluation_due(args: argparse.Namespace, iteration: int) -> bool:
    """Whether the step that just reached ``iteration`` is followed by an evaluation (interval, or the last)."""
    if args.eval_iters <= 0:
        return False
    return bool(args.eval_interval and iteration % args.eval_interval == 0) or iteration == args.train_iters


def validation_fields(losses: Dict[str, float]) -> Dict[str, float]:
    """``{"validation_lm_loss": ..., ...}``: the keys the metrics file and the returned history use."""
    return {f"validation_{key.replace(' ', '_')}": value for key, value in losses.items()}
