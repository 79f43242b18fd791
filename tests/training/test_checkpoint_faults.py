"""Checkpoint faults on gloo ranks (tiny GPT, DP=2, distributed optimizer): a newest checkpoint with a truncated or
missing shard is detected at load, set aside (never used, never deleted) and training falls back loudly to the
previous complete one with the losses of an uninterrupted run; the keep-last-K cleanup never deletes the newest
complete checkpoint behind a broken one; a save onto a full disk fails on every rank with a clear error and leaves
the previous checkpoint intact and loadable."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from typing import Dict, List

import pytest

from libra_megatron.training.checkpoint_integrity import checkpoint_problem
from libra_megatron.training.checkpointing import _prune, checkpoint_dir, latest_checkpoint
from tests.distributed import run_on_ranks
from tests.training.helpers import losses, make_args

FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "4", "--use-distributed-optimizer", "--train-iters", "4"]


def _train(flags: List[str], world_size: int) -> List[Dict]:
    from libra_megatron.training.loop import pretrain

    return pretrain(make_args(FLAGS + flags, world_size))


def _full_disk_save(root: str, world_size: int) -> Dict:
    """Train 2 steps (checkpoint at 2), then save again with every shard write failing with ENOSPC."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from libra_megatron.training.families import get_family
    from libra_megatron.training.loop import Trainer

    args = make_args(FLAGS + ["--train-iters", "2", "--save", root, "--save-interval", "2"], world_size)
    trainer = Trainer(args, get_family(args.model_family))
    trainer.train()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = filesystem_async._write_item
    filesystem_async._write_item = full_disk
    try:
        trainer.save(3, 12)
        message = None
    except RuntimeError as exc:
        message = str(exc)
    finally:
        filesystem_async._write_item = real
    resumed = Trainer(make_args(FLAGS + ["--train-iters", "2", "--load", root], world_size),
                      get_family(args.model_family)).resume
    return {"message": message, "resumed": (resumed.iteration, resumed.loaded_from)}


def _shards(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".distcp"))


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 4 steps with checkpoints at 2 and 4 (and a pristine copy of them)."""
    root = str(tmp_path_factory.mktemp("faults") / "ckpt")
    history = run_on_ranks(_train, world_size=2, args=(["--save", root, "--save-interval", "2"], 2))
    pristine = root + ".pristine"
    shutil.copytree(root, pristine, symlinks=True)
    return {"root": root, "pristine": pristine, "losses": losses(history)}


def test_truncated_newest_shard_falls_back_and_resumes_with_identical_losses(reference):
    root = reference["root"]
    newest = checkpoint_dir(root, 4)
    shard = os.path.join(newest, _shards(newest)[-1])
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    broken_digest = _digest(shard)
    assert "truncated" in checkpoint_problem(newest)
    history = run_on_ranks(_train, world_size=2, args=(
        ["--load", root, "--save", root, "--save-interval", "2", "--keep-last-checkpoints", "1"], 2))
    assert losses(history) == reference["losses"][2:]  # steps 3 and 4 again, bit for bit
    aside = newest + ".broken"
    assert _digest(os.path.join(aside, os.path.basename(shard))) == broken_digest  # kept as it was, not used
    assert "truncated" in open(os.path.join(aside, "BROKEN.txt")).read()
    assert checkpoint_problem(newest) is None  # saved anew
    assert latest_checkpoint(root) == newest


def test_missing_shard_is_detected_loudly_and_cleanup_keeps_the_fallback(reference, tmp_path, capsys):
    pristine = reference["pristine"]
    root = str(tmp_path / "missing")
    shutil.copytree(pristine, root, symlinks=True)
    os.remove(os.path.join(checkpoint_dir(root, 4), _shards(checkpoint_dir(root, 4))[0]))
    before = sorted(os.listdir(root))
    # a lookup (architecture, dry run, --pretrained-checkpoint, conversion) falls back without touching the folder
    assert latest_checkpoint(root) == checkpoint_dir(root, 2)
    assert sorted(os.listdir(root)) == before and capsys.readouterr().err == ""
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == "4"
    # the trainer resuming its own --load root repairs, loudly
    assert latest_checkpoint(root, repair=True) == checkpoint_dir(root, 2)
    err = capsys.readouterr().err
    assert "CHECKPOINT FALLBACK" in err and "is missing" in err and "iter_0000004" in err
    assert os.path.isdir(checkpoint_dir(root, 4) + ".broken")
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    # keep-last-2 after a new save (6): only complete checkpoints count, a broken one is never deleted
    root = str(tmp_path / "prune")
    shutil.copytree(pristine, root, symlinks=True)
    shutil.copytree(checkpoint_dir(root, 4), checkpoint_dir(root, 6), symlinks=True)
    broken = checkpoint_dir(root, 4)
    with open(os.path.join(broken, _shards(broken)[0]), "r+b") as handle:
        handle.truncate(10)
    _prune(root, keep_last=2, keep=6)
    assert all(os.path.isdir(checkpoint_dir(root, i)) for i in (2, 4, 6))
    _prune(root, keep_last=1, keep=6)
    assert not os.path.isdir(checkpoint_dir(root, 2)) and os.path.isdir(broken)
    # after a --ckpt-step rollback (resumed at 2, saved 3): 4 and 6 belong to the abandoned branch, never pruned
    root = str(tmp_path / "rollback")
    shutil.copytree(pristine, root, symlinks=True)
    for iteration in (3, 6):
        shutil.copytree(checkpoint_dir(root, 4), checkpoint_dir(root, iteration), symlinks=True)
    _prune(root, keep_last=1, keep=3)
    assert [os.path.isdir(checkpoint_dir(root, i)) for i in (2, 3, 4, 6)] == [False, True, True, True]


def test_full_disk_save_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_on_ranks(_full_disk_save, world_size=2, args=(root, 2))
    for result in results:  # every rank fails the save with the same clear error, none hangs
        assert result["message"] is not None and "disk is full" in result["message"]
        assert "iter_0000002 is intact" in result["message"]
        assert result["resumed"] == (2, checkpoint_dir(root, 2))
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert checkpoint_problem(checkpoint_dir(root, 2)) is None
