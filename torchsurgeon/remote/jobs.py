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
from dataclasses import dataclass, field
from typing import Any, Literal

from torchsurgeon.layers.guards import cancelled_by
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.progress import reporting_to
from torchsurgeon.remote.store import JobStore, StoredJob
from torchsurgeon.remote.worker import OVERRUN_FIELD, RUN_ALONE

__all__ = ["RUN_ALONE", "WORK_RATIO", "JobError", "JobQueue", "JobRecord", "State"]

State = Literal["queued", "running", "done", "error", "expired"]

WORK_RATIO = 2.0
"""Jobs share a merged pass only with jobs whose estimated work is within this factor of
the batch's first: a slow plan waits for nobody's fast one, nor makes it wait."""

MAX_ATTEMPTS = 2
"""Runs a job gets in all: a job a stopping host interrupted runs once more."""
TOMBSTONE_SECONDS = 24 * 3600.0
"""How long an expired job still answers ``410 expired`` (then: ``404``, like any unknown id)."""

_FINISHED = ("done", "error", "expired")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobError:
    """Why a job failed, as plain data (never an exception: its traceback holds tensors)."""

    code: str
    message: str
    field: str = ""

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "field": self.field}

    @classmethod
    def of(cls, error: ApiError) -> JobError:
        return cls(str(error.code), str(error.message), str(error.field))


@dataclass(eq=False)  # a job is itself: compared by identity in the queue
class JobRecord:
    """One job. ``work(deadline)`` runs in a worker thread and returns the result bytes by
    ``deadline`` (``time.monotonic()``, handed down by the queue: the one timeout authority)."""

    id: str
    owner: str
    model: str
    work: Callable[[float], bytes] | None
    state: State = "queued"
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result_bytes: int | None = None
    """The size of the result file, once done."""
    error: JobError | None = None
    version: int = 0
    request_key: str | None = None
    digest: str = ""
    attempts: int = 0
    deadline: float | None = None
    """While running: the watchdog's ``time.monotonic()`` deadline."""
    worker: threading.Thread | None = None
    """While running: the thread that runs it (``None`` once the watchdog gave up on it)."""
    progress: dict[str, Any] | None = None
    """While running: what the run last reported (a training run's step and loss)."""
    batch_key: Any = None
    """What the job shares with others it may run with in one pass (None: it runs alone)."""
    part: Any = None
    """The job as the batcher takes it (with ``batch_key``)."""
    handed: bool = False
    """A request is waiting to take this job's result and forget the job (a blocking run)."""
    held: bytes | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set when the job is forgotten while it runs: its run stops at its next check."""
    """A handed job's result, kept here for the waiting request (never written to the store)."""
    result_sha256: str | None = None
    """The SHA-256 of the stored result, checked when it is served (None: not known)."""


