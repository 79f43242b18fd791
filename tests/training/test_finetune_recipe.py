"""The stage-2 recipe: ``examples/finetune_libra_7b.sh --dry-run`` plans the instruct stage (all 11B parameters
train); the same script, on CPU with the tiny model, preprocesses a generated LLaVA-format corpus and trains a few
instruct steps with packing from a pretraining checkpoint; the SLURM wrapper sets the torchrun rendezvous."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.distributed import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_instruct_recipe_dry_run_reports_trainable_parameters_and_memory() -> None:
    env = dict(os.environ, PYTHON=sys.executable, NNODES="2", GPUS_PER_NODE="8", PYTHONPATH=REPO)
    done = subprocess.run(["bash", os.path.join(REPO, "examples", "finetune_libra_7b.sh"), "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "stage instruct" in out and "seq 2048" in out
    assert "model parameters: 11,015,860,224 (trainable in instruct: 11,015,860,224)" in out
    assert "layout: 16 GPUs = TP 2 x PP 1 x DP 8, sequence parallel, distributed optimizer" in out
    assert "global batch 128 = 8 micro-batches x 2 x DP 8" in out
    assert "peak estimate per GPU" in out and "-> fits" in out


def _executable(path: str, text: str) -> str:
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_sbatch_wrapper_sets_the_torchrun_rendezvous_from_slurm(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(str(bin_dir / "scontrol"), "#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    # srun: run the task once per node, as SLURM would (options dropped, SLURM_NODEID set per task)
    _executable(str(bin_dir / "srun"), "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                                       "for id in 0 1; do SLURM_NODEID=$id \"$@\"; done\n")
    log = tmp_path / "torchrun.log"
    fake_torchrun = _executable(str(bin_dir / "fake-torchrun"), f"#!/bin/sh\necho \"$@\" >> {log}\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=REPO, GPUS_PER_NODE="8",
               TORCHRUN=fake_torchrun, PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(REPO, "examples", "pretrain_libra_7b.sbatch"), "--train-iters", "7"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:  # every node joins the same c10d rendezvous on the allocation's first host
        assert ("--nproc_per_node 8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint gpu-a17:24242 --rdzv-id 4242 "
                in line) and " pretrain_libra.py " in line
        assert line.endswith("--train-iters 7") and "--stage pretrain" in line


def _pretrain_checkpoint(save: str):
    from libra_megatron.training.loop import pretrain
    from tests.training.helpers import make_args

    return pretrain(make_args(["--model-family", "libra", "--model", "tiny", "--seq-length", "600",
                               "--image-tokenizer", "tiny:0", "--micro-batch-size", "1", "--global-batch-size", "1",
                               "--train-iters", "1", "--save", save], 1))


def _llava_corpus(folder) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for n in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * n, 50, 3), dtype=np.uint8)).save(folder / f"{n}.jpg")
        rows.append({"id": f"s{n}", "image": f"{n}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": f"Random noise number {n}."},
            {"from": "human", "value": "Is it a photo?"}, {"from": "gpt", "value": "No, it is not."}]})
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "Say hello."},
                                                 {"from": "gpt", "value": "Hello."}]})
    path = folder / "llava_instruct.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_instruct_recipe_trains_the_tiny_model_with_packing_on_cpu(tmp_path) -> None:
    from libra_megatron.data.sentencepiece_training import train_sentencepiece
    from libra_megatron.tokenizer.image_tokenizer import ImageTokenizer

    spm = train_sentencepiece(tmp_path / "tokenizer.model", vocab_size=512)
    vision = str(tmp_path / "vision")
    ImageTokenizer.tiny(0).save_pretrained(vision)
    corpus = _llava_corpus(tmp_path)
    pretrained = str(tmp_path / "pretrain")
    run_on_ranks(_pretrain_checkpoint, world_size=1, args=(pretrained,))
    torchrun = _executable(str(tmp_path / "torchrun"), f"#!/bin/sh\nexec {sys.executable} -m torch.distributed.run \"$@\"\n")
    out = tmp_path / "instruct"
    env = dict(os.environ, PYTHON=sys.executable, TORCHRUN=torchrun, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
               GPUS_PER_NODE="1", NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), TP="1", PRECISION="",
               MICRO_BATCH_SIZE="1", GLOBAL_BATCH_SIZE="1", TRAIN_ITERS="3", NUM_WORKERS="0", PREPROCESS_WORKERS="0",
               INSTRUCT_JSON=corpus, IMAGE_ROOT=str(tmp_path), DATA_PATH=str(tmp_path / "data" / "llava"),
               TOKENIZER_MODEL=spm, IMAGE_TOKENIZER=vision, PRETRAINED=pretrained, CHECKPOINT_DIR=str(out),
               LOG_INTERVAL="1", PREPROCESS_ARGS="--no-progress --device cpu")
    done = subprocess.run(["bash", os.path.join(REPO, "examples", "finetune_libra_7b.sh"), "--model", "tiny",
                           "--device", "cpu"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    sidecar = json.loads((tmp_path / "data" / "llava.json").read_text())
    assert sidecar["kind"] == "instruct", sidecar
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["text_loss"]) and r["text_loss"] > 0 for r in records)
    # packing: a 2048-token row holds several ~600-token conversations, so a step sees more than one sample
    assert all(r["tokens"] > 1200 for r in records), [r["tokens"] for r in records]
    assert os.path.isdir(out / "iter_0000003")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
