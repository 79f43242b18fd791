"""A non-finite loss is reported with its step and sample ids, then the update is skipped or the run stops."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List

from tests.distributed import run_on_ranks
from tests.training.helpers import make_args

BAD_SAMPLE = 5  # in step 2 of a global batch of 4


def _poisoned_gpt_family():
    from libra_megatron.training.gpt_family import gpt_family

    base = gpt_family()

    def run_model(model, batch, clip_features):
        output = base.run_model(model, batch, clip_features)
        if bool((batch["sample_ids"] == BAD_SAMPLE).any()):
            output = output * float("nan")
        return output

    return dataclasses.replace(base, run_model=run_model)


def _train(flags: List[str], world_size: int) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    args = make_args(["--train-iters", "3", "--global-batch-size", "4", "--micro-batch-size", "1"] + flags, world_size)
    return pretrain(args, _poisoned_gpt_family())


def test_nan_loss_is_reported_and_the_update_skipped() -> None:
    histories = run_on_ranks(_train, world_size=2, args=(["--on-nan", "skip"], 2))
    for history in histories:  # every rank agrees on what happened
        assert [r["skipped"] for r in history] == [False, True, False]
        assert history[1]["nonfinite_sample_ids"] == [BAD_SAMPLE]
        assert history[1]["grad_norm"] is None
        assert history[2]["lr"] == history[1]["lr"], "a skipped step must not advance the LR schedule"
        assert [r["consumed_samples"] for r in history] == [4, 8, 12]
    logged = histories[-1]
    assert math.isnan(logged[1]["lm_loss"]) and math.isfinite(logged[2]["lm_loss"])


def _train_expecting_stop(flags: List[str], world_size: int) -> str:
    from libra_megatron.training.loop import NonFiniteLossError

    try:
        _train(flags, world_size)
    except NonFiniteLossError as error:  # caught here so the worker pool survives for the next tests
        return str(error)
    return "no error"


def test_nan_loss_stops_the_run_when_asked() -> None:
    messages = run_on_ranks(_train_expecting_stop, world_size=2, args=(["--on-nan", "stop"], 2))
    for message in messages:  # every rank stops, none hangs
        assert f"non-finite loss at iteration 2 in samples [{BAD_SAMPLE}]" in message
