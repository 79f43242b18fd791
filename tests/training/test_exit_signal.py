"""``--exit-signal-handler``: a SIGTERM (SLURM's ``--signal=TERM@300`` before the time limit) makes the trainer
finish the step, save and exit, without an evaluation; the process's previous SIGTERM handler is back afterwards."""
from __future__ import annotations

import os

from tests.distributed import run_on_ranks
from tests.training.helpers import make_args


def _terminated_run(save: str):
    import signal

    from libra_megatron.training import loop

    original_step = loop.train_step

    def step_then_terminate(*args, **kwargs):
        outcome = original_step(*args, **kwargs)
        if args[6] == 3:  # the iteration this step completes: SIGTERM arrives during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    def before(signum, frame):  # the handler the process had before the run
        raise AssertionError("the trainer's handler should have caught this SIGTERM")

    previous = signal.signal(signal.SIGTERM, before)
    loop.train_step = step_then_terminate
    try:
        history = loop.pretrain(make_args(["--train-iters", "10", "--micro-batch-size", "2", "--save", save,
                                           "--save-interval", "100", "--eval-interval", "4", "--eval-iters", "1",
                                           "--exit-signal-handler"], 1))
        restored = signal.getsignal(signal.SIGTERM) is before
    finally:
        loop.train_step = original_step
        signal.signal(signal.SIGTERM, previous)
    validated = [record["iteration"] for record in history if "validation_lm_loss" in record]
    return [record["iteration"] for record in history], validated, restored


def test_sigterm_saves_and_exits_after_the_step_and_restores_the_handler(tmp_path):
    save = str(tmp_path / "ckpt")
    ((iterations, validated, restored),) = run_on_ranks(_terminated_run, world_size=1, args=(save,))
    # the signal is seen by the next step's flag agreement: step 4 completes, then the run saves and stops
    assert iterations == [1, 2, 3, 4]
    assert validated == []  # iteration 4 was an evaluation step, skipped to stay inside the grace period
    assert os.listdir(save) and open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "4"
    assert restored
