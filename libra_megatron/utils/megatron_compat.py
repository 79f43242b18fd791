"""Every workaround for a megatron-core defect libra-megatron depends on, in one place, gated on the installed version.

Each :class:`Defect` says what is wrong upstream, since which version, and (once known) the first version that
fixes it; its workaround runs only while the installed megatron-core is affected. Each has a test in
``tests/utils/test_megatron_compat.py`` that reproduces the defect on the *unpatched* upstream code, so when a new
megatron-core fixes one, that test fails and says which ``fixed_in`` to fill in (and which workaround to delete).

Running megatron-core on a CPU-only torch is a different matter (no defect, just hard-wired CUDA calls): that is
``libra_megatron/utils/cpu.py``, the one CPU shim.
"""
from __future__ import annotations

import functools
import importlib.metadata
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from packaging.version import Version

VERIFIED_ON = "0.19.2"  # the megatron-core release every defect below was reproduced on


@dataclass(frozen=True)
class Defect:
    """One upstream defect and the range of megatron-core versions the workaround applies to."""

    name: str
    summary: str
    affected_since: str
    fixed_in: Optional[str] = None  # None: not fixed upstream as of VERIFIED_ON

    def active(self, version: Optional[Version] = None) -> bool:
        """Whether ``version`` (default: the installed megatron-core) needs the workaround."""
        version = installed_version() if version is None else version
        release = Version(version.base_version)
        return release >= Version(self.affected_since) and (self.fixed_in is None or release < Version(self.fixed_in))


DEFECTS: Dict[str, Defect] = {d.name: d for d in (
    Defect("manager_write_queue",
           "dist_checkpointing's filesystem writer gets its results queue from multiprocessing.Manager(), which "
           "starts a server process per rank and cannot start inside a daemonic process",
           affected_since="0.12.0"),
    Defect("adam_step_on_fresh_optimizer",
           "DistributedOptimizer.state_dict() without TE/Apex asserts one common Adam 'step' across the optimizer "
           "state, so an optimizer that has not stepped yet cannot be saved or used as a load target",
           affected_since="0.12.0"),
    Defect("distopt_load_step",
           "DistributedOptimizer loading without TE/Apex: the fully-reshardable path looks up a 'step' tensor the "
           "checkpoint never has (KeyError), copies into main params that require grad outside no_grad, and "
           "load_state_dict gives every parameter the same 'step' tensor, which torch's AdamW then increments once "
           "per parameter per step",
           affected_since="0.12.0"),
    Defect("gloo_batched_p2p_same_peer",
           "interleaved pipeline schedule with PP=2 and batch_p2p_comm=True on gloo: previous and next stage are "
           "the same peer and the batched isend/irecv pair activations with gradients (wrong losses, no error)",
           affected_since="0.12.0"),
    Defect("writer_drops_write_error",
           "the threaded checkpoint writer turns a failed shard write into RuntimeError('... error: <class "
           "OSError>'): the writer's exception, and the errno that tells a full disk apart, are lost",
           affected_since="0.12.0"),
    Defect("import_time_fallback_notices",
           "importing megatron.core without Transformer Engine/Apex warns on every rank that it falls back to "
           "torch implementations (expected here: this project ships its own kernels)",
           affected_since="0.12.0"),
)}

# the messages megatron-core emits at import time when TE/Apex are absent (matched as regex prefixes)
FALLBACK_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "MimoModelConfig is experimental", "full scope is deprecated")


@functools.lru_cache(maxsize=None)
def installed_version() -> Version:
    """The installed megatron-core release (distribution metadata, not the git-suffixed package string)."""
    return Version(importlib.metadata.version("megatron-core"))


def active(name: str) -> bool:
    """Whether the workaround for defect ``name`` applies to the installed megatron-core."""
    return DEFECTS[name].active()


# -- dist_checkpointing ------------------------------------------------------------------------------------------
def use_in_process_write_queue() -> None:
    """Give dist_checkpointing's writer a plain ``queue.Queue`` for its results (defect ``manager_write_queue``).

    Our saves are synchronous (megatron runs the writer threads in this process), so an in-process queue carries
    the results as well, and needs no server process."""
    if not active("manager_write_queue"):
        return
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


_SHARD_WRITE_ERRORS: List[BaseException] = []


