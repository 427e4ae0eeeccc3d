"""A host's state directory when it is hostile: a full disk, rows and files that lie.

A full disk is simulated, never made: while :class:`Disk` is full (or a ``.partial`` file it
left holds the space), ``fsync`` of a file in the state directory raises ``ENOSPC`` and the
store's SQLite writes raise "database or disk is full". The host must keep starting, refuse
new work with a 507 until space is back, answer a ``DELETE`` truthfully, and never run again
a job that failed for lack of space. Rows that are not jobs are quarantined, a corrupt
database is moved aside, and a result file that changed on disk is an error, never data.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from plan_cases import make_gpt2
from torch import nn

import torchsurgeon as ts
from torchsurgeon.remote import ApiError, Limits, create_app
from torchsurgeon.remote.jobs import JobQueue, JobRecord
from torchsurgeon.remote.store import JobStore

_WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "PRAGMA USER_VERSION=")


class _FullDb:
    """A connection whose writes fail while its disk is full."""

    def __init__(self, db: sqlite3.Connection, disk: Disk) -> None:
        self._db, self._disk = db, disk

    def execute(self, sql: str, *args: Any) -> Any:
        if self._disk.is_full() and sql.lstrip().upper().replace(" ", "").startswith(
            tuple(w.replace(" ", "") for w in _WRITES)
        ):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class Disk:
    """The state directory's disk: ``full`` (something else filled it) or ``room`` bytes
    left for one file; a ``.partial`` file left in ``results/`` holds the rest."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.full, self.room = root, False, 1 << 40
        real_fsync, real_connect = os.fsync, sqlite3.connect

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.startswith(str(root)) and (
                self.is_full(but=path) or os.fstat(fd).st_size > self.room
            ):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        def connect(*args: Any, **kwargs: Any) -> Any:
            return _FullDb(real_connect(*args, **kwargs), self)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(sqlite3, "connect", connect)
        monkeypatch.setattr(JobStore, "probe_seconds", 0.0, raising=False)

    def is_full(self, but: str = "") -> bool:
        """Full, or a partial file other than ``but`` holds the space."""
        partials = (p for p in (self.root / "results").glob("*.partial") if str(p) != but)
        return self.full or any(partials)


