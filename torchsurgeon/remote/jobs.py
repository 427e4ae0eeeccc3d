"""The host's job queue: submitted work, worker threads, and status that clients can await.

A submission becomes a :class:`JobRecord` owned by the API key that sent it, waits in one
FIFO queue (its ``position`` is how many jobs are ahead of it), and is run by one of a few
worker threads — several at once is safe because each job carries its own rewritten view
of the shared base. A record moves ``queued -> running -> done | error``; each change bumps
its ``version``, and :meth:`JobQueue.wait` lets an async request handler sleep until the
next change (long polling) instead of clients polling in a loop.

Finished jobs keep their result for ``result_ttl_seconds``; a key may hold at most
``max_queue_per_key`` unfinished jobs.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torchsurgeon.remote.errors import ApiError

__all__ = ["JobQueue", "JobRecord", "State"]

State = Literal["queued", "running", "done", "error"]


@dataclass(eq=False)  # a job is itself: compared by identity in the queue
class JobRecord:
    """One submitted job. ``work`` runs in a worker thread and returns the result bytes."""

    id: str
    owner: str
    model: str
    work: Callable[[], bytes] | None
    state: State = "queued"
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    result: bytes | None = None
    error: ApiError | None = None
    version: int = 0


class JobQueue:
    """FIFO queue + worker threads + per-job change notification."""

    def __init__(self, workers: int, max_per_key: int, result_ttl: float) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._jobs: dict[str, JobRecord] = {}
        self._pending: deque[JobRecord] = deque()
        self._lock = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, str]] = []
        self._max_per_key = max_per_key
        self._ttl = result_ttl
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"torchsurgeon-worker-{i}", daemon=True)
            for i in range(workers)
        ]

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for thread in self._threads:
            if not thread.is_alive():
                thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # ----------------------------------------------------------------- clients

    def submit(self, owner: str, model: str, work: Callable[[], bytes]) -> JobRecord:
        """Queue ``work`` for ``owner``; :class:`ApiError` 429 when the key's quota is full."""
        with self._lock:
            self._sweep()
            active = sum(
                1
                for j in self._jobs.values()
                if j.owner == owner and j.state in ("queued", "running")
            )
            if active >= self._max_per_key:
                raise ApiError(
                    429,
                    "queue_full",
                    f"this key has {active} unfinished jobs, the limit max_queue_per_key="
                    f"{self._max_per_key}; wait for some to finish",
                )
            job = JobRecord(secrets.token_urlsafe(12), owner, model, work)
            self._jobs[job.id] = job
            self._pending.append(job)
            self._lock.notify()
        return job

    def get(self, job_id: str, owner: str) -> JobRecord:
        """The job, if ``owner`` submitted it; 404 otherwise (others' jobs do not exist)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
            raise ApiError(404, "not_found", f"no job {job_id!r}", "job")
        return job

    def forget(self, job: JobRecord) -> None:
        """Drop a job and its result (a queued job leaves the queue; a running one finishes)."""
        with self._lock:
            self._jobs.pop(job.id, None)
            if job.state == "queued":
                self._pending.remove(job)

    def status(self, job: JobRecord) -> dict[str, Any]:
        """The job's status as JSON (``position``: jobs ahead of it, while queued)."""
        with self._lock:
            out: dict[str, Any] = {"id": job.id, "model": job.model, "state": job.state}
            if job.state == "queued":
                out["position"] = self._pending.index(job) if job in self._pending else 0
            if job.error is not None:
                out["error"] = job.error.to_json()["error"]
            if job.state == "done" and job.result is not None:
                out["result_bytes"] = len(job.result)
            if job.started is not None:
                out["queued_seconds"] = job.started - job.submitted
            if job.finished is not None and job.started is not None:
                out["run_seconds"] = job.finished - job.started
            out["version"] = job.version
            return out

    async def wait(self, job: JobRecord, since: int, timeout: float) -> None:
        """Return once ``job.version`` differs from ``since`` (or after ``timeout`` seconds).

        A queued job's position changes when any job starts, which counts as a change.
        """
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event, job.id)
        with self._lock:
            if job.version != since:
                return
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    # ----------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state, job.started = "running", time.monotonic()
                self._changed([job, *self._pending])  # and every queued job moved up
            try:
                assert job.work is not None
                result, error = job.work(), None
            except ApiError as failure:
                result, error = None, failure
            except Exception as failure:  # a worker must survive anything a job does
                result = None
                error = ApiError(500, "internal", f"{type(failure).__name__}: {failure}")
            with self._lock:
                job.result, job.error, job.work = result, error, None
                job.state = "done" if error is None else "error"
                job.finished = time.monotonic()
                self._changed([job])

    def _changed(self, jobs: list[JobRecord]) -> None:
        """Bump these jobs' versions and wake whoever awaits them. Holds the lock."""
        touched = {j.id for j in jobs}
        for job in jobs:
            job.version += 1
        for loop, event, job_id in list(self._waiters):
            if job_id in touched:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # that request's event loop has closed
                    self._waiters.remove((loop, event, job_id))

    def _sweep(self) -> None:
        """Forget finished jobs older than the result TTL. Holds the lock."""
        now = time.monotonic()
        for job_id in [
            j.id
            for j in self._jobs.values()
            if j.finished is not None and now - j.finished > self._ttl
        ]:
            del self._jobs[job_id]
