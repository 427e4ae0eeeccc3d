"""The queue's durable side: every change written to the store, the store read back after a
restart, finished results expired. A mixin of :class:`~torchsurgeon.remote.jobs.JobQueue`,
whose state and lock it shares; see that module for the rules.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.job import JobError, JobRecord
from torchsurgeon.remote.store import StoredJob

__all__ = ["MAX_ATTEMPTS", "TOMBSTONE_SECONDS", "Durable"]

MAX_ATTEMPTS = 2
"""Runs a job gets in all: a job a stopping host interrupted runs once more."""
TOMBSTONE_SECONDS = 24 * 3600.0
"""How long an expired job still answers ``410 expired`` (then: ``404``, like any unknown id)."""

_FINISHED = ("done", "error", "expired")
_log = logging.getLogger(__name__)


class Durable:
    """Persisting, restoring and expiring the jobs of a queue."""

    limits: Any
    store: Any
    _jobs: dict[str, JobRecord]
    _by_key: dict[tuple[str, str], JobRecord]
    _revive: Callable[[str, bytes, float], bytes] | None
    _lock: threading.Condition

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