class JobQueue:
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

    def _sweep(self) -> None:
        """Expire results past the TTL; forget expired jobs after a day. Holds the lock."""
        now = time.time()
        ttl = self.limits.result_ttl_seconds
        self.store.writable()  # while the disk is full: notices space coming back
        for job in list(self._jobs.values()):
            if job.finished is None or job.state not in _FINISHED:
                continue
            if job.state == "expired" and now - job.finished > ttl + TOMBSTONE_SECONDS:
                self._jobs.pop(job.id)
                if job.request_key is not None:
                    self._by_key.pop((job.owner, job.request_key), None)
                self._persist(self.store.delete, job.id)
            elif job.state != "expired" and now - job.finished > ttl:
                job.state, job.result_bytes, job.error = "expired", None, None
                self._persist(
                    self.store.update, job.id, state="expired", result_bytes=None, error=None
                )
                self.store.remove_result(job.id)
                self._changed([job])

    def _persist(self, change: Callable[..., None], *args: Any, **fields: Any) -> None:
        """Write a change to the store; a failure is logged, never raised into a worker.

        The record in memory stays right for this process; only that change may not survive
        a restart.
        """
        try:
            change(*args, **fields)
        except (sqlite3.Error, OSError, RuntimeError) as failure:
            _log.error("torchsurgeon host: could not store a job change: %s", failure)

    def _store_error(self, failure: BaseException, doing: str) -> ApiError:
        """The answer to a request the store failed: 507 on a full disk, else 503."""
        if self.store.full:
            return ApiError(
                507,
                "insufficient_storage",
                "the host's state directory is out of disk space; new jobs are refused until "
                "space is freed (delete fetched results: DELETE /v1/jobs/{id})",
                "state_dir",
            )
        return ApiError(503, "store_failed", f"the host {doing}: {failure}")

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

    # ----------------------------------------------------------------- restarts

    def _restore(self) -> None:
        """Read the store back: queued jobs queue again (those a stopping host interrupted
        too, once); a job the store says was running when the host went down is not run
        again, since it may be what took the host down.

        The store quarantines rows that are not jobs; a done job's size is its file's.
        A change that cannot be written (a full disk) is logged and made once space is back.
        """
        now = time.time()
        no_space = self.store.no_space()
        for row in self.store.rows():
            job = _record(row)
            if row.state in ("queued", "running") and row.id in no_space:
                failure = JobError(
                    "insufficient_storage",
                    "the result of this job did not fit on the host's disk; it is not run again",
                )
            elif row.state == "running":  # the host went down while it ran: it may be why
                failure = JobError(
                    "host_restarted",
                    "the host went down while this job ran; a job that may have taken the host "
                    "down is not run again (submit it again if it was not the cause)",
                )
            elif row.state == "queued" and row.attempts < MAX_ATTEMPTS:
                if row.has_request and self._revive is not None:
                    job.state, job.work = "queued", self._revived(row.id, row.model)
                    self._persist(self.store.update, job.id, state="queued")
                    self._add(job)
                    self._enqueue(job)
                    continue
                failure = JobError(
                    "host_restarted",
                    "the host restarted before this job finished, and its request was not kept",
                )
            elif row.state == "queued":
                failure = JobError(
                    "host_restarted",
                    f"the host stopped while this job ran, {row.attempts} times; it is not run "
                    "again",
                )
            elif row.state == "done" and not self.store.result_path(row.id).is_file():
                failure = JobError("result_lost", "the result file of this job is missing")
            else:
                if row.state == "done":  # the file's size, not the row's, counts for 429s
                    size = self.store.result_path(row.id).stat().st_size
                    if size != row.result_bytes:
                        job.result_bytes = size
                        self._persist(self.store.update, job.id, result_bytes=size)
                self._add(job)
                continue
            job.state, job.error, job.finished, job.result_bytes = "error", failure, now, None
            self._persist(
                self.store.update,
                job.id,
                state="error",
                finished=now,
                result_bytes=None,
                error=failure.to_json(),
            )
            self._add(job)
        self.store.remove_stray_files({j.id for j in self._jobs.values() if j.state == "done"})

    def _revived(self, job_id: str, model: str) -> Callable[[float], bytes]:
        revive, store = self._revive, self.store
        assert revive is not None

        def work(deadline: float) -> bytes:
            request = store.request(job_id)
            if request is None:
                raise ApiError(500, "result_lost", "the request of this job is no longer kept")
            return revive(model, request, deadline)

        return work


def _record(row: StoredJob) -> JobRecord:
    error = None if row.error is None else JobError(**row.error)
    return JobRecord(
        row.id,
        row.owner,
        row.model,
        None,
        state=row.state,  # type: ignore[arg-type]
        submitted=row.submitted,
        started=row.started,
        finished=row.finished,
        result_bytes=row.result_bytes,
        error=error,
        request_key=row.request_key,
        digest=row.digest,
        attempts=row.attempts,
        result_sha256=row.result_sha256,
    )


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
