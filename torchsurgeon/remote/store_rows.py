"""Rows of the job store read back defensively: a row that is not a job is a ValueError.

A host must start whatever its ``jobs.sqlite3`` holds (a hand edit, a bug, a bad disk): each
column is checked for its type and range before the row becomes a :class:`StoredJob`, and
:class:`~torchsurgeon.remote.store.JobStore` quarantines the rows that fail.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["JOB_ID", "StoredJob", "parse_row"]

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a job id looks like (the host's own ``secrets.token_urlsafe``): safe as a file name."""
_STATES = ("queued", "running", "done", "error", "expired")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredJob:
    """One row as it was read back (``has_request``: the submission's bytes are kept)."""

    id: str
    owner: str
    model: str
    state: str
    submitted: float
    started: float | None
    finished: float | None
    attempts: int
    request_key: str | None
    digest: str
    has_request: bool
    result_bytes: int | None
    error: dict[str, str] | None
    result_sha256: str | None = None


def parse_row(row: tuple[Any, ...]) -> StoredJob:
    """A row as a job; :class:`ValueError` naming the first column that is not right."""
    job_id, owner, model, state, submitted, started, finished, attempts = row[:8]
    request_key, digest, has_request, result_bytes, error, sha256 = row[8:14]
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ValueError("id is not a job id")
    for name, value in (("owner", owner), ("model", model), ("digest", digest)):
        if not isinstance(value, str):
            raise ValueError(f"{name} is {type(value).__name__}, not text")
    if state not in _STATES:
        raise ValueError(f"state {state!r} is not one of {_STATES}")
    for name, value in (("submitted", submitted), ("started", started), ("finished", finished)):
        if not (value is None and name != "submitted") and not _finite(value):
            raise ValueError(f"{name} {value!r} is not a time")
    for name, value in (("attempts", attempts), ("result_bytes", result_bytes)):
        if not (value is None and name == "result_bytes") and not _count(value):
            raise ValueError(f"{name} {value!r} is not a count")
    if request_key is not None and not isinstance(request_key, str):
        raise ValueError("request_key is not text")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise ValueError("result_sha256 is not a SHA-256")
    return StoredJob(
        job_id, owner, model, state, submitted, started, finished, attempts, request_key,
        digest, bool(has_request), result_bytes, _error(error), sha256,
    )  # fmt: skip


def _error(text: Any) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        error = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        error = None
    if (
        not isinstance(error, dict)
        or not {"code", "message"} <= error.keys() <= {"code", "message", "field"}
        or not all(isinstance(value, str) for value in error.values())
    ):
        raise ValueError("error is not a JSON object of code, message and field")
    return error


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 62
