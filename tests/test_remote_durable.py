"""A host's jobs outlive the host: restarts, retried submissions, clients that reconnect.

The fast tests build a host in this process on a state directory whose rows were written
as a crash or a stop leaves them (queued, running when the host went down, queued again by
a stopping host, a lost result file) and check what the host restarted on it answers (a job
that was running when the host went down is never run again: it may be what took it down);
they retry submissions with and without the same request id, and point clients at hosts
that are gone. The slow test is the real thing: it
starts ``python -m torchsurgeon.remote.serve`` on a state directory, SIGKILLs it while 20
clients wait, starts it again, and checks that every client gets its result (equal to a
local run) or a ``RemoteError`` naming what happened; then it SIGTERMs the host while a
job runs and an upload stalls, and times how long it takes to exit.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
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
from plan_cases import VOCAB, make_gpt2, token_ids
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts
from torchsurgeon.plans import execute, plan
from torchsurgeon.remote import ApiError, Client, Limits, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.background import BackgroundServer
from torchsurgeon.remote.client import Job
from torchsurgeon.remote.result_wire import decode_result
from torchsurgeon.remote.store import JobStore
from torchsurgeon.remote.transfer import encode_request

KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return ts.wrap(make_gpt2())


def probe_of(base: nn.Module) -> nn.Module:
    return ts.select(base).at("transformer.h.1").insert_after(ts.layers.Save("h1"))


def assert_equal_results(got: ts.Result, want: ts.Result) -> None:
    assert torch.equal(got.output["logits"], want.output["logits"])
    assert got.saved.keys() == want.saved.keys()
    for key, value in want.saved.items():
        assert torch.equal(got.saved[key], value), key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post(url: str, model: str, body: bytes, key: str, request_id: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["Idempotency-Key"] = request_id
    return httpx.post(f"{url}/v1/models/{model}/jobs", content=body, headers=headers)


# --------------------------------------------------------------------------- restarts


def test_a_restarted_host_finishes_what_its_state_dir_holds(
    tmp_path: Path, gpt2: nn.Module
) -> None:
    probe = probe_of(gpt2)
    ids = token_ids(seed=4)
    body = encode_request(plan(probe).to_bytes(), [ids], {})
    first = create_app({"gpt2": gpt2}, api_keys=KEYS, state_dir=tmp_path)
    alice, bob = (first.state.host.owner(k) for k in KEYS)
    first.state.host.stop()

    # The rows a crash leaves behind, written as the host writes them.
    store = JobStore(tmp_path)
    digest = hashlib.sha256(body).hexdigest()
    now = time.time()
    rows = [
        ("queued", alice, "gpt2", "k1", body, {}),
        ("ran-once", alice, "gpt2", None, body, {"state": "running", "attempts": 1}),
        ("ran-twice", alice, "gpt2", None, body, {"state": "running", "attempts": 2}),
        ("stopped-once", alice, "gpt2", None, body, {"state": "queued", "attempts": 1}),
        ("stopped-twice", alice, "gpt2", None, body, {"state": "queued", "attempts": 2}),
        ("lost", alice, "gpt2", None, None, {"state": "done", "result_bytes": 10}),
        ("moved", alice, "gpt5", None, body, {}),
        ("bobs", bob, "gpt2", None, body, {}),
    ]
    for i, (job_id, owner, model, request_key, request, changes) in enumerate(rows):
        store.insert(job_id, owner, model, now + i, request_key, digest, request)
        if changes:
            store.update(job_id, **changes)
    store.close()
    (tmp_path / "results" / "stray.partial").write_bytes(b"half a file")

    host = create_app({"gpt2": gpt2}, api_keys=KEYS, state_dir=tmp_path).state.host
    host.start()
    try:
        queue = host.queue
        jobs = {job_id: queue.get(job_id, owner) for job_id, owner, *_ in rows}
        deadline = time.monotonic() + 60
        while not all(job.state in ("done", "error") for job in jobs.values()):
            assert time.monotonic() < deadline, {k: j.state for k, j in jobs.items()}
            time.sleep(0.02)
        states = {k: (j.state, j.error and j.error.code) for k, j in jobs.items()}
        assert states == {
            "queued": ("done", None),
            "ran-once": ("error", "host_restarted"),  # it may be what took the host down
            "ran-twice": ("error", "host_restarted"),
            "stopped-once": ("done", None),  # a stopping host requeued it
            "stopped-twice": ("error", "host_restarted"),
            "lost": ("error", "result_lost"),
            "moved": ("error", "not_found"),  # validated again before it ran
            "bobs": ("done", None),
        }
        assert "went down while this job ran" in jobs["ran-once"].error.message
        assert "not run again" in jobs["stopped-twice"].error.message
        assert "no model 'gpt5'" in jobs["moved"].error.message
        assert jobs["stopped-once"].attempts == 2
        want = ts.run(probe, ids)
        for job_id in ("queued", "stopped-once", "bobs"):
            saved = decode_result(store.result_path(job_id).read_bytes())
            assert_equal_results(saved, want)
        with pytest.raises(ApiError) as hidden:
            queue.get("bobs", alice)
        assert hidden.value.status == 404  # still another key's job
        # The request id survived the restart: the same request is the same job.
        assert host.submit(alice, "gpt2", body, request_key="k1") is jobs["queued"]
        assert not (tmp_path / "results" / "stray.partial").exists()
    finally:
        host.stop()
    reopened = JobStore(tmp_path)
    kept = {row.id: row.state for row in reopened.rows()}
    reopened.close()
    assert kept["queued"] == "done" and kept["ran-twice"] == "error"


def test_one_host_at_a_time_per_state_dir(tmp_path: Path, gpt2: nn.Module) -> None:
    host = create_app({"gpt2": gpt2}, state_dir=tmp_path).state.host
    with pytest.raises(ValueError, match=r"in use by another host.*own --state-dir"):
        create_app({"gpt2": gpt2}, state_dir=tmp_path)
    host.stop()
    create_app({"gpt2": gpt2}, state_dir=tmp_path).state.host.stop()  # free again


@pytest.mark.slow
def test_an_expired_result_answers_410_not_404(gpt2: nn.Module) -> None:
    app = create_app({"gpt2": gpt2}, limits=Limits(result_ttl_seconds=0.2))
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        job = client.submit(plan(gpt2), token_ids())
        assert job.wait(timeout=60).state == "done"
        deadline = time.monotonic() + 10
        while True:
            try:
                job.status()
            except RemoteError as error:
                assert error.status == 410 and error.code == "expired", error
                assert "result_ttl_seconds=0.2" in error.message
                break
            assert time.monotonic() < deadline, "the result never expired"
            time.sleep(0.1)
        with pytest.raises(RemoteError, match="expired") as gone:
            job.result()
        assert gone.value.status == 410
        with pytest.raises(RemoteError) as unknown:
            Job(client, "no-such-job", "gpt2").status()
        assert unknown.value.status == 404


# --------------------------------------------------------------------------- idempotency


class LoseFirstAnswer(httpx.HTTPTransport):
    """Delivers the first POST, then drops its answer (as a connection reset would)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and not self.lost:
            self.lost += 1
            response.read()
            response.close()
            raise httpx.ReadError("the connection dropped before the answer", request=request)
        return response


