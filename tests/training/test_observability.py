"""``--timing-log-level`` timers reach the log, the metrics file and TensorBoard; ``--profile`` writes a trace of the
requested iterations on the requested ranks (the tiny GPT on 2 CPU ranks: DP=2 with the distributed optimizer, so
the gradient reduce and the parameter all-gather are timed too)."""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Dict, List

import pytest

from tests.distributed import run_on_ranks
from tests.training.helpers import make_args

LEVEL1 = {"forward-backward", "batch-generator", "optimizer", "all-grads-sync", "params-all-gather"}


def _train(flags: List[str], world_size: int) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    return pretrain(make_args(["--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "1",
                               "--use-distributed-optimizer"] + flags, world_size))


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> Dict:
    root = tmp_path_factory.mktemp("observability")
    flags = ["--timing-log-level", "1", "--log-interval", "2", "--tensorboard-dir", str(root / "tb"),
             "--metrics-file", str(root / "metrics.jsonl"), "--profile", "--profile-step-start", "1",
             "--profile-step-end", "3", "--profile-ranks", "0", "--profile-dir", str(root / "profile")]
    histories = run_on_ranks(_train, world_size=2, args=(flags, 2))
    quiet = run_on_ranks(_train, world_size=2, args=(["--log-interval", "2"], 2))
    return {"root": root, "histories": histories, "quiet": quiet}


def test_level_one_timers_are_logged_once_per_interval(observed: Dict) -> None:
    logged = observed["histories"][-1]
    assert [("timers_ms" in record) for record in logged] == [False, True, False, True]
    for record in logged[1::2]:
        assert LEVEL1 <= set(record["timers_ms"]), record["timers_ms"]
        times = record["timers_ms"]
        assert all(value > 0 for value in times.values())
        assert times["forward-backward"] <= 1000 * record["step_time_s"] * 2  # per-iteration averages
    lines = [json.loads(line) for line in open(observed["root"] / "metrics.jsonl")]
    assert [("timers_ms" in line) for line in lines] == [False, True, False, True]
    # level 0 (the default) adds no timers at all
    assert not any("timers_ms" in record for history in observed["quiet"] for record in history)


def test_timers_reach_tensorboard(observed: Dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(observed["root"] / "tb"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {f"{name}-time" for name in LEVEL1} <= tags, tags
    assert [event.step for event in accumulator.Scalars("forward-backward-time")] == [2, 4]


def test_profile_trace_holds_the_requested_iterations(observed: Dict) -> None:
    traces = glob.glob(os.path.join(observed["root"], "profile", "*.pt.trace.json.gz"))
    assert [os.path.basename(path).split(".")[0] for path in traces] == ["rank0"], traces  # only --profile-ranks
    with gzip.open(traces[0], "rt") as handle:
        events = json.load(handle)["traceEvents"]
    names = {event.get("name", "") for event in events}
    assert {"iteration-2", "iteration-3"} <= names
    assert not {"iteration-1", "iteration-4"} & names
    assert any(name.startswith("ProfilerStep#") for name in names)
    assert any(name.startswith("aten::mm") or name.startswith("aten::addmm") for name in names)
