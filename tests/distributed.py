"""Run a test body on N gloo ranks with megatron-core's parallel state set up and torn down.

    results = run_on_ranks(fn, world_size=4, tp=2, pp=2, args=(...))   # one return value per rank

``fn`` must be a module-level (picklable) function. Workers are spawned once per world size and reused
by later calls (``import megatron.core`` costs 2-5 s per process on 2 cores), each call doing
``initialize_model_parallel(tp, pp, ...)`` before ``fn`` and ``destroy_model_parallel()`` after it. A
failure on any rank fails the call with that rank's traceback; a rank that does not answer within
``timeout`` seconds fails it too. After a failure or hang the pool is killed and respawned on next use,
so one broken test cannot poison the next.

The process group uses a FileStore in a fresh temporary folder: no ports to collide.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

DEFAULT_TIMEOUT_S = 300.0


class RankFailure(AssertionError):
    """A rank raised, hung or died; the message holds each failing rank's traceback."""


def _worker_main(rank: int, world_size: int, store_path: str, jobs: "mp.Queue", results: "mp.Queue") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from libra_megatron.utils.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, fn, args, kwargs, parallel = job
        seed = parallel.pop("seed")
        try:
            parallel_state.initialize_model_parallel(**parallel)
            model_parallel_cuda_manual_seed(seed)
            torch.manual_seed(seed)
            value = fn(*args, **kwargs)
            results.put((job_id, rank, True, value))
        except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
            results.put((job_id, rank, False, traceback.format_exc()))
        finally:
            parallel_state.destroy_model_parallel()
            _destroy_subgroups()
            _reset_megatron_globals()
    # no dist.destroy_process_group(): tearing down the gloo mesh waits on the other ranks' exits (seconds per pool);
    # the process ends here and the OS closes its sockets
    os._exit(0)


def _destroy_subgroups() -> None:
    """Destroy every process group except WORLD.

    ``destroy_model_parallel()`` only drops megatron's handles; the gloo groups behind them keep their
    transport threads (about 60 per job at TP=2, PP=2 on 8 ranks). In a reused worker those pile up into
    thousands of threads and slow every later collective, so each job's groups are destroyed here.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    world = dist.group.WORLD
    for group in list(c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)


def _reset_megatron_globals() -> None:
    """Clear megatron-core process-wide state that outlives destroy_model_parallel."""
    from megatron.core import num_microbatches_calculator
    from megatron.core.tensor_parallel import random as megatron_random

    num_microbatches_calculator.destroy_num_microbatches_calculator()
    megatron_random.get_cuda_rng_tracker().reset()


class RankPool:
    """``world_size`` spawned worker processes sharing one gloo process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="libra_ranks_")
        self._results = self._ctx.Queue()
        self._jobs = [self._ctx.Queue() for _ in range(world_size)]
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(r, world_size, os.path.join(self._tmp, "store"), self._jobs[r], self._results),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._next_job = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, args: Sequence, kwargs: Dict, parallel: Dict, timeout: float) -> List[Any]:
        job_id = self._next_job
        self._next_job += 1
        for q in self._jobs:
            q.put((job_id, fn, tuple(args), dict(kwargs), dict(parallel)))
        values: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(values) + len(errors) < self.world_size:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values and r not in errors]
            for r in dead:
                errors[r] = f"rank {r} died (exit code {self._procs[r].exitcode})"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for r in range(self.world_size):
                    if r not in values and r not in errors:
                        errors[r] = f"rank {r} did not finish in time (hang, deadlock or waiting on a failed rank; timeout {timeout:.0f} s)"
                break
            try:
                got_id, rank, ok, payload = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if got_id != job_id:
                continue
            (values if ok else errors)[rank] = payload
            if not ok:  # the other ranks are probably blocked in a collective with it: short grace only
                deadline = min(deadline, time.monotonic() + 5.0)
        if errors:
            self.close()
            report = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
            raise RankFailure(f"{getattr(fn, '__name__', fn)} failed on {len(errors)} rank(s):\n{report}")
        return [values[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 2.0  # one grace period for the whole pool, then kill
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        shutil.rmtree(self._tmp, ignore_errors=True)


_POOLS: Dict[int, RankPool] = {}


def run_on_ranks(
    fn: Callable,
    world_size: int = 2,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    args: Sequence = (),
    kwargs: Optional[Dict] = None,
    seed: int = 1234,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks with TP=tp, PP=pp (DP = the rest).

    Returns the list of per-rank return values (rank order). Raises :class:`RankFailure` with the
    tracebacks of failing ranks, or on a timeout.
    """
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world_size={world_size} is not divisible by tp*pp={tp * pp}")
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = RankPool(world_size)
    parallel = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        seed=seed,
    )
    try:
        return pool.run(fn, args, kwargs or {}, parallel, timeout)
    except RankFailure:
        _POOLS.pop(world_size, None)
        raise


def shutdown_pools() -> None:
    """Stop every worker pool (called at interpreter exit and at the end of the pytest session)."""
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
