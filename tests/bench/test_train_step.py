"""``bench/train_step.py --recipe 7b`` runs end to end on CPU at tiny size (a smoke test: nothing is timed here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_recipe_7b_prints_the_breakdown_for_libra_and_the_dense_baseline(tmp_path) -> None:
    argv = [sys.executable, os.path.join(REPO, "bench", "train_step.py"), "--recipe", "7b", "--device", "cpu",
            "--warmup", "0", "--steps", "1", "--trace-dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["family"], r["model"]) for r in results] == [("libra", "tiny"), ("gpt", "gpt-tiny")]
    for result in results:
        assert "error" not in result, result
        assert 0 < result["forward_backward_s"] < result["median_step_s"]
        assert 0 < result["optimizer_s"] < result["median_step_s"]
        assert result["everything_else_s"] >= 0 and result["tflops_per_gpu"] > 0
        assert os.path.getsize(result["trace"]) > 0
    assert "fwd-bwd" in done.stdout and "GPU idle" in done.stdout
