"""Integrity of finished training checkpoints: detect a truncated or missing shard before loading, fall back to the
previous complete checkpoint loudly, and never use or delete a broken one (``docs/design.md#training-faults``).

A finished ``iter_N`` folder (megatron-core ``torch_dist``) holds ``metadata.json``, torch DCP's
``.metadata`` (which names, for every saved item, its shard file, byte offset and length) and the ``*.distcp``
shards. :func:`checkpoint_problem` checks all of that without loading a tensor: every shard the metadata names
must exist and be at least as long as the data it must hold. A broken checkpoint found at load is renamed to
``iter_N.broken`` (kept for inspection, out of reach of loading, saving and pruning) and the newest complete
older checkpoint is used instead.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Optional

BROKEN_SUFFIX = ".broken"


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be loaded (missing file, truncated shard, unreadable metadata),
    or ``None`` when every file it needs is present and long enough."""
    for name in ("metadata.json", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(path).read_metadata()
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, AttributeError) as exc:
        return f".metadata is unreadable ({type(exc).__name__}: {exc})"
    needed: Dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, end in sorted(needed.items()):
        shard = os.path.join(path, relative)
        try:
            size = os.path.getsize(shard)
        except OSError:
            return f"shard {relative} is missing"
        if size < end:
            return f"shard {relative} is truncated ({size} bytes, its items need {end})"
    return None


def set_aside_broken(path: str, problem: str) -> str:
    """Rename a broken checkpoint folder to ``<path>.broken`` (numbered if taken); returns the new path. Never
    deletes it."""
    target, number = path + BROKEN_SUFFIX, 1
    while os.path.exists(target):
        number += 1
        target = f"{path}{BROKEN_SUFFIX}{number}"
    os.rename(path, target)
    with open(os.path.join(target, "BROKEN.txt"), "w") as handle:
        handle.write(f"{problem}\n")
    return target


def loud(message: str) -> str:
    """A message framed so it stands out in a training log."""
    bar = "!" * 100
    return f"\n{bar}\n{message}\n{bar}"
