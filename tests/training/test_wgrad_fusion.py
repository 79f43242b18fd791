"""Gradient-accumulation fusion in training: the same losses and grad norms with and without it (CPU, fp32).

Fused, the weight gradients of Libra's trainable weights (routed experts, bridges, vision head) and of megatron's
own linears (the GPT family) accumulate into DDP's ``main_grad`` inside the GEMM (libra_megatron/ops/wgrad_accum.py);
unfused, autograd returns them and DDP's hook adds them. Two micro-batches per step, so accumulation across
micro-batches is exercised; the Libra case runs at DP=2 with overlapped grad reduce and the distributed optimizer
(the recipe's flags: DDP's hooks must still fire and skip their add). Each fused run must really take the fused
path (calls to the op are counted).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.training.helpers import make_args

LIBRA = ["--model-family", "libra", "--model", "tiny", "--num-layers", "2", "--seq-length", "600",
         "--image-tokenizer", "tiny:0", "--lr", "2e-3", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--train-iters", "3", "--use-distributed-optimizer", "--overlap-grad-reduce"]
GPT = ["--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4"]


def _train(flags: List[str], world_size: int, fused: bool) -> Tuple[List[Dict], int]:
    from libra_megatron.ops import wgrad_accum
    from libra_megatron.training.loop import pretrain

    calls = []
    original = wgrad_accum.wgrad_gemm_accum

    def counting(*args):
        calls.append(1)
        original(*args)

    wgrad_accum.wgrad_gemm_accum = counting
    try:
        history = pretrain(make_args(flags + ([] if fused else ["--no-gradient-accumulation-fusion"]), world_size))
    finally:
        wgrad_accum.wgrad_gemm_accum = original
    return history, len(calls)


def _series(results: List[Tuple[List[Dict], int]], key: str) -> List[float]:
    for history, _ in results:
        if history and history[0].get(key) is not None:
            return [record[key] for record in history]
    raise AssertionError(f"no rank logged {key}")


@pytest.mark.parametrize("flags,world_size", [(LIBRA, 2), (GPT, 1)], ids=["libra_dp2_overlap_distopt", "gpt"])
def test_fusion_gives_the_same_training(flags, world_size):
    fused = run_on_ranks(_train, world_size=world_size, args=(flags, world_size, True))
    plain = run_on_ranks(_train, world_size=world_size, args=(flags, world_size, False))
    assert all(calls > 0 for _, calls in fused), "the fused run must accumulate through wgrad_gemm_accum"
    assert all(calls == 0 for _, calls in plain)
    for key in ("lm_loss", "grad_norm"):
        reference = _series(plain, key)
        assert len(reference) == 3
        torch.testing.assert_close(torch.tensor(_series(fused, key)), torch.tensor(reference), rtol=1e-5, atol=0)
