"""Training checkpoints on megatron-core ``dist_checkpointing`` (torch_dist): atomic, pruned, resumable, reshardable.

Layout of ``--save``::

    iter_0000200/                    one finished checkpoint (torch DCP files + metadata.json)
    iter_0000400.partial/            a save in progress (or killed): never loaded, removed by the next save
    latest_checkpointed_iteration.txt   the newest finished iteration, replaced atomically after the rename

A save writes into ``iter_N.partial`` on every rank, waits for all ranks, then rank 0 renames it to ``iter_N`` and
only then rewrites the marker (write-to-temp + fsync + ``os.replace``). A kill at any point leaves the previous
marker pointing at a complete checkpoint. With ``--keep-last-checkpoints K`` older ``iter_*`` folders are deleted
after the marker moved; only complete ones count and are deleted, so the cleanup never removes the newest complete
checkpoint behind a broken one. A save that fails (a full disk: ``ENOSPC``) fails on every rank with one clear
error and leaves the previous checkpoint and the marker untouched.

At load, the newest checkpoint is checked first (:mod:`libra_megatron.training.checkpoint_integrity`): one with a
truncated or missing shard is set aside as ``iter_N.broken`` (never used, never deleted) and training falls back,
loudly, to the newest complete older checkpoint.

What a checkpoint holds: the model chunks (global keys, so TP/PP/DP may change on load), the optimizer (the
distributed optimizer in the ``fully_reshardable`` format, so its state reshards too), the LR scheduler, the
iteration, the consumed-sample count (the data position) and the RNG states of every (PP, TP, DP) rank (restored
only when the layout is unchanged, as in Megatron-LM). These are our own artefacts: dist_checkpointing stores the
non-tensor parts as pickles, so load checkpoints you trust; untrusted weights come in through safetensors
(``tools/convert_checkpoint.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from libra_megatron.training.checkpoint_integrity import checkpoint_problem, loud, set_aside_broken
from libra_megatron.utils.megatron_compat import (
    ensure_adam_state,
    load_optimizer_state,
    record_shard_write_errors,
    take_shard_write_errors,
    use_in_process_write_queue,
)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "run_config.json"  # the run's validated flags as plain JSON (e.g. the model architecture)
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


@dataclass
class ResumeState:
    """What the loop continues from."""

    iteration: int = 0
    consumed_samples: int = 0
    loaded_from: Optional[str] = None


def checkpoint_dir(root: str, iteration: int) -> str:
    """``root/iter_0000123``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(folder)


def finished_iterations(root: str) -> List[int]:
    """Iterations with a finished (renamed) checkpoint folder in ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, "metadata.json")):
            found.append(int(match.group(1)))
    return sorted(found)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _warn(message: str) -> None:
    import sys

    print(loud(message), file=sys.stderr, flush=True)


def latest_checkpoint(root: str, repair: bool = False) -> Optional[str]:
    """The newest *complete* checkpoint in ``root``: the one the marker names (or, without a marker, the newest
    finished ``iter_*``), else the newest complete older one; ``None`` when ``root`` holds none. Raises when
    checkpoints exist but none is complete.

    Read-only unless ``repair``: only the trainer resuming from its own ``--load`` root repairs, and then -- loudly --
    rank 0 sets a broken checkpoint (truncated or missing shard) aside as ``iter_N.broken`` (never used or deleted)
    and moves the marker to the fallback. Looking a checkpoint up for its architecture, a dry run, a
    ``--pretrained-checkpoint`` or a conversion never changes the folder."""
    if root is None or not os.path.isdir(root):
        return None
    tracker = os.path.join(root, TRACKER_FILENAME)
    iterations = finished_iterations(root)
    newest: Optional[int] = None
    if os.path.isfile(tracker):
        with open(tracker) as handle:
            text = handle.read().strip()
        if not text.isdigit():
            raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
        newest = int(text)
    elif iterations:
        newest = iterations[-1]
    if newest is None:
        return None
    candidates = [newest] + [i for i in reversed(iterations) if i < newest]
    problems: List[str] = []
    for iteration in candidates:
        path = checkpoint_dir(root, iteration)
        problem = checkpoint_problem(path) if os.path.isdir(path) else "the folder is missing"
        if problem is None:
            if problems and repair:
                if _rank() == 0:
                    _write_atomic(tracker, f"{iteration}\n")
                _warn("CHECKPOINT FALLBACK: " + "; ".join(problems) + f". Resuming from the previous complete "
                      f"checkpoint {path} instead (the broken one is kept, renamed *.broken, for inspection).")
            return path
        problems.append(f"{path} is BROKEN: {problem}")
        if repair and _rank() == 0 and os.path.isdir(path):
            try:
                set_aside_broken(path, problem)
            except OSError:
                pass  # another process set it aside already
    raise RuntimeError(f"no complete checkpoint in {root}: " + "; ".join(problems))


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1}


def _rng_state_object() -> Any:
    """This rank's RNG states as a ShardedObject of the (PP, TP, DP) grid (one entry per rank, no replicas)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }
    layout = _layout()
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), offset, replica_id=0)