def wait_finished(*jobs: JobRecord, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(job.state in ("done", "error") for job in jobs):
        assert time.monotonic() < deadline, [job.state for job in jobs]
        time.sleep(0.01)


def stored(root: Path) -> dict[str, tuple[Any, ...]]:
    """The rows as SQLite holds them (read with a plain connection)."""
    db = sqlite3.connect(root / "jobs.sqlite3")
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, state, error FROM jobs")}
    finally:
        db.close()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return ts.wrap(make_gpt2())


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_refuses_work_restarts_and_never_reruns_the_failed_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(tmp_path, monkeypatch)
    runs: list[str] = []

    def revive(model: str, request: bytes, deadline: float) -> bytes:
        runs.append(model)
        return b"r" * 100

    queue = JobQueue(1, Limits(), JobStore(tmp_path), revive=revive)
    queue.start()
    disk.room = 50  # the result does not fit
    big = queue.submit("alice", "m", lambda _: b"r" * 100, request=b"request")
    wait_finished(big)
    assert not list((tmp_path / "results").glob("*.partial")), "the failed write stays"
    assert stored(tmp_path)[big.id][0] == "error"
    assert big.error is not None and big.error.code == "insufficient_storage", big.error

    disk.full = True  # something else fills the disk
    with pytest.raises(ApiError) as refused:
        queue.submit("alice", "m", lambda _: b"x", request=b"request")
    assert (refused.value.status, refused.value.code) == (507, "insufficient_storage")
    assert refused.value.field == "state_dir"
    queue.stop()

    restarted = JobQueue(1, Limits(), JobStore(tmp_path), revive=revive)  # still full
    restarted.start()
    try:
        again = restarted.get(big.id, "alice")
        assert again.state == "error" and again.error.code == "insufficient_storage"
        with pytest.raises(ApiError, match="out of disk space"):
            restarted.submit("alice", "m", lambda _: b"x", request=b"request")
        disk.full, disk.room = False, 1 << 40  # space is back: no restart needed
        fresh = restarted.submit("alice", "m", lambda _: b"ok", request=b"request")
        wait_finished(fresh)
        assert fresh.state == "done"
        time.sleep(0.2)
        assert runs == [], "a job that failed for lack of space ran again"
    finally:
        restarted.stop()


def test_a_job_that_did_not_fit_never_runs_again_even_if_its_row_could_not_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(tmp_path, monkeypatch)
    runs: list[str] = []

    def revive(model: str, request: bytes, deadline: float) -> bytes:
        runs.append(model)
        return b"r"

    queue = JobQueue(1, Limits(), JobStore(tmp_path), revive=revive)
    queue.start()

    def fills_the_disk(deadline: float) -> bytes:
        disk.full = True  # its own output, as it is written, leaves no room for its row
        return b"r" * 100

    job = queue.submit("alice", "m", fills_the_disk, request=b"request")
    wait_finished(job)
    queue.stop()  # still full: the row still says running
    assert stored(tmp_path)[job.id][0] == "running"
    disk.full = False  # space is back only after the host stopped

    restarted = JobQueue(1, Limits(), JobStore(tmp_path), revive=revive)
    restarted.start()
    try:
        again = restarted.get(job.id, "alice")
        assert again.state == "error" and again.error.code == "insufficient_storage"
        time.sleep(0.2)
        assert runs == [], "a job that failed for lack of space ran again"
        assert stored(tmp_path)[job.id][0] == "error"
    finally:
        restarted.stop()


def test_a_partial_file_is_removed_before_the_store_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    JobStore(tmp_path).close()
    (tmp_path / "results" / "job.partial").write_bytes(b"half a result")  # a killed write
    Disk(tmp_path, monkeypatch)  # full while the partial file holds the space
    store = JobStore(tmp_path)
    try:
        store.insert("j", "alice", "m", time.time(), None, "", b"request")
        assert [row.id for row in store.rows()] == ["j"]
    finally:
        store.close()


def test_delete_on_a_full_disk_is_true_or_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2: nn.Module
) -> None:
    disk = Disk(tmp_path, monkeypatch)
    app = create_app({"gpt2": gpt2}, state_dir=tmp_path)
    host = app.state.host
    who = host.owner(None)
    with TestClient(app) as http:
        job = host.queue.submit(who, "gpt2", lambda _: b"result", request=b"request")
        wait_finished(job)
        result = host.queue.store.result_path(job.id)
        disk.full = True
        answer = http.delete(f"/v1/jobs/{job.id}")
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "insufficient_storage"
        assert job.id in stored(tmp_path), "an error keeps the row"
        assert http.get(f"/v1/jobs/{job.id}").status_code == 200, "and the job"
        posted = http.post("/v1/models/gpt2/jobs", content=b"not checked: refused first")
        assert posted.status_code == 507 and posted.json()["error"]["field"] == "state_dir"
        health = http.get("/v1/health")
        assert health.status_code == 503 and health.json()["store"]["disk_full"] is True

        disk.full = False
        assert http.get("/v1/health").json() == {
            "ok": True,
            "store": {
                "ok": True,
                "disk_full": False,
                "write_failing": False,
                "quarantined_rows": 0,
                "fresh_after_corruption": False,
            },
        }
        assert http.delete(f"/v1/jobs/{job.id}").status_code == 200
        assert job.id not in stored(tmp_path) and not result.exists()
        assert http.get(f"/v1/jobs/{job.id}").status_code == 404
    host = create_app({"gpt2": gpt2}, state_dir=tmp_path).state.host
    try:
        with pytest.raises(ApiError) as gone:
            host.queue.get(job.id, who)
        assert gone.value.status == 404, "a deleted job came back after a restart"
    finally:
        host.stop()