def test_a_request_id_names_one_job_per_key(gpt2: nn.Module) -> None:
    body = encode_request(plan(gpt2).to_bytes(), [token_ids()], {})
    other = encode_request(plan(gpt2).to_bytes(), [token_ids(seed=1)], {})
    host = create_app({"gpt2": gpt2}, api_keys=KEYS).state.host
    alice, bob = (host.owner(k) for k in KEYS)
    try:
        first = host.submit(alice, "gpt2", body, request_key="req-1")
        assert host.submit(alice, "gpt2", body, request_key="req-1") is first
        with pytest.raises(ApiError, match="another request") as conflict:
            host.submit(alice, "gpt2", other, request_key="req-1")
        assert (conflict.value.status, conflict.value.code) == (409, "idempotency_conflict")
        assert conflict.value.field == "Idempotency-Key"
        theirs = host.submit(bob, "gpt2", body, request_key="req-1")  # ids are per key
        assert theirs is not first
        assert host.submit(alice, "gpt2", body) is not first  # no id: a new job each time
        assert len(host.queue.store.rows()) == 3
    finally:
        host.stop()


@pytest.mark.slow
def test_the_client_retries_a_lost_answer_without_running_twice(gpt2: nn.Module) -> None:
    body = encode_request(plan(gpt2).to_bytes(), [token_ids()], {})
    app = create_app({"gpt2": gpt2}, api_keys=KEYS)
    store = app.state.host.queue.store
    with serve_in_thread(app) as server:
        url = server.url
        first = post(url, "gpt2", body, KEYS[0], "req-1")
        again = post(url, "gpt2", body, KEYS[0], "req-1")
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        malformed = post(url, "gpt2", body, KEYS[0], "not an id")
        assert malformed.status_code == 400
        assert malformed.json()["error"]["field"] == "Idempotency-Key"
        assert len(store.rows()) == 1

        # The client sends a request id by default, so its retry after a lost answer is safe.
        with Client(url, KEYS[0], progress=False) as client:
            flaky = LoseFirstAnswer()
            client._http = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {KEYS[0]}"}, transport=flaky
            )
            job = client.submit(plan(gpt2), token_ids(seed=2))
            assert flaky.lost == 1 and client.reconnects == 1
            assert job.wait(timeout=60).state == "done"
        assert len(store.rows()) == 2, "the retried POST made a second job"