def record_shard_write_errors() -> None:
    """While defect ``writer_drops_write_error`` is present, keep each shard writer's own exception for
    :func:`take_shard_write_errors` (``FileSystemWriterAsync.write_preloaded_data`` wrapped once per process, its
    signature kept: megatron inspects it)."""
    if not active("writer_drops_write_error"):
        return
    import functools

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data
    if getattr(original, "libra_records_errors", False):
        return

    @functools.wraps(original)
    def write_preloaded_data(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], BaseException):
            _SHARD_WRITE_ERRORS.append(output[1])
        return output

    write_preloaded_data.libra_records_errors = True
    FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)


def take_shard_write_errors() -> List[BaseException]:
    """The shard writers' exceptions recorded since the last call (and forget them)."""
    errors = list(_SHARD_WRITE_ERRORS)
    _SHARD_WRITE_ERRORS.clear()
    return errors


# -- the distributed optimizer on torch's AdamW ------------------------------------------------------------------
def _inner_torch_optimizers(optimizer: Any) -> List[Any]:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [sub for sub in subs if getattr(sub, "optimizer", None) is not None]


def _adam_step(group: Dict[str, Any], param: torch.Tensor, value: float) -> torch.Tensor:
    """A ``step`` tensor where torch's Adam keeps it: on the parameter's device for the fused and capturable
    implementations (``_fused_adamw_`` refuses a CPU step for CUDA parameters), a CPU scalar otherwise."""
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return torch.tensor(value, dtype=torch.float32, device=param.device if on_device else "cpu")


def ensure_adam_state(optimizer: Any) -> None:
    """Give every parameter of the torch optimizers inside a Megatron optimizer its Adam state (zeros, step 0) if
    it has none yet, exactly what torch creates on the first step (defect ``adam_step_on_fresh_optimizer``)."""
    if not active("adam_step_on_fresh_optimizer"):
        return
    for sub in _inner_torch_optimizers(optimizer):
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                if "step" not in state:
                    state["step"] = _adam_step(group, param, 0.0)


def load_optimizer_state(optimizer: Any, state_dict: Any) -> None:
    """``optimizer.load_state_dict(state_dict)``, plus, while defect ``distopt_load_step`` is present, for each
    DistributedOptimizer inside it:

    1. the load runs under ``no_grad`` (it copies into main params that require grad);
    2. the loader is handed the current ``step`` tensor it looks up and the checkpoint does not hold;
    3. afterwards each parameter gets its *own* ``step`` tensor, valued as the checkpoint's param groups say.

    The loader is wrapped per optimizer instance for the duration of the call only (no class is patched).
    """
    if not active("distopt_load_step"):
        optimizer.load_state_dict(state_dict)
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    wrapped = []
    for sub in _inner_torch_optimizers(optimizer):
        if isinstance(sub, DistributedOptimizer):
            original = sub._set_main_param_and_optimizer_states

            def with_step(model_param: Any, tensors: Dict[str, Any], _sub: Any = sub, _original: Any = original):
                group_index, group_order = _sub.model_param_group_index_map[model_param]
                main_param = _sub.optimizer.param_groups[group_index]["params"][group_order]
                step = _sub.optimizer.state[main_param].get("step")
                if isinstance(step, torch.Tensor) and "step" not in tensors:
                    tensors = dict(tensors, step=step)
                return _original(model_param, tensors)

            sub._set_main_param_and_optimizer_states = with_step
            wrapped.append(sub)
    try:
        with torch.no_grad():
            optimizer.load_state_dict(state_dict)
    finally:
        for sub in wrapped:
            del sub._set_main_param_and_optimizer_states  # the instance attribute goes; the class method is back
    for sub in wrapped:
        for group in sub.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = sub.optimizer.state[param]
                if "step" in state:
                    state["step"] = _adam_step(group, param, float(group["step"]))


# -- pipeline schedules ------------------------------------------------------------------------------------------
def batch_p2p_comm_is_safe(pipeline_size: int, virtual_pipeline_size: Optional[int], backend: str) -> bool:
    """Whether the schedules may batch their p2p ops (``TransformerConfig.batch_p2p_comm``) for this layout
    (defect ``gloo_batched_p2p_same_peer``: not with the interleaved schedule at PP=2 on gloo)."""
    return not (active("gloo_batched_p2p_same_peer") and virtual_pipeline_size is not None
                and pipeline_size == 2 and backend == "gloo")


# -- import-time notices -----------------------------------------------------------------------------------------
def silence_fallback_notices() -> None:
    """Drop megatron-core's import-time TE/Apex fallback warnings (defect ``import_time_fallback_notices``); the
    README says once what the fallbacks mean for this project."""
    if not active("import_time_fallback_notices"):
        return
    for message in FALLBACK_NOTICES:
        warnings.filterwarnings("ignore", message=message)
