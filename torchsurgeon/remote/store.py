"""Where a host keeps its jobs: one SQLite table, result files beside it.

A host's state directory holds ``jobs.sqlite3`` (the standard library's ``sqlite3``, WAL
journal, one row per job: its owner, model, state, times, attempts, the client's request id,
plain error data, the SHA-256 of its result, and — until the job finishes — the submission's
bytes, so that a job queued or running when the host stopped can run again after a restart)
and ``results/``, one safetensors file per finished job, written to a temporary name and
renamed into place. A committed row survives the host being killed; a result file is in
place before its row says ``done``.

Without a directory the store lives in a fresh temporary directory that :meth:`close`
removes: the same code, nothing kept across restarts. One host at a time: the store holds an
exclusive ``flock`` on ``lock`` in the directory (the kernel drops it when the process dies,
however it dies), so a second host started on the same directory refuses to start instead
of running the same jobs twice.

**Hostile state.** Partial writes are removed before the database opens (on a full disk
they hold the space it needs). A database that fails ``PRAGMA quick_check`` is moved aside
(with its result files) to ``corrupt-<time>/`` and a fresh one created, with one log line.
A row that does not read back as a job is moved to the ``quarantine`` table (its result file
to ``quarantine/``) and logged. A full disk (``ENOSPC``, SQLite's "database or disk is
full") sets :attr:`JobStore.full`; changes that failed for lack of space are retried, in
order, once a small test write succeeds again (:meth:`JobStore.writable`).

Every method takes the store's lock: one connection, used from the host's threads in turn.
Job ids are the host's own (``secrets.token_urlsafe``), so a result file's name never comes
from a client.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from torchsurgeon.remote.store_rows import JOB_ID, StoredJob, parse_row

__all__ = ["JobStore", "StoredJob"]

SCHEMA_VERSION = 2
"""1: the jobs table; 2: ``result_sha256`` (added to a version 1 store when it opens)."""

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
    result_sha256 TEXT,
    UNIQUE (owner, request_key)
)
"""
_QUARANTINE = """
CREATE TABLE IF NOT EXISTS quarantine (job_id, reason TEXT, moved REAL, row TEXT)
"""
_COLUMNS = (
    "id, owner, model, state, submitted, started, finished, attempts, request_key, digest, "
    "request IS NOT NULL, result_bytes, error, result_sha256"
)
_FIELDS = {"state", "started", "finished", "attempts", "result_bytes", "error", "result_sha256"}
_PROBE, _PROBE_BYTES = "space-probe", 1 << 16
_log = logging.getLogger(__name__)