def _restore_rng(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _sharding_metadata(args: argparse.Namespace) -> Dict[str, Any]:
    from megatron.core import parallel_state as ps

    metadata: Dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                                "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if args.use_distributed_optimizer:
        fully = args.dist_ckpt_optim_fully_reshardable
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully else "dp_reshardable"
        # gather the model-space optimizer state on DP rank 0 over gloo, not on every rank over NCCL
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


def _model_state(model: List[torch.nn.Module], metadata: Dict[str, Any]) -> Dict[str, Any]:
    from libra_megatron.training.model_family import unwrap_model

    if len(model) == 1:
        return {"model": unwrap_model(model[0]).sharded_state_dict(metadata=metadata)}
    return {f"model{i}": unwrap_model(chunk).sharded_state_dict(metadata=metadata) for i, chunk in enumerate(model)}


def _args_summary(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags as plain values (no Namespace pickled into the checkpoint)."""
    plain = (bool, int, float, str, type(None))
    # lists as plain lists: dist_checkpointing rewrites list items in place, which a frozen RunConfig list refuses
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))}


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model: List[torch.nn.Module],
                    optimizer: Any, scheduler: Any, args: argparse.Namespace) -> str:
    """Write ``root/iter_<iteration>`` atomically on all ranks, move the marker, prune; returns the folder."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(root, iteration)
    staging = final + PARTIAL_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    if args.overlap_param_gather:  # make the model weights current before reading them
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
    metadata = _sharding_metadata(args)
    state = _model_state(model, metadata)
    if optimizer is not None and not args.no_save_optim:
        ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=metadata)
    state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_state_object()
    state.update(iteration=iteration, consumed_samples=consumed_samples, layout=_layout(),
                 checkpoint_version=CHECKPOINT_VERSION, args=_args_summary(args),
                 has_optimizer=optimizer is not None and not args.no_save_optim)
    content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
    use_in_process_write_queue()
    failure: Optional[BaseException] = None
    take_shard_write_errors()  # forget any earlier save's
    record_shard_write_errors()
    try:
        dist_checkpointing.save(state, staging, content_metadata=content)
        if rank == 0:
            _write_atomic(os.path.join(staging, RUN_CONFIG_FILE),
                          json.dumps(_args_summary(args), indent=1, sort_keys=True))
    except (Exception, BaseException) as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        failure = exc  # every rank must learn of it (below) before anyone raises
    if args.overlap_param_gather:
        for chunk in model:
            chunk.enable_forward_pre_hook()
    _agree_on_save(failure, root, staging, iteration)
    if rank == 0:
        if os.path.exists(final):  # an older save of the same iteration (e.g. re-run after a resume)
            problem = checkpoint_problem(final)
            if problem is None:  # moved aside first and deleted after the swap: a kill never leaves no folder
                replaced = final + ".replaced" + PARTIAL_SUFFIX
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            else:
                _warn(f"{final} is BROKEN ({problem}): set aside as *.broken before saving iteration {iteration}")
                set_aside_broken(final, problem)
        os.rename(staging, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")
        _prune(root, args.keep_last_checkpoints, keep=iteration)
    _barrier()
    return final


def _root_cause(failure: Optional[BaseException]) -> Optional[BaseException]:
    """The writer's own exception if one was recorded, else the innermost exception of the chain."""
    recorded = take_shard_write_errors()
    if recorded:
        return recorded[0]
    seen = failure
    while seen is not None:
        inner = seen.__cause__ or seen.__context__
        if inner is None or inner is seen:
            return seen
        seen = inner
    return None


def _agree_on_save(failure: Optional[BaseException], root: str, staging: str, iteration: int) -> None:
    """All ranks learn whether any rank failed to write its part; if so every rank raises one clear error, the
    staging folder is removed and the marker (and the previous checkpoint) stay as they were."""
    import torch.distributed as dist

    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    cause = _root_cause(failure) if failure is not None else None
    take_shard_write_errors()
    full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    what = ("the disk is full (no space left on device)" if full else
            f"{type(cause).__name__}: {cause}" if cause is not None else "another rank failed to write its part")
    previous = None
    tracker = os.path.join(root, TRACKER_FILENAME)
    if os.path.isfile(tracker):
        with open(tracker) as handle:
            text = handle.read().strip()
        previous = checkpoint_dir(root, int(text)) if text.isdigit() else None
    raise RuntimeError(f"saving checkpoint iteration {iteration} into {root} failed: {what}. Nothing was committed: "
                       + (f"the previous checkpoint {previous} is intact and will be resumed from" if previous else
                          "no earlier checkpoint exists") + ("; free space and restart" if full else "")) from failure


def _prune(root: str, keep_last: Optional[int], keep: int) -> None:
    """Remove killed saves' leftovers (and a replaced copy of the iteration just saved), then all but the newest
    ``keep_last`` *complete* checkpoints up to ``keep``, the one just saved, included. Broken folders are never
    deleted (nor counted); nor are checkpoints newer than ``keep`` (a run rolled back with ``--ckpt-step``: they are
    another branch of the run, left for the user)."""
    for name in os.listdir(root):  # leftovers of killed saves (the current save was renamed already)
        if name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last is None:
        return
    complete = [i for i in finished_iterations(root) if i < keep
                and checkpoint_problem(checkpoint_dir(root, i)) is None]
    for iteration in complete[: max(0, len(complete) - (keep_last - 1))]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def _check_optimizer_compatible(path: str, metadata: Dict[str, Any], saved: Dict[str, int], now: Dict[str, int],
                                args: argparse.Namespace) -> None:
    saved_distributed = "distrib_optim_sharding_type" in metadata
    if saved_distributed != bool(args.use_distributed_optimizer):
        raise ValueError(f"{path}: the optimizer was saved {'with' if saved_distributed else 'without'} "
                         "--use-distributed-optimizer; use the same setting, or pass --no-load-optim")
    model_parallel_changed = (saved.get("tp"), saved.get("pp"), saved.get("vpp", 1)) != (now["tp"], now["pp"],
                                                                                            now["vpp"])
    if saved_distributed and model_parallel_changed and metadata["distrib_optim_sharding_type"] == "dp_reshardable":
        raise ValueError(
            f"{path}: saved at TP={saved.get('tp')} PP={saved.get('pp')} VPP={saved.get('vpp', 1)}, loading at "
            f"TP={now['tp']} PP={now['pp']} VPP={now['vpp']}: its distributed-optimizer state reshards only over DP. "
            "Save with --dist-ckpt-optim-fully-reshardable to change TP/PP, or pass --no-load-optim")


def load_checkpoint(path: str, model: List[torch.nn.Module], optimizer: Any, scheduler: Any,
                    args: argparse.Namespace, weights_only: bool = False) -> ResumeState:
    """Load ``path`` into the current layout (any TP/PP/DP). ``weights_only`` (finetune / pretrained start):
    model only, iteration 0. RNG states are restored only when the (PP, TP, DP) grid is unchanged."""
    from megatron.core import dist_checkpointing

    from libra_megatron.training.distributed import print_rank_0
    from libra_megatron.training.model_family import unwrap_model

    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is incomplete: {problem}")
    common = dist_checkpointing.load_common_state_dict(path)
    saved_layout, layout = common.get("layout", {}), _layout()
    same_grid = all(saved_layout.get(k) == layout[k] for k in ("tp", "pp", "dp"))
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata = dict(metadata, dp_cp_group=_sharding_metadata(args)["dp_cp_group"])
    state = _model_state(model, metadata)
    load_optim = (not weights_only and not args.no_load_optim and optimizer is not None
                  and common.get("has_optimizer", True))
    if load_optim:
        _check_optimizer_compatible(path, metadata, saved_layout, layout, args)
    load_rng = not weights_only and not args.no_load_rng and same_grid
    if load_optim:
        ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata)
    if load_rng:
        state["rng_state"] = _rng_state_object()
    loaded = dist_checkpointing.load(state, path)
    for index, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{index}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if load_optim:
        load_optimizer_state(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # bf16: the fp32 main params start from the loaded weights
    if weights_only:
        print_rank_0(f"loaded model weights from {path} (fresh optimizer, iteration 0)")
        return ResumeState(0, 0, path)
    scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        _restore_rng(loaded["rng_state"])
    elif not same_grid:
        print_rank_0(f"layout changed {saved_layout} -> {_layout()}: RNG states not restored")
    print_rank_0(f"resumed from {path}: iteration {common['iteration']}, consumed samples "
                 f"{common['consumed_samples']}" + ("" if load_optim else " (optimizer state not loaded)"))
    return ResumeState(int(common["iteration"]), int(common["consumed_samples"]), path)
