"""Flags, the YAML file and start-up validation: a bad configuration fails on every rank with one clear message
before any process group exists (so nothing can hang)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from libra_megatron.training.arguments import ConfigError, parse_args, validate_args
from libra_megatron.training.data_stream import dataset_files
from libra_megatron.training.families import get_family

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _validate(argv, world_size=1):
    args = parse_args(argv)
    return validate_args(args, world_size, get_family(args.model_family).shape(args), dataset_files)


def test_reference_recipe_resolves_warmup_and_micro_batches() -> None:
    args = _validate(["--model", "libra-7b", "--mock-data", "--image-tokenizer", "tiny", "--seq-length", "700",
                      "--micro-batch-size", "8", "--global-batch-size", "1280", "--train-iters", "40000",
                      "--lr-warmup-fraction", "0.05"], world_size=32)
    assert (args.data_parallel_size, args.num_microbatches, args.lr_warmup_iters) == (32, 5, 2000)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay, args.clip_grad) == (
        0.9, 0.99, 1e-8, 0.01, 1.0)


def test_yaml_supplies_defaults_and_the_command_line_wins(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("micro_batch_size: 4\nlr: 3.0e-4\ntensor-model-parallel-size: 2\n")
    args = parse_args(["--config", str(config), "--lr", "1e-3"])
    assert (args.micro_batch_size, args.lr, args.tensor_model_parallel_size) == (4, 1e-3, 2)
    config.write_text("micro_batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'micro_batch_sise'"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize("argv, world_size, message", [
    (["--tensor-model-parallel-size", "3"], 3, r"--tensor-model-parallel-size 3 does not divide num_attention_heads 4"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2,
     r"--global-batch-size 6 is not divisible by --micro-batch-size x DP = 2 x 2 = 4"),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"], 2,
     r"num_layers 2 of model 'tiny' is not divisible by PP x VPP = 4"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "601"], 2,
     r"--seq-length 601 must be divisible by TP 2"),
])
def test_bad_layout_is_refused(argv, world_size, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _validate(["--model", "tiny", "--mock-data", "--image-tokenizer", "tiny", "--train-iters", "1"] + argv,
                  world_size)


def test_missing_data_is_refused(tmp_path) -> None:
    base = ["--model", "tiny", "--image-tokenizer", "tiny", "--train-iters", "1"]
    with pytest.raises(ConfigError, match=r"--data-path is required"):
        _validate(base)
    (tmp_path / "corpus.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--data-path: file not found: .*corpus.idx \(from prefix"):
        _validate(base + ["--data-path", str(tmp_path / "corpus")])
    with pytest.raises(ConfigError, match=r"--image-tokenizer is required"):
        _validate(["--model", "tiny", "--mock-data", "--train-iters", "1"])


def test_torchrun_job_with_a_bad_config_exits_at_once_on_every_rank() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), os.path.join(REPO, "pretrain_libra.py"), "--model", "tiny", "--mock-data",
               "--image-tokenizer", "tiny", "--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "6"]
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = "configuration error: --global-batch-size 6 is not divisible by --micro-batch-size x DP = 2 x 2 = 4"
    assert (done.stdout + done.stderr).count(message) == 1, done.stderr[-3000:]
    assert time.monotonic() - start < 60
