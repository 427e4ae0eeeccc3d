"""The Ray scale-out path: a private loopback-only cluster that heals and dies with its host.

Three promises, each checked from outside with ``psutil`` on the processes this test
started (every Ray process of a host descends from the host's process):

- every socket of every Ray process — GCS, raylet, agents, workers, the driver — is bound
  to loopback (an unauthenticated Ray port runs code for whoever reaches it);
- a replica killed with SIGKILL is taken out of rotation and replaced: the jobs after it
  all succeed (equal to local runs) and ``/v1/health`` reports the loss, then the
  replacement;
- a host started with ``--ray`` and killed with SIGKILL leaves no Ray process behind.

All tests here start Ray and are ``slow``; each waits with a deadline and kills whatever it
started (checked by pid and start time) before it ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from plan_cases import BLOCKS, HIDDEN, VOCAB, make_gpt2, token_ids
from requirements import require
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread

pytestmark = pytest.mark.slow

KEY = "key-ray"
_LOOPBACK = ("127.", "::1", "::ffff:127.")
_START_SECONDS = 300.0
MARKER = "TORCHSURGEON_TEST_RAY_HOST"


@pytest.fixture(scope="module")
def psutil() -> Any:
    require("ray", "the Ray tests need `pip install ray`")
    return require("psutil")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ray") / "gpt2"
    make_gpt2().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local(checkpoint: Path) -> torch.nn.Module:
    return ts.wrap(AutoModelForCausalLM.from_pretrained(checkpoint).eval())


def descendants(psutil: Any, pid: int | None = None) -> list[Any]:
    root = psutil.Process(pid) if pid is not None else psutil.Process()
    found = []
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            process.create_time()  # cached: identifies the process even after it is gone
            found.append(process)
    return found


def alive(psutil: Any, processes: list[Any]) -> list[Any]:
    """The processes that still run (``is_running`` compares the start time: no reused pid)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def marked(psutil: Any, marker: str) -> list[Any]:
    """Every live process on this machine whose environment carries ``marker`` (inherited
    from the host this test started: it finds re-parented Ray processes, and processes
    started after a snapshot of the tree — but not Ray's agents, which overwrite their
    environment with their process title; a tree snapshot finds those)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                process.pid != os.getpid()
                and process.environ().get(MARKER) == marker
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
    return found


def survivors(psutil: Any, tree: list[Any], marker: str) -> list[Any]:
    """The processes of ``tree`` still running, and any other carrying ``marker``."""
    left = alive(psutil, tree)
    return left + [p for p in marked(psutil, marker) if p not in left]


def kill_all(psutil: Any, processes: list[Any]) -> None:
    for process in alive(psutil, processes):
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=10)


@pytest.fixture(scope="module")
def hosting(psutil: Any, checkpoint: Path) -> Iterator[tuple[str, Any]]:
    """A host with two Ray replicas; on teardown, checks its stop left no process behind."""
    marker = secrets.token_hex(8)
    # children this process had before (multiprocessing's resource tracker, started by
    # other tests' spawned ranks, lives as long as this process): not the host's
    before = {(p.pid, p.create_time()) for p in descendants(psutil)}
    os.environ[MARKER] = marker  # the pool's owner and every Ray process inherit it
    try:
        app = create_app({"gpt2": checkpoint}, api_keys=[KEY], workers=4, ray_replicas=2)
    finally:
        del os.environ[MARKER]
    tree: list[Any] = []
    try:
        with serve_in_thread(app) as server:
            yield server.url, app
            tree = [p for p in descendants(psutil) if (p.pid, p.create_time()) not in before]
        deadline = time.monotonic() + 30
        while survivors(psutil, tree, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in survivors(psutil, tree, marker)]
        assert not left, f"the stopped host left {left}"
    finally:
        kill_all(psutil, survivors(psutil, tree, marker))


def probe_for(local: torch.nn.Module, i: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(i)
    steer = ts.layers.Add(torch.randn(HIDDEN, generator=g), 0.5)
    probe = ts.select(local).at(f"{BLOCKS['gpt2']}.{i % 3}").insert_after(steer)
    return ts.select(probe).at(f"{BLOCKS['gpt2']}.1").insert_after(ts.layers.Save("h1"))


def assert_same(got: ts.Result, want: ts.Result) -> None:
    assert torch.equal(got.output["logits"], want.output["logits"])
    assert torch.equal(got.saved["h1"], want.saved["h1"])


def health(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/health", timeout=30).json()


# --------------------------------------------------------------------------- loopback


def test_every_ray_process_binds_loopback_only(psutil: Any, hosting: tuple[str, Any]) -> None:
    processes = descendants(psutil)  # the host's Ray processes all descend from this one
    names = {p.name() for p in processes}
    assert {"gcs_server", "raylet"} <= names, names
    listening, exposed = [], []
    for process in [psutil.Process(), *processes]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for connection in process.net_connections(kind="inet"):
                if not connection.laddr:
                    continue
                where = f"{process.name()} {connection.laddr.ip}:{connection.laddr.port}"
                if not str(connection.laddr.ip).startswith(_LOOPBACK):
                    exposed.append(where)
                if connection.status == psutil.CONN_LISTEN:
                    listening.append(where)
    print(f"\nRay processes: {sorted(names)}\nlistening: {listening}")
    assert not exposed, exposed
    assert len(listening) >= 5, listening  # the GCS, the raylet's two, one per worker, ...


# --------------------------------------------------------------------------- replicas


def test_a_killed_replica_is_replaced_and_every_later_job_succeeds(
    psutil: Any, hosting: tuple[str, Any], local: torch.nn.Module
) -> None:
    url, app = hosting
    workers = [p for p in descendants(psutil) if p.name() == "ray::ModelWorker"]
    assert len(workers) == 2, workers
    victim = workers[0]
    victim.kill()  # SIGKILL
    killed = time.monotonic()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    probes = [probe_for(local, i) for i in range(12)]
    with Client(url, KEY, progress=False) as client:
        # Submitted at once and run four at a time: some are handed to the dead replica
        # before (or after) the pool notices, and must run again elsewhere.
        jobs = [client.submit(probe, ids) for probe in probes[:6]]
        for job, probe in zip(jobs, probes[:6], strict=True):
            assert_same(job.result(timeout=_START_SECONDS), ts.run(probe, ids))
        seen = [health(url)]
        for probe in probes[6:]:
            assert_same(client.run(probe, ids, timeout=_START_SECONDS), ts.run(probe, ids))
    deadline = killed + _START_SECONDS
    while not (seen[-1]["ok"] and seen[-1]["replicas"]["replaced"] >= 1):
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.2)
        seen.append(health(url))
    replaced_after = time.monotonic() - killed
    states = [h["replicas"]["state"] for h in seen]
    pool = app.state.host.executor
    after = pool.health(detail=True)
    print(f"\nhealth after the kill: {states[0]} ... {states[-1]}; replaced {replaced_after:.1f} s")
    assert after["state"] == "ok" and after["live"] == 2 and after["replaced"] == 1
    assert victim.pid not in [m["pid"] for m in after["members"]]
    assert not alive(psutil, [victim])
    now = {p.pid for p in descendants(psutil) if p.name() == "ray::ModelWorker"}
    assert {m["pid"] for m in after["members"]} <= now


def test_health_reports_a_lost_replica_before_its_replacement(
    hosting: tuple[str, Any],
) -> None:
    url, app = hosting
    pool = app.state.host.executor
    victim = pool.health(detail=True)["members"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (report := health(url))["replicas"]["state"] == "ok":
        assert time.monotonic() < deadline, "health never noticed the dead replica"
        time.sleep(0.1)
    assert report["ok"] is False and report["replicas"]["state"] == "degraded"
    assert report["replicas"]["live"] == 1
    assert "members" not in report["replicas"]  # no pids on an unauthenticated endpoint
    deadline = time.monotonic() + _START_SECONDS
    while not (report := health(url))["ok"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert report["replicas"]["live"] == 2


def wait_until_healthy(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + _START_SECONDS
    while not (report := health(url))["ok"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    return report


def busy_replica(pool: Any, excluding: int | None = None) -> int:
    """The pid of the replica that runs a job (other than ``excluding``), once one does."""
    deadline = time.monotonic() + 60
    while True:
        members = pool.health(detail=True)["members"]
        busy = [m["pid"] for m in members if m["busy"] and m["pid"] != excluding]
        if busy:
            return busy[0]
        assert time.monotonic() < deadline, members
        time.sleep(0.05)


def test_a_job_whose_replica_dies_under_it_runs_once_more(
    hosting: tuple[str, Any], local: torch.nn.Module
) -> None:
    url, app = hosting
    pool = app.state.host.executor
    wait_until_healthy(url)
    pids = [m["pid"] for m in pool.health(detail=True)["members"]]
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    probe = probe_for(local, 1)
    rerun = pool.health()["rerun"]
    with Client(url, KEY, progress=False) as client:
        try:
            for pid in pids:  # both replicas stopped: the job waits on the one it was given
                os.kill(pid, signal.SIGSTOP)
            job = client.submit(probe, ids)
            running = busy_replica(pool)
            spare = next(p for p in pids if p != running)
            os.kill(spare, signal.SIGCONT)
            os.kill(running, signal.SIGKILL)  # dies with the job: it runs again on the spare
            assert_same(job.result(timeout=_START_SECONDS), ts.run(probe, ids))
            assert pool.health()["rerun"] == rerun + 1
            wait_until_healthy(url)

            pids = [m["pid"] for m in pool.health(detail=True)["members"]]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            job = client.submit(probe, ids)
            first = busy_replica(pool)
            os.kill(first, signal.SIGKILL)
            second = busy_replica(pool, excluding=first)  # the rerun, on the other one
            os.kill(second, signal.SIGKILL)
            with pytest.raises(RemoteError, match="replica_died") as error:
                job.result(timeout=_START_SECONDS)
            assert "retried" in error.value.message
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
    report = wait_until_healthy(url)  # both replaced
    assert report["replicas"]["live"] == 2


# --------------------------------------------------------------------------- dying together


def test_a_sigkilled_host_leaves_no_ray_process_behind(psutil: Any, checkpoint: Path) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torchsurgeon.remote.serve",
        "--model",
        f"gpt2={checkpoint}",
        "--port",
        str(port),
        "--ray",
        "--replicas",
        "1",
    ]
    marker = secrets.token_hex(8)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", MARKER: marker}
    server = subprocess.Popen(command, env=env)
    tree: list[Any] = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + _START_SECONDS
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            assert server.poll() is None, "the serve command exited"
            assert time.monotonic() < deadline, "the serve command did not start"
            time.sleep(0.5)
        tree = descendants(psutil, server.pid)
        assert {"gcs_server", "raylet"} <= {p.name() for p in tree}
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        killed = time.monotonic()
        while (left := survivors(psutil, tree, marker)) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        print(f"\n{len(tree)} processes under the host; {len(left)} alive {gone_after:.1f} s later")
        assert not left, [(p.pid, p.name()) for p in left]
        time.sleep(3)  # and nothing starts again (no Ray call may start a fresh cluster)
        assert not survivors(psutil, tree, marker)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
        kill_all(psutil, survivors(psutil, tree, marker))


# --------------------------------------------------------------------------- co-batching


def test_requests_of_three_keys_merge_on_ray_replicas(
    psutil: Any, checkpoint: Path, local: torch.nn.Module
) -> None:
    keys = ["k1", "k2", "k3"]
    limits = Limits(batch_window_seconds=0.3)
    app = create_app(
        {"gpt2": checkpoint}, api_keys=keys, limits=limits, ray_replicas=2, co_batch=True
    )
    probe = probe_for(local, 1)
    inputs = {key: token_ids(seed=k, batch=k + 1, length=6) for k, key in enumerate(keys)}
    want = {key: ts.run(probe, ids) for key, ids in inputs.items()}
    got: dict[str, ts.Result] = {}
    queue = app.state.host.queue

    def run(url: str, key: str) -> None:
        with Client(url, key, progress=False, model="gpt2") as client:
            got[key] = client.run(probe, inputs[key], timeout=_START_SECONDS)

    with serve_in_thread(app) as server:
        for _ in range(6):  # until one pass merged
            threads = [threading.Thread(target=run, args=(server.url, key)) for key in keys]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(_START_SECONDS)
            for key in keys:
                assert got[key].saved["h1"].shape[0] == inputs[key].shape[0]
                diff = (got[key].output["logits"] - want[key].output["logits"]).abs().max()
                assert float(diff) <= 1e-6, key
            if any(size > 1 for size in queue.batch_sizes):
                break
    print(f"\npasses by size on the Ray host: {dict(queue.batch_sizes)}")
    assert any(size > 1 for size in queue.batch_sizes), dict(queue.batch_sizes)