class JobStore:
    """The jobs table and result files of one host (``directory=None``: a temporary one)."""

    probe_seconds = 1.0
    """While the disk is full: how often :meth:`writable` tries a test write."""

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
        self._lock, self._probing = threading.Lock(), threading.Lock()
        self.full = False
        """The last write failed for lack of space (new work is refused until it passes)."""
        self.failing: str | None = None
        """Why the last database write failed, other than a full disk (None once one passes)."""
        self.quarantined: list[str] = []
        """Rows moved to the quarantine table at this start: ``"id: reason"``."""
        self.moved_aside: Path | None = None
        """Where a corrupt database found at start went."""
        self._pending: dict[str, dict[str, Any] | None] = {}  # waiting for space; None: delete
        self._next_probe = 0.0
        self._closed = False
        for path in [*self.results.glob("*.partial"), self.directory / _PROBE]:
            path.unlink(missing_ok=True)  # before the database needs their space
        try:
            self._db = self._open(self.directory / "jobs.sqlite3")
        except BaseException:
            self._owner.close()
            raise

    def _open(self, path: Path) -> sqlite3.Connection:
        """The database, checked; a corrupt one is moved aside and a fresh one made."""
        db = None
        try:
            db = _connect(path)
            problem = _quick_check(db)
        except sqlite3.DatabaseError as failure:
            if isinstance(failure, sqlite3.OperationalError):  # full, locked: not corrupt
                if db is not None:
                    db.close()
                raise ValueError(f"{path}: the job store cannot be opened: {failure}") from None
            problem = str(failure)
        if problem is not None:
            if db is not None:
                db.close()
            self.moved_aside = _move_aside(self.directory, path, self.results)
            _log.error(
                "torchsurgeon host: the job store %s is corrupt (%s); moved it and its result "
                "files to %s and started a fresh, empty one",
                path,
                problem,
                self.moved_aside,
            )
            db = _connect(path)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            db.close()
            raise ValueError(
                f"{self.directory}: the job store has schema version {version}; this "
                f"torchsurgeon reads versions 1 to {SCHEMA_VERSION}. Use another --state-dir"
            )
        if version != SCHEMA_VERSION:  # written only when it changes: a full disk can start
            db.execute(_SCHEMA)
            db.execute(_QUARANTINE)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "result_sha256" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN result_sha256 TEXT")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return db

    # ----------------------------------------------------------------- rows

    def rows(self) -> list[StoredJob]:
        """Every job, oldest submission first; a row that is not a job is quarantined."""
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS}, rowid FROM jobs ORDER BY submitted, rowid"
            ).fetchall()
        jobs = []
        for row in found:
            try:
                jobs.append(parse_row(row))
            except ValueError as why:
                self._quarantine(row, str(why))
        return jobs

    def _quarantine(self, row: tuple[Any, ...], reason: str) -> None:
        """Move a row that is not a job out of the table (logged; kept in ``quarantine``)."""
        name = row[0] if isinstance(row[0], str) and JOB_ID.fullmatch(row[0]) else None
        self.quarantined.append(f"{row[0]!r}: {reason}")
        _log.error("torchsurgeon host: job row %r quarantined: %s", row[0], reason)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO quarantine (job_id, reason, moved, row) VALUES (?, ?, ?, ?)",
                    (str(row[0]), reason, time.time(), json.dumps(row[:-1], default=repr)),
                )
                db.execute("DELETE FROM jobs WHERE rowid = ?", (row[-1],))
        except sqlite3.Error as failure:
            _log.error("torchsurgeon host: the row stays in place, skipped: %s", failure)
        if name is not None and self.result_path(name).is_file():
            self.quarantine_result(name)

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
        """Set some of ``state, started, finished, attempts, result_bytes, error,
        result_sha256``.

        A finished state drops the kept request bytes; ``error`` is plain data (a dict). A
        change that fails for lack of space is kept and made once space is back.
        """
        if not fields or set(fields) - _FIELDS:
            raise ValueError(f"update takes some of {sorted(_FIELDS)}, got {sorted(fields)}")
        with self._lock:
            earlier = self._pending.get(job_id, {})
            if earlier is None:  # deleted, waiting for space: nothing to update
                return
            self._pending.pop(job_id, None)
        fields = {**earlier, **fields}
        values = dict(fields)
        if values.get("error") is not None:
            values["error"] = json.dumps(values["error"])
        columns = [f"{name} = ?" for name in values]  # names from the allow-list above
        if values.get("state") in ("done", "error", "expired"):
            columns.append("request = NULL")
        try:
            with self._transaction() as db:
                db.execute(
                    f"UPDATE jobs SET {', '.join(columns)} WHERE id = ?",
                    (*values.values(), job_id),
                )
        except sqlite3.Error as failure:
            if _is_full(failure):
                with self._lock:
                    self._pending[job_id] = fields
            raise

    def delete(self, job_id: str) -> None:
        """Forget a job: its row and its result file, or raise with the row kept.

        On a full disk the result file goes first, to give the row's change room; a delete
        that still fails is made once space is back.
        """
        try:
            self._delete_row(job_id)
        except sqlite3.Error as failure:
            if not _is_full(failure):
                raise
            self.remove_result(job_id)
            try:
                self._delete_row(job_id)
            except sqlite3.Error as again:
                if _is_full(again):
                    with self._lock:
                        self._pending[job_id] = None
                raise
        with self._lock:
            self._pending.pop(job_id, None)
        self.remove_result(job_id)

    def _delete_row(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # ----------------------------------------------------------------- result files

    def result_path(self, job_id: str) -> Path:
        return self.results / f"{job_id}.tsresult"

    def write_result(self, job_id: str, data: bytes) -> str:
        """Write a result file completely (a temporary name, fsync, rename into place); its
        SHA-256 (hex), to keep with its row. A failed write leaves no partial file; one that
        failed for lack of space leaves an empty ``.nospace`` marker (:meth:`no_space`)."""
        final = self.result_path(job_id)
        partial = final.with_suffix(".partial")
        try:
            _write_file(partial, data)
            os.replace(partial, final)
        except OSError as failure:
            partial.unlink(missing_ok=True)  # gives its space back now, not at the next start
            self._failed(failure)
            if _is_full(failure):  # an empty file fits where its row's change may not
                with suppress(OSError):
                    final.with_suffix(".nospace").touch()
            raise
        return hashlib.sha256(data).hexdigest()

    def no_space(self) -> set[str]:
        """Jobs whose result did not fit (read at start: never run again, whatever the row
        says; the markers go with the stray files)."""
        return {path.stem for path in self.results.glob("*.nospace")}

    def result_matches(self, job_id: str, sha256: str) -> bool:
        """Whether the result file's bytes have this SHA-256 (:class:`OSError` if unreadable)."""
        digest = hashlib.sha256()
        with open(self.result_path(job_id), "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return hmac.compare_digest(digest.hexdigest(), sha256)

    def quarantine_result(self, job_id: str) -> None:
        """Move a result file that failed its check to ``quarantine/`` (for the operator)."""
        aside = self.directory / "quarantine"
        aside.mkdir(exist_ok=True)
        path = self.result_path(job_id)
        try:
            os.replace(path, aside / path.name)
        except OSError:
            path.unlink(missing_ok=True)

    def remove_result(self, job_id: str) -> None:
        self.result_path(job_id).unlink(missing_ok=True)

    def remove_stray_files(self, keep: set[str]) -> None:
        """Delete partial writes and result files of jobs the table does not hold as done."""
        for path in self.results.iterdir():
            if path.suffix != ".tsresult" or path.stem not in keep:
                path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- space and health

    def writable(self) -> bool:
        """Whether new work can be stored. While the disk is full, at most every
        :attr:`probe_seconds` a small test write checks for space, and once it passes the
        changes that waited for space are made."""
        if not self.full:
            return True
        if time.monotonic() < self._next_probe or not self._probing.acquire(blocking=False):
            return False
        self._next_probe = time.monotonic() + self.probe_seconds
        probe = self.directory / _PROBE
        try:
            _write_file(probe, bytes(_PROBE_BYTES))
        except OSError:
            return False
        finally:
            probe.unlink(missing_ok=True)
            self._probing.release()
        self.full = False
        if not self._flush():
            return False
        _log.warning("torchsurgeon host: the state directory has space again; taking new work")
        return True

    def health(self) -> dict[str, Any]:
        """The store's state for ``/v1/health`` (``ok`` is false while writes fail)."""
        writable = self.writable()
        return {
            "ok": writable and self.failing is None,
            "disk_full": not writable,
            "write_failing": self.failing is not None,
            "quarantined_rows": len(self.quarantined),
            "fresh_after_corruption": self.moved_aside is not None,
        }

    def _flush(self) -> bool:
        """Make the changes that waited for space, in order; whether all were made."""
        with self._lock:
            waiting = list(self._pending.items())
        for job_id, fields in waiting:
            try:
                if fields is None:
                    self.delete(job_id)
                else:
                    self.update(job_id, **fields)
            except (sqlite3.Error, OSError, RuntimeError) as failure:
                _log.error("torchsurgeon host: a stored change still fails: %s", failure)
                return False
        return True

    def _failed(self, failure: BaseException) -> None:
        if _is_full(failure):
            if not self.full:
                _log.error(
                    "torchsurgeon host: the disk of %s is full (%s); new work is refused "
                    "with 507 until space is back",
                    self.directory,
                    failure,
                )
            self.full = True
            self._next_probe = time.monotonic() + self.probe_seconds
        elif isinstance(failure, sqlite3.Error):
            self.failing = f"{type(failure).__name__}: {failure}"

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._pending and not self._closed:
            self._flush()  # a last try: a failed job's row must not say "running"
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
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as failure:
                self._failed(failure)
                raise
            self.failing = None


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: survives a killed process
    return db


def _quick_check(db: sqlite3.Connection) -> str | None:
    """None if ``PRAGMA quick_check`` passes, else what it found."""
    found = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
    return None if found == ["ok"] else " ".join("; ".join(found[:3]).split())[:300]


def _move_aside(directory: Path, path: Path, results: Path) -> Path:
    """Move a corrupt database (with its journal files and result files) to a new folder."""
    aside = directory / f"corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for suffix in ("", "-wal", "-shm"):
        moved = path.with_name(path.name + suffix)
        if moved.exists():
            os.replace(moved, aside / moved.name)
    os.replace(results, aside / results.name)
    results.mkdir()
    return aside


def _is_full(failure: BaseException) -> bool:
    """Whether a write failed for lack of space (``ENOSPC``, quota, SQLite's SQLITE_FULL)."""
    if isinstance(failure, OSError):
        return failure.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(failure, sqlite3.OperationalError):
        code = getattr(failure, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(failure)
    return False


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


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
