"""Decode workers of the preprocessing job that can neither hang the job nor lose a record.

Each worker is a forked process with its own pipe and at most one record in flight (so a send never waits on a
worker that is itself waiting to send). The parent waits on the result pipes and the process sentinels with a
deadline: a worker that dies (the OOM killer, a crashing decoder) or runs past ``--worker-timeout`` on one record
is terminated and replaced by a fresh worker, which retries that record once. A record that fails twice is
rejected as ``worker_crash`` or ``timeout``; these reasons are *retryable*: the chunk holding one is written but
not committed as final, so the next run with the same arguments redoes it (``docs/design.md#workers``).
:meth:`WorkerPool.close` always terminates the workers; it never only joins them.
"""
from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import time
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Union

from libra_megatron.data.preprocess_worker import (
    Prepared,
    PrepareSettings,
    init_worker,
    prepare_in_worker,
    prepare_record,
)
from libra_megatron.data.records import RawRecord
from libra_megatron.data.rejects import RETRYABLE_REASONS, Rejected

__all__ = ["WorkerPool", "ordered_results", "RETRYABLE_REASONS"]

Result = Union[Prepared, Rejected]


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the job dies (a SIGKILLed job must not leave workers behind)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the job died before the request took effect
        os._exit(1)


def _worker_main(connection, settings: PrepareSettings, inherited: List, parent_pid: int) -> None:
    """Loop of one worker: receive ``(seq, record)``, send ``(seq, result)``; ``None`` ends it. The job's ends of
    every pipe are closed here, so the worker also sees end-of-file when the job is gone."""
    for other in inherited:
        other.close()
    _die_with_parent(parent_pid)
    init_worker(settings)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        seq, record = message
        connection.send((seq, prepare_in_worker(record)))


@dataclass
class _Task:
    seq: int
    record: RawRecord
    attempts: int = 0  # sends that reached a live worker
    lost_sends: int = 0  # sends to a worker that was already gone (bounded: workers that die before any work)


class _Worker:
    """One process, its pipe, and the task it is working on (if any) with its deadline."""

    def __init__(self, context, settings: PrepareSettings, others: List["_Worker"]):
        self.connection, child = context.Pipe(duplex=True)
        inherited = [self.connection] + [w.connection for w in others]
        self.process = context.Process(target=_worker_main, args=(child, settings, inherited, os.getpid()),
                                       daemon=True)
        self.process.start()
        child.close()
        self.task: Optional[_Task] = None
        self.deadline = float("inf")

    def assign(self, task: _Task, timeout: float) -> bool:
        """Send ``task``; ``False`` when the worker is already gone (then it is no attempt: the record never
        reached a worker, so it cannot have crashed one)."""
        self.task, self.deadline = task, time.monotonic() + timeout
        try:
            self.connection.send((task.seq, task.record))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            task.lost_sends += 1
            return False
        task.attempts += 1
        return True

    def stop(self) -> None:
        """Terminate (then kill) the process and close the pipe."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=2)
            if self.process.is_alive():
                self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


class WorkerPool:
    """``processes`` decode workers with crash/timeout recovery (see the module docstring)."""

    def __init__(self, processes: int, settings: PrepareSettings, timeout_s: float):
        if processes <= 0 or timeout_s <= 0:
            raise ValueError(f"need processes > 0 and --worker-timeout > 0, got {processes}, {timeout_s}")
        self.context = multiprocessing.get_context("fork")
        self.settings, self.timeout = settings, timeout_s
        self.workers: List[_Worker] = []
        for _ in range(processes):
            self.workers.append(_Worker(self.context, settings, self.workers))
        self.replaced = 0  # workers replaced after a crash or timeout (for the summary)

    def close(self) -> None:
        """Terminate every worker (the pool is never only joined: a stuck worker cannot hold the job)."""
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        fresh = _Worker(self.context, self.settings, [w for w in self.workers if w is not worker])
        self.workers[self.workers.index(worker)] = fresh
        self.replaced += 1
        return fresh

    def _failed(self, worker: _Worker, reason: str, detail: str, retry: Deque[_Task],
                results: Dict[int, Result]) -> None:
        """A worker died or timed out on its task: replace it; retry the task once, then reject it."""
        task = worker.task
        fresh = self._replace(worker)
        if task is None:
            return
        if task.attempts < 2 and task.lost_sends < 3:
            if not fresh.assign(task, self.timeout):
                fresh.task = None  # queued again; the next dispatch finds the fresh worker gone and replaces it
                retry.appendleft(task)
            return
        record = task.record
        results[task.seq] = Rejected(record.source, record.key, reason,
                                     f"{detail} (twice, in two fresh workers); a rerun retries this record")

    def run(self, tasks: Deque[_Task], results: Dict[int, Result]) -> None:
        """Dispatch queued ``tasks`` to idle workers and wait until at least one result (or failure) arrives."""
        retry: Deque[_Task] = collections.deque()
        for worker in list(self.workers):
            if worker.task is None and (retry or tasks):
                task = (retry or tasks).popleft()
                if not worker.assign(task, self.timeout):
                    self._failed(worker, "worker_crash", "the worker exited", retry, results)
        tasks.extendleft(reversed(retry))
        busy = [w for w in self.workers if w.task is not None]
        if not busy:
            return
        wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        handles = {w.connection: w for w in busy}
        handles.update({w.process.sentinel: w for w in busy})
        ready = multiprocessing.connection.wait(list(handles), timeout=wait_s)
        for worker in {id(handles[h]): handles[h] for h in ready}.values():
            if worker.task is None or worker not in self.workers:
                continue
            try:
                message = worker.connection.recv() if worker.connection.poll() else None
            except (EOFError, OSError):  # the pipe closed: the worker is gone
                message = None
            if message is not None:
                seq, result = message
                results[seq] = result
                worker.task, worker.deadline = None, float("inf")
            elif not worker.process.is_alive() or worker.process.exitcode is not None:
                worker.process.join(timeout=1)
                code = worker.process.exitcode
                self._failed(worker, "worker_crash", f"the decode worker died (exit code {code})", retry, results)
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.task is not None and worker.deadline <= now:
                self._failed(worker, "timeout", f"no result within --worker-timeout {self.timeout:g} s", retry,
                             results)
        tasks.extendleft(reversed(retry))


def ordered_results(items: Iterable[Union[RawRecord, Rejected]], pool: Optional[WorkerPool], window: int,
                    inline: PrepareSettings) -> Iterator[Result]:
    """Prepare records in input order, with at most ``window`` records read ahead (bounded memory)."""
    if pool is None:
        for item in items:
            yield item if isinstance(item, Rejected) else prepare_record(item, inline)
        return
    order: Deque[int] = collections.deque()
    tasks: Deque[_Task] = collections.deque()
    results: Dict[int, Result] = {}
    source = iter(items)
    exhausted, seq = False, 0
    while True:
        while not exhausted and len(order) < window:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                break
            order.append(seq)
            if isinstance(item, Rejected):
                results[seq] = item
            else:
                tasks.append(_Task(seq, item))
            seq += 1
        while order and order[0] in results:
            yield results.pop(order.popleft())
        if not order:
            if exhausted:
                return
            continue
        pool.run(tasks, results)
