"""``examples/pretrain_libra_7b.sh --dry-run`` plans the 7B job on a CPU: layout, parameters, memory per GPU."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_7b_recipe_dry_run_reports_the_released_parameter_counts() -> None:
    env = dict(os.environ, PYTHON=sys.executable, NNODES="4", GPUS_PER_NODE="8", PYTHONPATH=REPO)
    done = subprocess.run(["bash", os.path.join(REPO, "examples", "pretrain_libra_7b.sh"), "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "model parameters: 11,015,860,224 (trainable in pretrain: 4,277,444,608)" in out
    assert "layout: 32 GPUs = TP 1 x PP 1 x DP 32, distributed optimizer" in out
    assert "global batch 1280 = 10 micro-batches x 4 x DP 32" in out
    assert "40000 iterations" in out and "seq 700" in out
    stage = next(line for line in out.splitlines() if line.split()[:2] == ["0", "0-31"])
    assert "11,015,860,224" in stage and "4,277,444,608" in stage
    assert "-> fits" in out


def test_dry_run_splits_parameters_over_pipeline_stages_and_tensor_ranks() -> None:
    argv = [sys.executable, os.path.join(REPO, "pretrain_libra.py"), "--dry-run", "--dry-run-world-size", "8",
            "--model", "libra-7b", "--bf16", "--image-tokenizer", "tiny", "--mock-data", "--seq-length", "700",
            "--micro-batch-size", "2", "--global-batch-size", "64", "--train-iters", "10",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [row[1] for row in rows] == ["0-15", "16-31"]
    per_rank = [int(row[2].replace(",", "")) for row in rows]
    # 4 model-parallel ranks share the model; replicated pieces (low-rank A's, norms) are held by both TP ranks
    assert all(11_015_860_224 // 4 < p < 11_015_860_224 // 2 for p in per_rank), per_rank
    assert 2 * sum(per_rank) >= 11_015_860_224
