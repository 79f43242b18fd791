"""Training checkpoints on megatron-core ``dist_checkpointing`` (torch_dist): atomic, pruned, resumable, reshardable.

Layout of ``--save``::

    iter_0000200/                    one finished checkpoint (torch DCP files + metadata.json)
    iter_0000400.partial/            a save in progress (or killed): never loaded, removed by the next save
    latest_checkpointed_iteration.txt   the newest finished iteration, replaced atomically after the rename

A save writes into ``iter_N.partial`` on every rank, waits for all ranks, then rank 0 renames it to ``iter_N`` and
only then rewrites the marker (write-to-temp + fsync + ``os.replace``). A kill at any point leaves the previous
marker pointing at a complete checkpoint. With ``--keep-last-checkpoints K`` older ``iter_*`` folders are deleted
after the marker moved.

What a checkpoint holds: the model chunks (global keys, so TP/PP/DP may change on load), the optimizer (the
distributed optimizer in the ``fully_reshardable`` format, so its state reshards too), the LR scheduler, the
iteration, the consumed-sample count (the data position) and the RNG states of every (PP, TP, DP) rank (restored
only when the layout is unchanged, as in Megatron-LM). These are our own artefacts: dist_checkpointing stores the
non-tensor parts as pickles, so load checkpoints you trust; untrusted weights come in through safetensors
(``tools/convert_checkpoint.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from libra_megatron.utils.megatron_compat import ensure_adam_state, load_optimizer_state, use_in_process_write_queue

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
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


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


def latest_checkpoint(root: str) -> Optional[str]:
    """The folder the marker names; if the marker is missing, the newest finished ``iter_*`` folder; else None."""
    if root is None or not os.path.isdir(root):
        return None
    tracker = os.path.join(root, TRACKER_FILENAME)
    if os.path.isfile(tracker):
        with open(tracker) as handle:
            text = handle.read().strip()
        if not text.isdigit():
            raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
        path = checkpoint_dir(root, int(text))
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise FileNotFoundError(f"{tracker} names iteration {text} but {path} is missing or incomplete")
        return path
    iterations = finished_iterations(root)
    return checkpoint_dir(root, iterations[-1]) if iterations else None


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
    dist_checkpointing.save(state, staging, content_metadata=content)
    if rank == 0:
        _write_atomic(os.path.join(staging, RUN_CONFIG_FILE), json.dumps(_args_summary(args), indent=1, sort_keys=True))
    if args.overlap_param_gather:
        for chunk in model:
            chunk.enable_forward_pre_hook()
    _barrier()
    if rank == 0:
        if os.path.exists(final):  # an older save of the same iteration (e.g. re-run after a resume)
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, TRACKER_FILENAME), f"{iteration}\n")
        _prune(root, args.keep_last_checkpoints, keep=iteration)
    _barrier()
    return final


def _prune(root: str, keep_last: Optional[int], keep: int) -> None:
    for name in os.listdir(root):  # leftovers of killed saves (the current save was renamed already)
        if name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last is None:
        return
    iterations = [i for i in finished_iterations(root) if i != keep]
    for iteration in iterations[: max(0, len(iterations) - (keep_last - 1))]:
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