# --------------------------------------------------------------------------- reconnecting


def test_an_unreachable_host_is_a_remote_error(gpt2: nn.Module) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, progress=False, reconnect_seconds=0.6) as client:
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"unreachable.*did not answer POST") as error:
            client.run(plan(gpt2), token_ids(), model_name="gpt2")
        assert error.value.status == 503
        assert time.monotonic() - start < 10


@pytest.mark.slow
def test_a_client_waiting_across_a_restart_without_state_is_told_so(gpt2: nn.Module) -> None:
    first = BackgroundServer(create_app({"gpt2": gpt2})).start()
    port = first.port
    with Client(first.url, progress=False, reconnect_seconds=60) as client:
        job = client.submit(plan(gpt2), token_ids())
        assert job.wait(timeout=60).state == "done"
        first.stop()
        second: list[BackgroundServer] = []

        def restart() -> None:
            time.sleep(0.5)
            second.append(BackgroundServer(create_app({"gpt2": gpt2}), port=port).start())

        restarter = threading.Thread(target=restart)
        restarter.start()
        try:
            with pytest.raises(RemoteError, match=r"job_lost.*--state-dir") as error:
                job.status()
            assert error.value.status == 404
        finally:
            restarter.join(60)
            for server in second:
                server.stop()


# --------------------------------------------------------------------------- the real host


def slow_gpt2() -> nn.Module:
    """A GPT-2 whose forward over (4, 256) tokens takes a few tenths of a second on a core."""
    torch.manual_seed(1)
    config = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


