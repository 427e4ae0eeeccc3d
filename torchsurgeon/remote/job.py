"""A job as the host's queue holds it (:class:`JobRecord`) and why one failed
(:class:`JobError`); the queue is :mod:`torchsurgeon.remote.jobs`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torchsurgeon.remote.errors import ApiError

__all__ = ["JobError", "JobRecord", "State"]

State = Literal["queued", "running", "done", "error", "expired"]


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
