"""The queue's workers and watchdog: each worker takes the next job in turn (with the jobs
that may share its pass), runs it by its deadline and ends it; the watchdog gives up on a run
past its deadline and starts a worker in its place. A mixin of
:class:`~torchsurgeon.remote.jobs.JobQueue`, whose state and lock it shares; see that module
for the rules.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from torchsurgeon.layers.guards import cancelled_by
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.job import JobError, JobRecord
from torchsurgeon.remote.progress import reporting_to
from torchsurgeon.remote.worker import OVERRUN_FIELD, RUN_ALONE

__all__ = ["WORK_RATIO", "Dispatcher"]

WORK_RATIO = 2.0
"""Jobs share a merged pass only with jobs whose estimated work is within this factor of
the batch's first: a slow plan waits for nobody's fast one, nor makes it wait."""


class Dispatcher:
    """Workers and the watchdog of a :class:`~torchsurgeon.remote.jobs.JobQueue`."""

    limits: Any
    store: Any
    batch_sizes: Counter[int]
    _batcher: Callable[[list[Any], float], list[tuple[bytes | None, Any]]] | None
    _workers: int
    _per_key: int
    _jobs: dict[str, JobRecord]
    _queues: dict[str, deque[JobRecord]]
    _turns: deque[str]
    _running: Counter[str]
    _overruns: dict[str, deque[float]]
    _lock: threading.Condition
    _active: set[threading.Thread]
    _abandoned: set[threading.Thread]
    _stopping: bool
    _closed: bool
    _spawned: int
    _next_sweep: float

    # ----------------------------------------------------------------- workers

    def _spawn(self) -> None:
        """Start workers up to ``workers``, while abandoned threads leave room. Holds the lock."""
        room = self._workers + self.limits.max_abandoned_runs - len(self._abandoned)
        while len(self._active) < min(self._workers, room) and not self._stopping:
            self._spawned += 1
            thread = threading.Thread(
                target=self._work, name=f"torchsurgeon-worker-{self._spawned}", daemon=True
            )
            self._active.add(thread)
            thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                job = None
                while not self._stopping and me in self._active:
                    job = self._take()
                    if job is not None:
                        break
                    self._lock.wait()
                if job is None:
                    self._active.discard(me)
                    return
                batch = self._batch_of(job)
                for member in batch:
                    self._begin(member, me)
                self.batch_sizes[len(batch)] += 1
            if len(batch) > 1:
                if self._run_batch(batch, me):
                    return  # the watchdog gave up on this worker: a replacement runs
                continue
            report = reporting_to(lambda progress, job=job: self._progress(job, progress))
            with report, cancelled_by(job.cancel):
                result, error = _run(job.work, job.deadline)
            abandoned = self._finish(job, result, error, me)
            del result, error
            if abandoned:
                self._replace(me)
                return

    def _batch_of(self, job: JobRecord) -> list[JobRecord]:
        """``job`` and the queued jobs that can run with it (co-batching). Holds the lock.

        Only the head job of each key's queue can join (each key's jobs keep their order),
        within the keys' running limits, up to ``max_batch_requests``. With room left the
        worker waits up to ``batch_window_seconds`` once for more to arrive.
        """
        if job.batch_key is None or self._batcher is None or self.limits.max_batch_requests < 2:
            return [job]
        batch = [job]
        self._gather(batch)
        window = self.limits.batch_window_seconds
        if len(batch) < self.limits.max_batch_requests and window > 0 and not self._stopping:
            self._lock.wait(window)
            self._gather(batch)
        return batch

    def _gather(self, batch: list[JobRecord]) -> None:
        taken = Counter(j.owner for j in batch)
        for owner in list(self._turns):
            if len(batch) >= self.limits.max_batch_requests:
                return
            queue = self._queues.get(owner)
            if not queue or self._running[owner] + taken[owner] >= self._per_key:
                continue
            head = queue[0]
            if head.batch_key != batch[0].batch_key or not self._fits(batch, head):
                continue
            queue.popleft()
            if not queue:
                del self._queues[owner]
                self._turns.remove(owner)
            batch.append(head)
            taken[owner] += 1

    def _fits(self, batch: list[JobRecord], job: JobRecord) -> bool:
        """Whether ``job``'s estimated cost is like the batch's first and the batch's sum,
        with it, fits one run's budget (so the merged pass fits one run's time)."""
        limits = self.limits
        cost, budget = limits.run_budget(job.part.cost)
        first = limits.run_budget(batch[0].part.cost)[0]
        if not (first / WORK_RATIO <= cost <= first * WORK_RATIO):
            return False
        return sum(limits.run_budget(j.part.cost)[0] for j in batch) + cost <= budget

    def _run_batch(self, batch: list[JobRecord], me: threading.Thread) -> bool:
        """Run ``batch`` in one pass and end each of its jobs with its own outcome; whether
        the watchdog gave up on it meanwhile (this worker then stops)."""
        try:
            outcomes = self._batcher([j.part for j in batch], batch[0].deadline)  # type: ignore[misc]
        except Exception as failure:  # a worker must survive anything a batch does
            outcomes = [(None, failure)] * len(batch)
        abandoned = False
        ends = list(zip(batch, outcomes, strict=True))
        for job, (result, failure) in reversed(ends):  # requeued first of their keys: in order
            if failure is RUN_ALONE and self._requeue_alone(job, me):
                continue
            error = None
            if isinstance(failure, ApiError):
                error = JobError.of(failure)
            elif failure is not None:
                error = JobError("internal", f"{type(failure).__name__}: {failure}")
            abandoned = self._finish(job, result, error, me) or abandoned
        if abandoned:
            self._replace(me)
        return abandoned

    def _requeue_alone(self, job: JobRecord, me: threading.Thread) -> bool:
        """Queue a batch's ``job`` again, first of its key, to run alone under its own
        deadline (its merged pass ran out of time); whether it was (not if given up on)."""
        with self._lock:
            if job.worker is not me or job.state != "running":
                return False
            self._running[job.owner] -= 1
            job.state, job.worker, job.deadline, job.started = "queued", None, None, None
            job.batch_key = job.part = None
            self._persist(self.store.update, job.id, state="queued")
            queue = self._queues.get(job.owner)
            if queue is None:
                queue = self._queues[job.owner] = deque()
                self._turns.appendleft(job.owner)
            queue.appendleft(job)
            self._changed([job])
            self._lock.notify_all()
        return True

    def _finish(
        self, job: JobRecord, result: bytes | None, error: JobError | None, me: threading.Thread
    ) -> bool:
        """End ``job`` with its run's outcome: a handed job's result is held for its request,
        any other is stored first. Whether the watchdog gave up on the run (result dropped)."""
        with self._lock:
            if job.worker is me and job.handed and result is not None and error is None:
                job.held = result
                self._end(job, result, None)
                return False
        if result is not None and error is None and job.worker is me:
            try:
                job.result_sha256 = self.store.write_result(job.id, result)
            except OSError as failure:  # never run again: its row says error (its file is gone)
                code = "insufficient_storage" if self.store.full else "store_failed"
                error = JobError(code, f"the result could not be stored: {failure}")
        with self._lock:
            if job.worker is not me:  # the watchdog gave up on this run: drop its result
                self.store.remove_result(job.id)
                return True
            self._end(job, result, error)
        return False

    def _replace(self, me: threading.Thread) -> None:
        """This worker's run was given up on: it stops, and a new worker takes its place."""
        with self._lock:
            self._abandoned.discard(me)
            self._spawn()
            self._lock.notify_all()

    def _progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        with self._lock:
            if job.state == "running":
                job.progress = dict(progress)
                self._changed([job])

    def _begin(self, job: JobRecord, worker: threading.Thread) -> None:
        """Holds the lock."""
        job.state, job.started, job.worker = "running", time.time(), worker
        job.attempts += 1
        job.deadline = (
            time.monotonic() + self.limits.max_run_seconds + self.limits.watchdog_grace_seconds
        )
        self._running[job.owner] += 1
        self._persist(
            self.store.update, job.id, state="running", started=job.started, attempts=job.attempts
        )
        self._changed([job, *(j for q in self._queues.values() for j in q)])

    def _end(self, job: JobRecord, result: bytes | None, error: JobError | None) -> None:
        """Record a run's outcome. Holds the lock."""
        self._running[job.owner] -= 1
        job.worker, job.work, job.deadline = None, None, None
        job.finished = time.time()
        if error is None and result is not None:
            job.state, job.result_bytes = "done", len(result)
        else:
            job.state = "error"
            job.error = error or JobError("internal", "the run returned no result")
            if job.error.code == "timeout" and job.error.field == OVERRUN_FIELD:
                self._overruns.setdefault(job.owner, deque()).append(time.monotonic())
        if job.id not in self._jobs or self._closed:  # forgotten meanwhile, or host closed
            if not self._closed:
                self.store.remove_result(job.id)
            job.held = None
        elif job.held is not None:
            pass  # its request takes it and forgets the job; a restart first runs it again
        else:
            self._persist(
                self.store.update,
                job.id,
                state=job.state,
                finished=job.finished,
                result_bytes=job.result_bytes,
                error=None if job.error is None else job.error.to_json(),
                result_sha256=job.result_sha256 if job.state == "done" else None,
            )
        self._changed([job])
        self._lock.notify_all()  # a running slot of this key is free

    # ----------------------------------------------------------------- the watchdog

    def _watch(self) -> None:
        limits = self.limits
        tick = min(1.0, max(0.05, (limits.max_run_seconds + limits.watchdog_grace_seconds) / 4))
        while True:
            with self._lock:
                self._lock.wait(tick)
                if self._stopping:
                    return
                now = time.monotonic()
                for job in list(self._jobs.values()):
                    if job.state == "running" and job.deadline is not None and now > job.deadline:
                        self._abandon(job)
                if now >= self._next_sweep:
                    self._sweep()
                    self._next_sweep = now + 1.0

    def _abandon(self, job: JobRecord) -> None:
        """Fail a run past its deadline and replace its worker. Holds the lock."""
        limits = self.limits
        thread = job.worker
        if thread is not None:
            self._active.discard(thread)
            self._abandoned.add(thread)
        error = JobError(
            "timeout",
            f"the run went past the limit max_run_seconds={limits.max_run_seconds:g} and the "
            f"watchdog's grace of watchdog_grace_seconds={limits.watchdog_grace_seconds:g}; "
            "it was stopped (its thread finishes in the background, its result is dropped)",
            OVERRUN_FIELD,
        )
        self._end(job, None, error)
        self._spawn()


def _run(
    work: Callable[[float], bytes] | None, deadline: float | None
) -> tuple[bytes | None, JobError | None]:
    """Run a job; its outcome as plain data (the exception and its frames are let go here)."""
    try:
        assert work is not None and deadline is not None
        return work(deadline), None
    except ApiError as failure:
        return None, JobError.of(failure)
    except Exception as failure:  # a worker must survive anything a job does
        return None, JobError("internal", f"{type(failure).__name__}: {failure}")
