"""Kill -9 after a checkpoint, resume: the run continues exactly as if it had never stopped.

The trainer runs as a real job (``torchrun --nproc_per_node 2 pretrain_libra.py``, DP=2 with the distributed
optimizer, the tiny Libra model, the frozen CLIP on the first stage). One job is SIGKILLed (the whole process
group, mid-training) as soon as its first checkpoint is marked finished; a second job resumes from it. Every
step's loss, grad norm, learning rate and consumed-sample count equals an uninterrupted job's bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

import pytest

from libra_megatron.training.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = [
    "--model", "tiny", "--seq-length", "600", "--image-tokenizer", "tiny:0", "--mock-data", "--num-workers", "0",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--use-distributed-optimizer",
    "--lr", "2e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "1",
]
KEYS = ("iteration", "consumed_samples", "lm_loss", "text_loss", "image_loss", "grad_norm", "lr")


def _launch(flags: List[str], log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(REPO, "pretrain_libra.py"), *FLAGS, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own)."""
    import psutil

    try:
        processes = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        processes = []
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(processes, timeout=10)


def _wait(proc: subprocess.Popen, log_path: str, timeout: float = 240) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc)
        raise
    assert code == 0, f"training job failed ({code}):\n" + open(log_path).read()[-4000:]


def _records(path: str) -> Dict[int, Dict]:
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {row["iteration"]: {key: row[key] for key in KEYS} for row in rows}


def _kill_after_first_checkpoint(proc: subprocess.Popen, save: str, log_path: str) -> int:
    marker = os.path.join(save, "latest_checkpointed_iteration.txt")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the job ended before it was killed:\n" + open(log_path).read()[-4000:])
        if os.path.isfile(marker):
            _kill_job(proc)
            with open(marker) as handle:
                return int(handle.read())
        time.sleep(0.05)
    _kill_job(proc)
    pytest.fail("no checkpoint appeared in time")


def test_kill_minus_nine_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    reference = _launch(["--train-iters", "6", "--metrics-file", str(tmp_path / "reference.jsonl")],
                        str(tmp_path / "reference.log"))
    _wait(reference, str(tmp_path / "reference.log"))
    expected = _records(str(tmp_path / "reference.jsonl"))
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    save = str(tmp_path / "ckpt")
    killed = _launch(["--train-iters", "1000", "--save", save, "--save-interval", "2", "--metrics-file", str(tmp_path / "killed.jsonl")],
                     str(tmp_path / "killed.log"))
    resumed_from = _kill_after_first_checkpoint(killed, save, str(tmp_path / "killed.log"))
    assert resumed_from in (2, 4)
    before_kill = _records(str(tmp_path / "killed.jsonl"))
    for iteration, record in before_kill.items():
        if iteration <= 6:
            assert record == expected[iteration], f"iteration {iteration} before the kill differs"

    resumed = _launch(["--train-iters", "6", "--load", save, "--save", save, "--save-interval", "2",
                       "--metrics-file", str(tmp_path / "resumed.jsonl")], str(tmp_path / "resumed.log"))
    _wait(resumed, str(tmp_path / "resumed.log"))
    after = _records(str(tmp_path / "resumed.jsonl"))
    assert sorted(after) == list(range(resumed_from + 1, 7)), "the resumed job must continue after the checkpoint"
    for iteration, record in after.items():
        assert record == expected[iteration], f"iteration {iteration}: {record} != {expected[iteration]}"
    assert not [name for name in os.listdir(save) if name.endswith(".partial")], "a partial save was left behind"
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as handle:
        assert int(handle.read()) == 6