class Host:
    """``python -m torchsurgeon.remote.serve`` in a subprocess; killed by :meth:`close`."""

    def __init__(self, checkpoint: Path, state: Path, port: int, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable, "-m", "torchsurgeon.remote.serve", "--model", f"gpt2={checkpoint}",
            "--port", str(port), "--state-dir", str(state), "--workers", "3", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Host:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(self.command, env=env)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, "the serve command exited"
            assert time.monotonic() < deadline, "the serve command did not start"
            time.sleep(0.2)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    try:
        yield started
    finally:
        for host in started:
            host.close()


def counts(state: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{state / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())


@pytest.mark.slow
def test_a_killed_host_restarted_on_its_state_dir_answers_every_client(
    tmp_path: Path, hosts: list[Host]
) -> None:
    checkpoint, state, port = tmp_path / "gpt2", tmp_path / "state", free_port()
    slow_gpt2().save_pretrained(checkpoint)
    local = ts.wrap(GPT2LMHeadModel.from_pretrained(checkpoint).eval())
    hosts.append(Host(checkpoint, state, port).start())

    probe = ts.select(local).at("transformer.h.2").insert_after(ts.layers.Save("h2"))
    planned = plan(probe).returning("logits", positions=-1).returning("h2", mean=[1])
    inputs = [token_ids(seed=i, batch=2, length=256) for i in range(20)]
    outcomes: dict[int, Any] = {}

    def wait_for(i: int) -> None:
        with Client(hosts[0].url, progress=False, reconnect_seconds=240) as client:
            try:
                outcomes[i] = client.run(planned, inputs[i], model_name="gpt2", timeout=600)
            except RemoteError as error:
                outcomes[i] = error
            except Exception as error:  # anything else is what this test forbids
                outcomes[i] = ("raw", repr(error))

    clients = [threading.Thread(target=wait_for, args=(i,)) for i in range(20)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 300
    while True:  # kill it mid-run: some answered, one running, some still queued
        seen = counts(state) if (state / "jobs.sqlite3").exists() else {}
        if len(outcomes) >= 2 and seen.get("running", 0) >= 1 and seen.get("queued", 0) >= 1:
            break
        assert len(outcomes) < 20, f"every job finished before the kill: {seen}"
        assert time.monotonic() < deadline, f"no moment to kill the host: {seen}"
        time.sleep(0.05)
    hosts[0].process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    hosts[0].process.wait(30)  # type: ignore[union-attr]
    at_kill, answered_before = counts(state), len(outcomes)

    hosts.append(Host(checkpoint, state, port).start())
    for thread in clients:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in clients), "a client is still waiting"
    raw = {i: o for i, o in outcomes.items() if isinstance(o, tuple)}
    assert not raw, f"raw exceptions reached clients: {raw}"
    errors = {i: o for i, o in outcomes.items() if isinstance(o, RemoteError)}
    assert all(e.code == "host_restarted" for e in errors.values()), errors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host's thread count: the same sums, the same bits
    try:
        for i, outcome in outcomes.items():
            if not isinstance(outcome, RemoteError):
                assert_equal_results(outcome, execute(planned, local, inputs[i]))
    finally:
        torch.set_num_threads(threads)
    left = counts(state)
    assert not left.get("queued") and not left.get("running"), left
    print(
        f"\nkilled with {at_kill} in the store after {answered_before} answers; after the "
        f"restart: {20 - len(errors)} results equal to local runs, {len(errors)} errors"
    )


@pytest.mark.slow
def test_sigterm_stops_the_host_while_a_job_runs_and_an_upload_stalls(
    tmp_path: Path, hosts: list[Host]
) -> None:
    checkpoint, state, port = tmp_path / "gpt2", tmp_path / "state", free_port()
    slow_gpt2().save_pretrained(checkpoint)
    hosts.append(Host(checkpoint, state, port, "--shutdown-timeout", "3").start())
    url = hosts[0].url
    body = encode_request(plan(slow_gpt2()).to_bytes(), [token_ids(batch=4, length=256)], {})
    ids = [httpx.post(f"{url}/v1/models/gpt2/jobs", content=body).json()["id"] for _ in range(4)]
    stalled = socket.create_connection(("127.0.0.1", port))
    try:
        head = b"POST /v1/models/gpt2/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        stalled.sendall(head + b"x")  # and then nothing: the request handler waits for more
        while httpx.get(f"{url}/v1/jobs/{ids[0]}").json()["state"] == "queued":
            time.sleep(0.02)
        start = time.monotonic()
        hosts[0].process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        hosts[0].process.wait(60)  # type: ignore[union-attr]
        stopped = time.monotonic() - start
    finally:
        stalled.close()
    print(f"\nSIGTERM with a job running and an upload stalled: exited in {stopped:.1f} s")
    assert stopped < 20, f"the host took {stopped:.1f} s to stop after SIGTERM"
