"""One rank dies mid-step; torchrun's elastic agent restarts the group, which resumes from the newest complete
checkpoint with the very losses of the first attempt (docs/design.md#training-faults).

The job runs as the launcher runs it: ``torchrun`` with a c10d rendezvous endpoint and ``--max-restarts``, 4 CPU
ranks (TP=2 x DP=2, gloo), the tiny Libra model, ``--load`` = ``--save``. After the first checkpoint and one more
logged step, rank 1 is SIGKILLed. The agent stops the other ranks and starts a new group; it resumes from the
checkpoint and recomputes the steps after it, which must equal the first attempt's records bit for bit, then
finishes. The launcher script itself is checked to pass the same elastic flags.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

from libra_megatron.training.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = [
    "--model", "tiny", "--num-layers", "2", "--seq-length", "600", "--image-tokenizer", "tiny:0", "--mock-data",
    "--num-workers", "0", "--micro-batch-size", "2", "--global-batch-size", "4", "--tensor-model-parallel-size", "2",
    "--lr", "2e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "1", "--train-iters", "6",
    "--save-interval", "2",
]
KEYS = ("iteration", "consumed_samples", "lm_loss", "text_loss", "image_loss", "grad_norm", "lr")
TIMEOUT_S = 900


def _attempts(path: str) -> List[List[Dict]]:
    """The metrics records split into attempts (a restart logs an iteration again)."""
    attempts: List[List[Dict]] = [[]]
    if not os.path.exists(path):
        return attempts
    with open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            row = {key: record[key] for key in KEYS}
            if attempts[-1] and row["iteration"] <= attempts[-1][-1]["iteration"]:
                attempts.append([])
            attempts[-1].append(row)
    return attempts


def _rank_process(agent_pid: int, rank: int):
    import psutil

    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "pretrain_libra.py" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _stop(proc: subprocess.Popen) -> None:
    import psutil

    try:
        family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_launcher_passes_elastic_flags(tmp_path) -> None:
    env = dict(os.environ, TORCHRUN="echo", NNODES="2", GPUS_PER_NODE="8", MASTER_ADDR="node0", MASTER_PORT="6000",
               MAX_RESTARTS="5", RDZV_ID="job42", CHECKPOINT_DIR=str(tmp_path))
    command = subprocess.run(["bash", os.path.join(REPO, "examples", "pretrain_libra_7b.sh")], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for flag, value in (("--rdzv-backend", "c10d"), ("--rdzv-endpoint", "node0:6000"), ("--rdzv-id", "job42"),
                        ("--max-restarts", "5"), ("--nnodes", "2"), ("--load", str(tmp_path)),
                        ("--save", str(tmp_path))):
        assert command[command.index(flag) + 1] == value, (flag, command)


def test_killed_rank_restarts_the_group_and_resumes_with_identical_losses(tmp_path) -> None:
    save, metrics, log_path = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl"), str(tmp_path / "job.log")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "restart-test",
               "--max-restarts", "1", "--monitor-interval", "0.5", os.path.join(REPO, "pretrain_libra.py"), *FLAGS,
               "--save", save, "--load", save, "--metrics-file", metrics]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    marker = os.path.join(save, "latest_checkpointed_iteration.txt")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        killed_after = None
        while killed_after is None:  # after the first checkpoint and one more logged step: kill rank 1
            assert proc.poll() is None, "the job ended before the kill:\n" + open(log_path).read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint + step in time:\n" + open(log_path).read()[-4000:]
            if os.path.isfile(marker):
                checkpoint = int(open(marker).read() or 0)
                logged = _attempts(metrics)[0]
                if logged and logged[-1]["iteration"] > checkpoint:
                    victim = _rank_process(proc.pid, 1)
                    if victim is not None:
                        victim.send_signal(signal.SIGKILL)
                        killed_after = logged[-1]["iteration"]
            time.sleep(0.05)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        _stop(proc)
        raise
    output = open(log_path).read()
    assert code == 0, f"the restarted job failed ({code}):\n" + output[-4000:]
    attempts = _attempts(metrics)
    assert len(attempts) == 2, f"expected one restart, got {len(attempts)} attempt(s):\n" + output[-4000:]
    first, second = attempts
    assert first[-1]["iteration"] >= killed_after and second[-1]["iteration"] == 6
    resumed_at = second[0]["iteration"] - 1
    assert resumed_at % 2 == 0 and resumed_at < killed_after  # from a checkpoint, before the kill
    by_iteration = {row["iteration"]: row for row in first}
    overlap = [row for row in second if row["iteration"] in by_iteration]
    assert overlap, "the restart recomputed no step of the first attempt"
    for row in overlap:
        assert row == by_iteration[row["iteration"]], f"iteration {row['iteration']} differs after the restart"
    assert [r["iteration"] for r in first if r["iteration"] <= resumed_at] + [r["iteration"] for r in second] == \
        list(range(1, 7))
    assert "resumed from" in output
