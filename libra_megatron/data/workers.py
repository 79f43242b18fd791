"""Decode workers of the preprocessing job that can neither hang the job nor lose a record.

Each worker is a forked process with its own pipe and at most one record in flight (so a send never waits on a
worker that is itself waiting to send). The parent waits on the result pipes and the process sentinels with a
deadline: a worker that dies (the OOM killer, a crashing decoder) or runs past ``--worker-timeout`` on one record
is terminated and replaced by a fresh worker, which retries that record once. A record that fails twice is
rejected as ``worker_crash`` or ``timeout``; these reasons are *retryable*: the chunk holding one is written but
not committed as final, so the next run with the same arguments redoes it (``docs/design.md#workers``).
:meth:`WorkerPool.close` always terminates the workers; it never only joins them. :func:`ordered_results` drives
the pool from a dispatcher thread, so the workers keep decoding while the job's main thread tokenises images.
"""
from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import multiprocessing.connection
import os
import threading
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
        self._wake_reader, self._wake_writer = self.context.Pipe(duplex=False)  # interrupt() -> run() returns
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="preprocess-spawner")

    def close(self) -> None:
        """Terminate every worker (the pool is never only joined: a stuck worker cannot hold the job)."""
        for worker in self.workers:
            worker.stop()
        self.workers = []
        self._spawner.shutdown(wait=True)
        self._wake_reader.close()
        self._wake_writer.close()

    def busy(self) -> bool:
        """Whether any worker has a record in flight."""
        return any(w.task is not None for w in self.workers)

    def abandon_in_flight(self) -> None:
        """Replace every worker that still has a record: its late result must not reach the next caller, whose
        sequence numbers start again at 0."""
        for worker in list(self.workers):
            if worker.task is not None:
                self._replace(worker)

    def interrupt(self) -> None:
        """Make a :meth:`run` that is waiting on the workers (in another thread) return now."""
        self._wake_writer.send_bytes(b"")

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        # forked by the pool's own long-lived thread: a worker's PR_SET_PDEATHSIG fires when the *thread* that
        # forked it ends, and the dispatcher thread of ordered_results ends with every chunk
        others = [w for w in self.workers if w is not worker]
        fresh = self._spawner.submit(_Worker, self.context, self.settings, others).result()
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
        ready = multiprocessing.connection.wait(list(handles) + [self._wake_reader], timeout=wait_s)
        if self._wake_reader in ready:
            while self._wake_reader.poll():
                self._wake_reader.recv_bytes()
            ready = [h for h in ready if h is not self._wake_reader]
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
    """Prepare records in input order, with at most ``window`` records read ahead (bounded memory).

    With a pool, a dispatcher thread reads records and drives the workers while the caller consumes results (the
    job's image tokenizer runs between two results), so the workers are never idle for want of a dispatch."""
    if pool is None:
        for item in items:
            yield item if isinstance(item, Rejected) else prepare_record(item, inline)
        return
    dispatcher = _Dispatcher(items, pool, window)
    try:
        while True:
            result = dispatcher.next_result()
            if result is None:
                return
            yield result
    finally:
        dispatcher.stop()


class _Dispatcher:
    """Background thread: reads ``items`` up to ``window`` ahead of the consumer, feeds them to ``pool`` and collects
    the results; :meth:`next_result` hands them out in input order. Only this thread touches the pool while it runs;
    an exception it meets (a bad annotation file, say) is raised to the consumer."""

    def __init__(self, items: Iterable[Union[RawRecord, Rejected]], pool: WorkerPool, window: int) -> None:
        self.source, self.pool, self.window = iter(items), pool, window
        self.lock = threading.Condition()
        self.order: Deque[int] = collections.deque()  # read, not yet handed out (guarded by lock)
        self.results: Dict[int, Result] = {}  # guarded by lock
        self.exhausted = False
        self.error: Optional[BaseException] = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="preprocess-dispatcher", daemon=True)
        self.thread.start()

    def next_result(self) -> Optional[Result]:
        """The next result in input order (waits for it); ``None`` after the last one."""
        with self.lock:
            while True:
                if self.error is not None:
                    raise self.error
                if self.order and self.order[0] in self.results:
                    result = self.results.pop(self.order.popleft())
                    self.lock.notify_all()  # room in the window
                    return result
                if not self.order and self.exhausted:
                    return None
                self.lock.wait(timeout=1.0)

    def stop(self) -> None:
        """End the thread (the consumer is done or gone); records still in flight are abandoned with their workers."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.pool.interrupt()  # a wait on the workers returns at once
        self.thread.join()
        self.pool.abandon_in_flight()

    def _loop(self) -> None:
        tasks: Deque[_Task] = collections.deque()
        seq = 0
        try:
            while True:
                with self.lock:
                    while not self.stopping and len(self.order) >= self.window and not tasks and not self.pool.busy():
                        self.lock.wait(timeout=1.0)  # the consumer has the whole window: wait for room
                    if self.stopping:
                        return
                    room = self.window - len(self.order)
                read: List[Union[RawRecord, Rejected]] = []
                exhausted = self.exhausted
                while not exhausted and len(read) < room:
                    try:
                        read.append(next(self.source))
                    except StopIteration:
                        exhausted = True
                arrived: Dict[int, Result] = {}
                with self.lock:
                    self.exhausted = exhausted  # together with the last records: the consumer sees both or neither
                    for item in read:
                        self.order.append(seq)
                        if isinstance(item, Rejected):
                            arrived[seq] = item
                        else:
                            tasks.append(_Task(seq, item))
                        seq += 1
                if not tasks and not self.pool.busy():
                    with self.lock:
                        self.results.update(arrived)
                        self.lock.notify_all()
                        if exhausted:
                            return
                    continue
                self.pool.run(tasks, arrived)
                with self.lock:
                    self.results.update(arrived)
                    self.lock.notify_all()
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            with self.lock:
                self.error = error
                self.lock.notify_all()