def test_delete_frees_the_result_file_to_make_room_for_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(tmp_path, monkeypatch)
    store = JobStore(tmp_path)
    store.insert("j", "alice", "m", time.time(), None, "", None)
    store.write_result("j", b"x" * 1000)
    monkeypatch.setattr(disk, "is_full", lambda but="": store.result_path("j").exists())
    store.delete("j")  # the file held the space the row's change needed
    assert store.rows() == [] and not store.result_path("j").exists()
    store.close()


# --------------------------------------------------------------------------- hostile rows


QUARANTINED = ("bad_error", "text_attempts", "bad_state", "bad_time")


def _hostile_rows(root: Path) -> None:
    store = JobStore(root)
    now = time.time()
    for n, job_id in enumerate((*QUARANTINED, "huge_real", "fat")):
        store.insert(job_id, "anonymous", "gpt2", now + n, None, "", None)
        store.update(job_id, state="done", finished=now, result_bytes=10)
        store.write_result(job_id, b"0123456789")
    store.close()
    db = sqlite3.connect(root / "jobs.sqlite3")
    with db:
        db.execute("UPDATE jobs SET error = '{not json' WHERE id = 'bad_error'")
        db.execute("UPDATE jobs SET attempts = 'twice' WHERE id = 'text_attempts'")
        db.execute("UPDATE jobs SET result_bytes = 1e12 WHERE id = 'huge_real'")
        db.execute("UPDATE jobs SET state = 'zombie' WHERE id = 'bad_state'")
        db.execute("UPDATE jobs SET finished = 'noon' WHERE id = 'bad_time'")
        db.execute("UPDATE jobs SET result_bytes = 1000000000000 WHERE id = 'fat'")
    db.close()


