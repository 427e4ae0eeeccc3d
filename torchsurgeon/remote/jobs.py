"""The host's jobs: a durable record of each, a fair turn for each key, workers, a watchdog.

A submission becomes a :class:`JobRecord` owned by the API key that sent it and a row in
the host's :class:`~torchsurgeon.remote.store.JobStore` (with the submission's bytes, so it
can run again after a restart). A record moves ``queued -> running -> done | error``, and a
finished one becomes ``expired`` when its result is dropped after ``result_ttl_seconds``;
each change bumps its ``version``, and :meth:`JobQueue.wait` lets an async request handler
sleep until the next change (long polling) instead of clients polling in a loop.

**Fair turns.** Each key has its own FIFO; the keys with queued work take turns (round
robin), and one key may have at most ``max_running_per_key`` jobs running (by default every
worker but one), so a key that floods the host cannot hold every worker: another key's job
waits for at most the jobs already running, never behind the flood. A queued job's
``position`` is how many jobs start before it in that order.

**Bounds per key.** A key may hold ``max_queue_per_key`` unfinished jobs, and while the
finished results it holds (files in the store) exceed ``max_result_bytes_per_key`` its new
submissions are refused with a 429 — the host never drops a result nobody fetched to make
room. A failed job keeps only plain error data (code, message, field), never the exception,
whose traceback would hold the run's tensors alive.

**The watchdog.** A job still running ``watchdog_grace_seconds`` after ``max_run_seconds``
(the run checks its deadline itself; this is the backstop for a run stuck inside one call)
is failed with ``timeout`` and its worker replaced, so the queue keeps moving. Each run is
handed its deadline: an executor of processes kills a run still going then
(:mod:`torchsurgeon.remote.spawned`). A Python thread cannot be killed: an abandoned
in-process run finishes its call in the background and its result is dropped. While
``max_abandoned_runs`` such threads are alive the host refuses new work with a 503.

**Restarts.** On start the queue reads the store back: queued jobs run, a job that was
running runs once more (one that was already running when the host stopped before is failed
with ``host_restarted``), done jobs keep their result files. A client may send its own
request id (``Idempotency-Key``): the same id from the same key returns the job it already
made, so a retried submission never runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from torchsurgeon.remote.dispatch import Dispatcher
from torchsurgeon.remote.durable import Durable
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.job import JobError, JobRecord, State
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.store import JobStore

__all__ = ["JobError", "JobQueue", "JobRecord", "State"]


_log = logging.getLogger(__name__)


class JobQueue(Dispatcher, Durable):
    """Per-key queues taking turns, worker threads, a watchdog and change notification."""

    def __init__(
        self,
        workers: int,
        limits: Limits,
        store: JobStore,
        revive: Callable[[str, bytes, float], bytes] | None = None,
        batcher: Callable[[list[Any], float], list[tuple[bytes | None, Any]]] | None = None,
    ) -> None:
        """``revive(model, request_bytes, deadline)`` validates and runs a job read back from
        the store; ``batcher(parts, deadline)`` runs jobs of one ``batch_key`` together,
        giving each its ``(result bytes, None)``, ``(None, ApiError)`` or
        ``(None, RUN_ALONE)`` (co-batching; None: jobs run alone). Parts have a ``cost``
        (their estimate): a batch holds jobs of similar cost whose sum fits one run's budget
        (``Limits.run_budget``)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if limits.max_running_per_key is not None and limits.max_running_per_key < 1:
            raise ValueError(
                f"max_running_per_key must be >= 1 or None (every worker but one), got "
                f"{limits.max_running_per_key}"
            )
        if limits.max_abandoned_runs < 1:
            raise ValueError(
                f"max_abandoned_runs must be >= 1, got {limits.max_abandoned_runs}: at 0 the host "
                "would refuse all work"
            )
        self.limits = limits
        self.store = store
        self._revive = revive
        self._batcher = batcher
        self.batch_sizes: Counter[int] = Counter()
        """How many passes ran with how many jobs (co-batching's record; 1: alone)."""
        self._workers = workers
        per_key = limits.max_running_per_key
        self._per_key = max(1, workers - 1) if per_key is None else per_key
        self._jobs: dict[str, JobRecord] = {}
        self._by_key: dict[tuple[str, str], JobRecord] = {}
        self._queues: dict[str, deque[JobRecord]] = {}
        self._turns: deque[str] = deque()  # keys with queued jobs, in turn order
        self._running: Counter[str] = Counter()
        self._overruns: dict[str, deque[float]] = {}  # per key: when its runs timed out
        self._lock = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, str]] = []
        self._active: set[threading.Thread] = set()
        self._abandoned: set[threading.Thread] = set()
        self._watchdog: threading.Thread | None = None
        self._started = self._stopping = self._closed = False
        self._next_sweep = 0.0
        self._spawned = 0
        self._restore()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._lock:
            if self._started or self._stopping:
                return
            self._started = True
            self._spawn()
            self._watchdog = threading.Thread(
                target=self._watch, name="torchsurgeon-watchdog", daemon=True
            )
            self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop dispatching, give running jobs up to ``timeout`` s in all, close the store.

        A job still running then is ``queued`` again in the store and runs again on restart
        (a job left ``running`` means the host went down during it: it is not run again).
        """
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            threads = [*self._active, *([self._watchdog] if self._watchdog else [])]
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            interrupted = [j.id for j in self._jobs.values() if j.state == "running"]
        for job_id in interrupted:  # stopped by us, not the cause of a crash: run again
            self._persist(self.store.update, job_id, state="queued")
        self.store.close()

    # ----------------------------------------------------------------- clients

    def find(self, owner: str, request_key: str, digest: str) -> JobRecord | None:
        """The job ``owner`` already made with this request id (409 if the body differs)."""
        with self._lock:
            return self._replay(owner, request_key, digest)

    def admit(self, owner: str) -> None:
        """Refuse (:class:`ApiError`) if ``owner`` may not submit now; checks again at submit."""
        with self._lock:
            self._admit(owner)

    def submit(
        self,
        owner: str,
        model: str,
        work: Callable[[float], bytes],
        *,
        request: bytes | None = None,
        request_key: str | None = None,
        digest: str = "",
        batch_key: Any = None,
        part: Any = None,
        hand_over: bool = False,
    ) -> JobRecord:
        """Queue ``work`` for ``owner`` (``request``: the bytes to run it again after a restart).

        With ``request_key``, a second submission of it returns the first job. With
        ``hand_over``, the caller waits for the result and then forgets the job: a result
        that comes while it waits is kept in memory for it (:meth:`take`), not stored.
        """
        with self._lock:
            if request_key is not None:
                existing = self._replay(owner, request_key, digest)
                if existing is not None:
                    return existing
            self._admit(owner)
            job = JobRecord(
                secrets.token_urlsafe(12),
                owner,
                model,
                work,
                request_key=request_key,
                digest=digest,
                batch_key=batch_key if self._batcher is not None else None,
                part=part,
                handed=hand_over,
            )
            try:
                self.store.insert(job.id, owner, model, job.submitted, request_key, digest, request)
            except (sqlite3.Error, OSError) as failure:
                raise self._store_error(failure, "could not record the job") from None
            self._add(job)
            self._enqueue(job)
            self._lock.notify_all()
        return job

    def get(self, job_id: str, owner: str) -> JobRecord:
        """The job, if ``owner`` submitted it; 404 otherwise (others' jobs do not exist)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
            raise ApiError(404, "not_found", f"no job {job_id!r}", "job")
        return job

    def forget(self, job: JobRecord, strict: bool = False) -> None:
        """Drop a job and its result (a queued job leaves the queue; a running one is stopped
        at its next module call or expression node, which frees its worker).

        ``strict``: the store forgets it first, or an :class:`ApiError` (507 on a full disk)
        leaves the job in place; else a failure is logged and retried once space is back.
        """
        with self._lock:
            if job.id not in self._jobs:
                return
            if strict and not self._closed:
                try:
                    self.store.delete(job.id)
                except (sqlite3.Error, OSError, RuntimeError) as failure:
                    raise self._store_error(failure, "could not delete the job") from None
            del self._jobs[job.id]
            if job.request_key is not None:
                self._by_key.pop((job.owner, job.request_key), None)
            if job.state == "queued":
                self._dequeue(job)
            elif job.state == "running":
                job.cancel.set()  # its run stops at the next module call: the worker is free
            if not self._closed and not strict:
                self._persist(self.store.delete, job.id)

    def verify_result(self, job: JobRecord) -> None:
        """Check a done job's result file against the SHA-256 kept with its row: a mismatch
        fails the job (``result_corrupt``, the file moved to ``quarantine/``) and is a 500."""
        if job.state != "done" or job.result_sha256 is None:
            return
        try:
            if self.store.result_matches(job.id, job.result_sha256):
                return
        except OSError:
            return  # gone: serving it answers 410
        error = JobError(
            "result_corrupt",
            f"the stored result of job {job.id!r} does not match the SHA-256 recorded when it "
            "was written (changed on disk); it is not served",
            "job",
        )
        _log.error("torchsurgeon host: %s", error.message)
        with self._lock:
            if job.state == "done":
                job.state, job.error, job.result_bytes = "error", error, None
                self._persist(
                    self.store.update, job.id, state="error", result_bytes=None,
                    error=error.to_json(),
                )  # fmt: skip
                self.store.quarantine_result(job.id)
                self._changed([job])
        raise ApiError(500, error.code, error.message, error.field)

    def take(self, job: JobRecord) -> bytes | None:
        """A handed job's result, if it came while its request waited (the caller forgets
        the job once it has answered).

        None if there is none (the job is not done, or its result went to the store): then
        the job is no longer handed, and a result that comes later is stored as usual (the
        request gave up waiting, and the client fetches it with ``GET .../result``).
        """
        with self._lock:
            held, job.held, job.handed = job.held, None, False
        return held

    def status(self, job: JobRecord) -> dict[str, Any]:
        """The job's status as JSON (``position``: jobs that start before it, while queued).

        An expired job is a ``410`` naming when its result was dropped.
        """
        with self._lock:
            if job.state == "expired":
                raise ApiError(
                    410,
                    "expired",
                    f"job {job.id!r} finished {time.time() - (job.finished or 0):.0f} s ago; "
                    f"its result was dropped after result_ttl_seconds="
                    f"{self.limits.result_ttl_seconds:g}",
                    "job",
                )
            out: dict[str, Any] = {"id": job.id, "model": job.model, "state": job.state}
            if job.state == "queued":
                out["position"] = self._position(job)
            if job.state == "running" and job.progress is not None:
                out["progress"] = job.progress
            if job.error is not None:
                out["error"] = job.error.to_json()
            if job.state == "done" and job.result_bytes is not None:
                out["result_bytes"] = job.result_bytes
            if job.started is not None:
                out["queued_seconds"] = job.started - job.submitted
            if job.finished is not None and job.started is not None:
                out["run_seconds"] = job.finished - job.started
            out["attempts"] = job.attempts
            out["version"] = job.version
            return out

    def held_bytes(self, owner: str) -> int:
        """The bytes of finished results ``owner`` holds on this host."""
        with self._lock:
            return self._held(owner)

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
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    # ----------------------------------------------------------------- admission

    def _admit(self, owner: str) -> None:
        """Holds the lock."""
        limits = self.limits
        if self._stopping:
            raise ApiError(503, "shutting_down", "the host is shutting down; retry shortly")
        if not self.store.writable():
            raise self._store_error(OSError(28, "the store found the disk full"), "")
        if len(self._abandoned) >= limits.max_abandoned_runs:
            raise ApiError(
                503,
                "overloaded",
                f"{len(self._abandoned)} runs the watchdog gave up on are still finishing, the "
                f"limit max_abandoned_runs={limits.max_abandoned_runs}; retry later",
                "max_abandoned_runs",
            )
        overruns = self._overruns.get(owner)
        now = time.monotonic()
        while overruns and now - overruns[0] > limits.overrun_cooldown_seconds:
            overruns.popleft()
        if overruns and len(overruns) >= limits.max_overruns_per_key:
            wait = limits.overrun_cooldown_seconds - (now - overruns[0])
            raise ApiError(
                429,
                "overruns",
                f"{len(overruns)} runs of this key went past their deadline and were stopped "
                f"within overrun_cooldown_seconds={limits.overrun_cooldown_seconds:g}, the "
                f"limit max_overruns_per_key={limits.max_overruns_per_key}; retry in "
                f"{wait:.0f} s with a lighter plan",
                "max_overruns_per_key",
            )
        active = sum(
            1 for j in self._jobs.values() if j.owner == owner and j.state in ("queued", "running")
        )
        if active >= limits.max_queue_per_key:
            raise ApiError(
                429,
                "queue_full",
                f"this key has {active} unfinished jobs, the limit max_queue_per_key="
                f"{limits.max_queue_per_key}; wait for some to finish",
                "max_queue_per_key",
            )
        held = self._held(owner)
        if held > limits.max_result_bytes_per_key:
            raise ApiError(
                429,
                "result_budget",
                f"this key holds {held} bytes of finished results, over the limit "
                f"max_result_bytes_per_key={limits.max_result_bytes_per_key}; fetch and "
                "delete some (DELETE /v1/jobs/{id}) or wait result_ttl_seconds="
                f"{limits.result_ttl_seconds:g} for them to expire",
                "max_result_bytes_per_key",
            )

    def _held(self, owner: str) -> int:
        mine = (j for j in self._jobs.values() if j.owner == owner and j.state == "done")
        return sum(j.result_bytes or 0 for j in mine)

    def _replay(self, owner: str, request_key: str, digest: str) -> JobRecord | None:
        """Holds the lock."""
        job = self._by_key.get((owner, request_key))
        if job is not None and job.digest != digest:
            raise ApiError(
                409,
                "idempotency_conflict",
                f"request id {request_key!r} was used for another request (job {job.id!r}); "
                "send a new Idempotency-Key for a new request",
                "Idempotency-Key",
            )
        return job

    # ----------------------------------------------------------------- turns

    def _add(self, job: JobRecord) -> None:
        self._jobs[job.id] = job
        if job.request_key is not None:
            self._by_key[(job.owner, job.request_key)] = job

    def _enqueue(self, job: JobRecord) -> None:
        """Holds the lock. A key that had nothing queued joins the end of the turns."""
        queue = self._queues.get(job.owner)
        if queue is None:
            queue = self._queues[job.owner] = deque()
            self._turns.append(job.owner)
        queue.append(job)

    def _dequeue(self, job: JobRecord) -> None:
        queue = self._queues[job.owner]
        queue.remove(job)
        if not queue:
            del self._queues[job.owner]
            self._turns.remove(job.owner)

    def _take(self) -> JobRecord | None:
        """The next job in turn whose key is under its running limit. Holds the lock."""
        for _ in range(len(self._turns)):
            owner = self._turns[0]
            self._turns.rotate(-1)  # this key goes to the end of the turns either way
            if self._running[owner] >= self._per_key:
                continue
            queue = self._queues[owner]
            job = queue.popleft()
            if not queue:
                del self._queues[owner]
                self._turns.remove(owner)
            return job
        return None

    def _position(self, job: JobRecord) -> int:
        """Jobs that start before ``job`` (running limits aside). Holds the lock.

        If it is ``i``-th in its key's queue, every key first takes ``i`` turns (or as many
        as it has jobs), then the keys ahead of its key in this round take one more.
        """
        queue = self._queues.get(job.owner)
        if queue is None or job not in queue:
            return 0
        index, turn = queue.index(job), self._turns.index(job.owner)
        return sum(
            min(len(self._queues[owner]), index + (n < turn)) for n, owner in enumerate(self._turns)
        )

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
