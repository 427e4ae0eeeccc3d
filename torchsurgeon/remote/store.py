"""Where a host keeps its jobs: one SQLite table, result files beside it.

A host's state directory holds ``jobs.sqlite3`` (the standard library's ``sqlite3``, WAL
journal, one row per job: its owner, model, state, times, attempts, the client's request id,
plain error data, and — until the job finishes — the submission's bytes, so that a job
queued or running when the host stopped can run again after a restart) and ``results/``,
one safetensors file per finished job, written to a temporary name and renamed into place.
A committed row survives the host being killed; a result file is in place before its row
says ``done``.

Without a directory the store lives in a fresh temporary directory that :meth:`close`
removes: the same code, nothing kept across restarts. One host at a time: the store holds an
exclusive ``flock`` on ``lock`` in the directory (the kernel drops it when the process dies,
however it dies), so a second host started on the same directory refuses to start instead
of running the same jobs twice.

Every method takes the store's lock: one connection, used from the host's threads in turn.
Job ids are the host's own (``secrets.token_urlsafe``), so a result file's name never comes
from a client.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["JobStore", "StoredJob"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    request_key TEXT,
    digest TEXT NOT NULL DEFAULT '',
    request BLOB,
    result_bytes INTEGER,
    error TEXT,
    UNIQUE (owner, request_key)
)
"""


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


class JobStore:
    """The jobs table and result files of one host (``directory=None``: a temporary one)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.temporary = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="torchsurgeon-host-")
            # a host that is never stopped still leaves no directory behind at exit
            weakref.finalize(self, shutil.rmtree, directory, True)
        self.directory = Path(directory).expanduser()
        self.results = self.directory / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._owner = _hold(self.directory / "lock")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.directory / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: survives a killed process
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self._db.close()
            self._owner.close()
            raise ValueError(
                f"{self.directory}: the job store has schema version {version}; this "
                f"torchsurgeon reads version {SCHEMA_VERSION}. Use another --state-dir"
            )
        self._db.execute(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._closed = False

    # ----------------------------------------------------------------- rows

    def rows(self) -> list[StoredJob]:
        """Every job, oldest submission first."""
        with self._lock:
            found = self._db.execute(
                "SELECT id, owner, model, state, submitted, started, finished, attempts, "
                "request_key, digest, request IS NOT NULL, result_bytes, error "
                "FROM jobs ORDER BY submitted, rowid"
            ).fetchall()
        return [
            StoredJob(*row[:10], bool(row[10]), row[11], json.loads(row[12]) if row[12] else None)
            for row in found
        ]

    def insert(
        self,
        job_id: str,
        owner: str,
        model: str,
        submitted: float,
        request_key: str | None,
        digest: str,
        request: bytes | None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, owner, model, state, submitted, request_key, digest, "
                "request) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, owner, model, submitted, request_key, digest, request),
            )

    def request(self, job_id: str) -> bytes | None:
        """The submission's bytes, while the job has not finished."""
        with self._lock:
            row = self._db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some of ``state, started, finished, attempts, result_bytes, error``.

        A finished state drops the kept request bytes; ``error`` is plain data (a dict).
        """
        allowed = {"state", "started", "finished", "attempts", "result_bytes", "error"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"update takes some of {sorted(allowed)}, got {sorted(fields)}")
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        columns = [f"{name} = ?" for name in fields]  # names from the allow-list above
        if fields.get("state") in ("done", "error", "expired"):
            columns.append("request = NULL")
        with self._transaction() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(columns)} WHERE id = ?", (*fields.values(), job_id)
            )

    def delete(self, job_id: str) -> None:
        """Forget a job: its row and its result file."""
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self.remove_result(job_id)

    # ----------------------------------------------------------------- result files

    def result_path(self, job_id: str) -> Path:
        return self.results / f"{job_id}.tsresult"

    def write_result(self, job_id: str, data: bytes) -> None:
        """Write a result file completely (a temporary name, fsync, rename into place)."""
        final = self.result_path(job_id)
        partial = final.with_suffix(".partial")
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)

    def remove_result(self, job_id: str) -> None:
        self.result_path(job_id).unlink(missing_ok=True)

    def remove_stray_files(self, keep: set[str]) -> None:
        """Delete partial writes and result files of jobs the table does not hold as done."""
        for path in self.results.iterdir():
            if path.suffix != ".tsresult" or path.stem not in keep:
                path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._owner.close()  # releases the directory's lock
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def _hold(path: Path) -> IO[str]:
    """An open ``path`` with an exclusive lock on it; :class:`ValueError` if another holds it."""
    handle = open(path, "a+")  # noqa: SIM115 -- held open for the store's lifetime
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, one host per directory is up to the operator
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(
            f"the state directory {path.parent} is in use by another host; give each host its "
            "own --state-dir"
        ) from None
    return handle