def test_rows_a_host_cannot_read_are_quarantined_and_it_starts(
    tmp_path: Path, gpt2: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    _hostile_rows(tmp_path)
    caplog.set_level(logging.ERROR, "torchsurgeon.remote.store")
    limits = Limits(max_result_bytes_per_key=10_000)
    app = create_app({"gpt2": gpt2}, state_dir=tmp_path, limits=limits)
    host = app.state.host
    with TestClient(app) as http:
        who = host.owner(None)
        for job_id in ("fat", "huge_real"):
            job = host.queue.get(job_id, who)
            assert job.state == "done" and job.result_bytes == 10, "the file's size counts"
        host.queue.admit(who)  # not 429 for ever
        for job_id in QUARANTINED:
            assert http.get(f"/v1/jobs/{job_id}").status_code == 404
            assert (tmp_path / "quarantine" / f"{job_id}.tsresult").is_file()
        assert http.get("/v1/health").json()["store"]["quarantined_rows"] == 4
    quarantined = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(quarantined) == 4 and "attempts 'twice' is not a count" in caplog.text
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    moved = {r[0]: r[1] for r in db.execute("SELECT job_id, reason FROM quarantine")}
    db.close()
    assert set(moved) == set(QUARANTINED)
    assert "error is not a JSON object" in moved["bad_error"]


def test_a_corrupt_database_is_moved_aside_and_a_fresh_one_serves(
    tmp_path: Path, gpt2: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    store = JobStore(tmp_path)
    for n in range(30):
        store.insert(f"j{n}", "alice", "gpt2", time.time(), None, "", b"x" * 3000)
    store.close()
    database = tmp_path / "jobs.sqlite3"
    data = bytearray(database.read_bytes())
    data[8192] ^= 0xFF  # a b-tree page's header: opens, reads back, every insert fails
    database.write_bytes(bytes(data))
    caplog.set_level(logging.ERROR, "torchsurgeon.remote.store")

    app = create_app({"gpt2": gpt2}, state_dir=tmp_path)
    host = app.state.host
    with TestClient(app) as http:
        job = host.queue.submit(host.owner(None), "gpt2", lambda _: b"ok", request=b"r")
        wait_finished(job)
        assert job.state == "done"
        health = http.get("/v1/health")
        assert health.status_code == 200
        assert health.json()["store"]["fresh_after_corruption"] is True
    aside = list(tmp_path.glob("corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "jobs.sqlite3").read_bytes() == bytes(data)
    lines = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(lines) == 1 and str(database) in lines[0] and "\n" not in lines[0]


# --------------------------------------------------------------------------- corrupt results


def _done(queue: JobQueue, owner: str, data: bytes) -> JobRecord:
    job = queue.submit(owner, "gpt2", lambda _: data, request=b"r")
    wait_finished(job)
    assert job.state == "done"
    return job


def test_a_result_changed_on_disk_is_an_error_never_data(tmp_path: Path, gpt2: nn.Module) -> None:
    app = create_app({"gpt2": gpt2}, state_dir=tmp_path)
    host = app.state.host
    queue, store = host.queue, host.queue.store
    with TestClient(app) as http:
        who = host.owner(None)
        swapped, other, flipped, fine = (_done(queue, who, bytes([n]) * 5000) for n in range(4))
        store.result_path(swapped.id).write_bytes(store.result_path(other.id).read_bytes())
        path = store.result_path(flipped.id)
        data = bytearray(path.read_bytes())
        data[2500] ^= 0x01
        path.write_bytes(bytes(data))
        for job in (swapped, flipped):
            answer = http.get(f"/v1/jobs/{job.id}/result")
            assert answer.status_code == 500, answer.content[:50]
            assert answer.json()["error"]["code"] == "result_corrupt"
            assert http.get(f"/v1/jobs/{job.id}").json()["error"]["code"] == "result_corrupt"
            assert http.get(f"/v1/jobs/{job.id}/result").status_code == 422  # failed for good
            assert (tmp_path / "quarantine" / f"{job.id}.tsresult").is_file()
        assert http.get(f"/v1/jobs/{fine.id}/result").content == bytes([3]) * 5000
    rows = {row.id: row for row in JobStore(tmp_path).rows()}
    assert rows[fine.id].result_sha256 == hashlib.sha256(bytes([3]) * 5000).hexdigest()
    assert rows[swapped.id].state == "error"


def test_a_version_1_store_gains_the_digest_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, "
        "state TEXT NOT NULL, submitted REAL NOT NULL, started REAL, finished REAL, attempts "
        "INTEGER NOT NULL DEFAULT 0, request_key TEXT, digest TEXT NOT NULL DEFAULT '', "
        "request BLOB, result_bytes INTEGER, error TEXT, UNIQUE (owner, request_key))"
    )
    db.execute(
        "INSERT INTO jobs (id, owner, model, state, submitted) VALUES ('old', 'a', 'm', 'done', 1)"
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    try:
        assert [(r.id, r.result_sha256) for r in store.rows()] == [("old", None)]  # unverified
        store.update("old", result_sha256="0" * 64)
        assert store.rows()[0].result_sha256 == "0" * 64
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_health_is_not_ok_while_database_writes_fail(tmp_path: Path) -> None:
    queue = JobQueue(1, Limits(), JobStore(tmp_path))
    store, real = queue.store, queue.store._db

    class Broken:
        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("INSERT"):
                raise sqlite3.DatabaseError("database disk image is malformed")
            return real.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    store._db = Broken()  # type: ignore[assignment]
    with pytest.raises(ApiError) as refused:
        queue.submit("alice", "m", lambda _: b"x")
    assert (refused.value.status, refused.value.code) == (503, "store_failed")
    assert store.health()["ok"] is False and store.health()["write_failing"] is True
    store._db = real
    queue.submit("alice", "m", lambda _: b"x")
    assert store.health()["ok"] is True
    queue.stop()
