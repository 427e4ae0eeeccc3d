"""The HTTP server in front of a host: half-open connections, a connection cap, nnsight.

A few hundred raw sockets open to a loopback host, some sending nothing and some half a
request head (slowloris); the host must keep answering a normal request at once, and close
every idle socket once ``header_timeout_seconds`` has passed. Past ``max_connections`` (all
past a request head) a new connection is closed as soon as it is accepted. An upload that
stalls gets a 408. And importing nnsight (which mounts ``save`` on ``object``) before
serving must not turn the host's answers into 500s — checked in a fresh interpreter, since
the import is global.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from plan_cases import make_gpt2

from torchsurgeon.remote import Limits, create_app, serve_in_thread
from torchsurgeon.remote.background import BackgroundServer
from torchsurgeon.remote.server import ServerLimits

ROOT = Path(__file__).resolve().parent


@pytest.fixture
def app() -> object:
    return create_app({"gpt2": make_gpt2()}, limits=Limits(request_idle_seconds=0.5))


def connect(server: BackgroundServer, count: int) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        sock = socket.create_connection((server.host, server.port), timeout=5)
        sock.setblocking(False)
        opened.append(sock)
    return opened


def closed_within(sockets: list[socket.socket], seconds: float) -> tuple[int, float]:
    """How many of ``sockets`` the server closed within ``seconds``, and when the last was."""
    pending, closed, last = set(sockets), 0, 0.0
    start = time.monotonic()
    while pending and time.monotonic() - start < seconds:
        readable, _, _ = select.select(list(pending), [], [], 0.05)
        for sock in readable:
            try:
                data = sock.recv(1024)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                closed, last = closed + 1, time.monotonic() - start
                pending.discard(sock)
    return closed, last


@pytest.mark.slow
def test_half_open_connections_are_closed_and_the_host_keeps_answering(app: object) -> None:
    limits = ServerLimits(header_timeout_seconds=1.5, max_connections=1000)
    with serve_in_thread(app, limits=limits) as server:
        idle = connect(server, 150)  # connect, then say nothing
        slow = connect(server, 150)  # half a request head, then nothing
        for sock in slow:
            sock.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        try:
            start = time.monotonic()
            answer = httpx.get(f"{server.url}/v1/health", timeout=10)
            answered = time.monotonic() - start
            assert answer.status_code == 200
            after_response = connect(server, 1)[0]  # kept alive, then stalls mid-head
            after_response.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/he")
            closed, last = closed_within([*idle, *slow], 10.0)
            print(
                f"\n300 half-open connections: a normal request answered in {answered * 1e3:.0f}"
                f" ms; {closed} of them closed, the last {last:.2f} s after the check (header "
                "timeout 1.5 s)"
            )
            assert answered < 2.0
            assert closed == 300
            assert closed_within([after_response], 5.0)[0] == 1
            assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200
        finally:
            for sock in [*idle, *slow]:
                sock.close()


@pytest.mark.slow
def test_connections_past_the_cap_are_closed_at_once(app: object) -> None:
    limits = ServerLimits(header_timeout_seconds=5.0, max_connections=40, keep_alive_seconds=30)
    with serve_in_thread(app, limits=limits) as server:
        held = []
        for _ in range(40):  # each sends a whole request: never displaced by a new connection
            held += connect(server, 1)
            held[-1].send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert select.select(held[-1:], [], [], 5)[0] and held[-1].recv(4096)
        extra = connect(server, 20)
        try:
            closed, last = closed_within(extra, 3.0)
            assert closed == 20, f"only {closed} of the connections past the cap were closed"
            assert closed_within(held, 0.3)[0] == 0  # the first 40 are still open
            print(f"\n20 connections past max_connections=40 closed within {last:.2f} s")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while True:  # once the held ones are gone, the host serves again
            try:
                if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.slow
def test_a_stalled_upload_gets_a_408_naming_the_limit(app: object) -> None:
    with serve_in_thread(app) as server, socket.create_connection((server.host, server.port)) as s:
        s.sendall(
            b"POST /v1/models/gpt2/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            + b"x" * 10
        )
        s.settimeout(10)
        answer = s.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "request_idle_seconds" in answer


@pytest.mark.slow
def test_the_host_serves_after_nnsight_was_imported() -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import nnsight  # mounts .save() on every object
        import torchsurgeon as ts
        from plan_cases import make_gpt2, token_ids
        from torchsurgeon.remote import Client, create_app, serve_in_thread

        model = ts.wrap(make_gpt2())
        probe = ts.select(model).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
        with serve_in_thread(create_app({{"gpt2": model}})) as server:
            with Client(server.url, progress=False) as client:
                got = client.run(probe, token_ids())
        want = ts.run(probe, token_ids())
        assert (got.saved["h1"] == want.saved["h1"]).all()
        assert hasattr(object(), "save"), "nnsight's .save() is gone"
        print("served with nnsight imported")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served with nnsight imported" in done.stdout
