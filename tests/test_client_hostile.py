"""A hostile or absent host cannot exhaust, hang or confuse the client.

Answers are bounded (result and JSON bytes, gzip ratio, ``Content-Length``, JSON nesting,
structure nodes and depth) and refused with a ``RemoteError`` naming the bound; Ctrl-C while
waiting deletes the job on the host and names it; a dead port or a malformed URL fails at
once with one clear line.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from plan_cases import make_gpt2, token_ids

import torchsurgeon as ts
import torchsurgeon.remote.client as client_module
from torchsurgeon.plans import plan, structure_of
from torchsurgeon.remote import ApiError, Client, Job, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.client import AnswerLimits
from torchsurgeon.remote.result_wire import encode_result

MiB = 1 << 20


class Served:
    """What a mock host sent: the bytes its streamed bodies yielded."""

    def __init__(self) -> None:
        self.sent = 0

    def stream(self, data: bytes, piece: int = 64 << 10) -> Iterator[bytes]:
        for start in range(0, len(data), piece):
            self.sent += len(data[start : start + piece])
            yield data[start : start + piece]


def mocked(respond: Callable[[httpx.Request], httpx.Response], **options: Any) -> Client:
    client = Client("http://hostile.invalid", model="gpt2", progress=False, **options)
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(respond))
    return client


def job_host(result: Callable[[], httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    """A host that queues every run as job ``j1``, done at once, whose result is ``result()``."""

    def respond(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models/gpt2/jobs":
            return httpx.Response(202, json={"id": "j1", "state": "queued"})
        if path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "state": "done", "version": 2})
        if path == "/v1/jobs/j1/result":
            return result()
        return httpx.Response(200, json={"id": "j1", "deleted": True})

    return respond


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return ts.wrap(make_gpt2())


# --------------------------------------------------------------------------- answer sizes


def test_a_gzip_bomb_is_refused_by_its_ratio_without_inflating_it(gpt2: Any) -> None:
    bomb = gzip.compress(bytes(256 * MiB), compresslevel=9)  # ~250 KiB on the wire
    served = Served()

    def result() -> httpx.Response:
        headers = {"content-type": "application/octet-stream", "content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, content=served.stream(bomb))

    tracemalloc.start()
    try:
        with (
            mocked(job_host(result)) as client,
            pytest.raises(RemoteError, match="max_compression_ratio=100") as error,
        ):
            client.run(plan(gpt2), token_ids())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (error.value.code, error.value.field) == ("too_large", "max_compression_ratio")
    assert peak < 32 * MiB, f"the client held {peak} bytes for a {len(bomb)}-byte answer"


def test_a_result_over_max_result_bytes_is_refused_while_streaming(gpt2: Any) -> None:
    served = Served()

    def result() -> httpx.Response:  # no Content-Length: chunked, as a plain long body comes
        body = served.stream(bytes(16 * MiB))
        return httpx.Response(
            200, headers={"content-type": "application/octet-stream"}, content=body
        )

    with mocked(job_host(result), max_result_bytes=MiB) as client:
        assert client.limits.max_result_bytes == MiB
        with pytest.raises(RemoteError, match=r"over the client's max_result_bytes=1048576"):
            client.run(plan(gpt2), token_ids())
    assert served.sent < 3 * MiB, "the client read on past its bound (16 MiB sent)"
    assert AnswerLimits().max_result_bytes == 1 << 30


def test_a_huge_content_length_is_a_remote_error(gpt2: Any) -> None:
    def result() -> httpx.Response:
        headers = {"content-type": "application/octet-stream", "content-length": str(1 << 60)}
        return httpx.Response(200, headers=headers, content=iter([b"x" * 10]))

    with (
        mocked(job_host(result)) as client,
        pytest.raises(RemoteError, match=r"announces 1152921504606846976 bytes") as error,
    ):
        client.run(plan(gpt2), token_ids())
    assert (error.value.code, error.value.field) == ("too_large", "max_result_bytes")


def test_a_result_within_the_bounds_still_comes_back(gpt2: Any) -> None:
    data = encode_result(ts.Result({"logits": torch.arange(12.0)}, {}))

    def result() -> httpx.Response:
        headers = {"content-type": "application/octet-stream", "content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, content=iter([gzip.compress(data)]))

    with mocked(job_host(result)) as client:
        assert client.run(plan(gpt2), token_ids()).output["logits"].tolist() == list(range(12))


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_a_remote_error(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=nested)

    with mocked(respond) as client:
        with pytest.raises(RemoteError, match=rf"nests {depth} levels deep.*max_json_depth=32"):
            client.models()
        with pytest.raises(RemoteError, match="max_json_depth") as error:
            Job(client, "j1", "gpt2").status()
    assert (error.value.code, error.value.field) == ("too_large", "max_json_depth")


def test_a_json_answer_over_max_json_bytes_is_refused() -> None:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"models": ["x" * 4096] * 64})

    with (
        mocked(respond, limits=AnswerLimits(max_json_bytes=64 << 10)) as client,
        pytest.raises(RemoteError, match="max_json_bytes=65536") as error,
    ):
        client.models()
    assert error.value.field == "max_json_bytes"


# --------------------------------------------------------------------------- structures


def structure_host(served: dict[str, Any]) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=served)

    return respond


def test_a_20000_layer_config_is_refused_at_max_structure_nodes(gpt2: Any) -> None:
    served = structure_of(gpt2).to_json()
    served["config"] = {**served["config"], "n_layer": 20_000}
    start = time.monotonic()
    with (
        mocked(structure_host(served)) as client,
        pytest.raises(RemoteError, match=r"over the client's max_structure_nodes=20000"),
    ):
        client.meta("gpt2")
    assert time.monotonic() - start < 60
    with mocked(structure_host(structure_of(gpt2).to_json())) as client:
        assert client.meta("gpt2") is not None  # the counting hook is gone again


def tree(paths: list[str]) -> dict[str, Any]:
    served = structure_of(ts.wrap(make_gpt2())).to_json()
    nodes = [{"path": p, "module": "torch.nn", "qualname": "Sequential"} for p in ["", *paths]]
    return {**served, "kind": "tree", "config": None, "nodes": nodes}


@pytest.mark.parametrize(
    ("paths", "bound"),
    [
        ([str(i) for i in range(20_001)], "max_structure_nodes"),
        ([".".join("0" * (i + 1)) for i in range(100)], "max_structure_depth"),
    ],
)
def test_a_tree_structure_over_a_bound_is_refused_before_building(
    paths: list[str], bound: str
) -> None:
    with (
        mocked(structure_host(tree(paths))) as client,
        pytest.raises(RemoteError, match=rf"over the client's {bound}=") as error,
    ):
        client.meta("gpt2")
    assert (error.value.code, error.value.field) == ("too_large", bound)


# --------------------------------------------------------------------------- Ctrl-C


@pytest.fixture(scope="module")
def busy_host(gpt2: Any) -> Iterator[tuple[str, Any]]:
    """A loopback host with one worker, kept busy by a job that waits for ``release``."""
    app = create_app({"gpt2": gpt2}, workers=1)
    host = app.state.host
    release = threading.Event()
    with serve_in_thread(app) as server:
        host.queue.submit(host.owner(None), "gpt2", lambda _: release.wait(300) and b"")
        try:
            yield server.url, host
        finally:
            release.set()


def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocking run's submission answers at once, and long polls last a second (so the
    host has no poll of an interrupted client left to finish when it stops)."""
    monkeypatch.setattr(client_module, "_ANSWER_WAIT", 0.05)
    monkeypatch.setattr(client_module, "_POLL_SECONDS", 1.0)


def interrupt_the_second_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the long poll: the second status call raises ``KeyboardInterrupt``."""
    status, calls = Job.status, []

    def interrupted(self: Job, **kwargs: Any) -> Any:
        calls.append(kwargs)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return status(self, **kwargs)

    monkeypatch.setattr(Job, "status", interrupted)


def deleted_job(stderr: str, host: Any) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    found = re.fullmatch(r"torchsurgeon: interrupted; job (\S+) deleted on http://\S+", lines[0])
    assert found, lines[0]
    with pytest.raises(ApiError) as unknown:
        host.queue.get(found[1], host.owner(None))
    assert unknown.value.status == 404
    return found[1]


def test_ctrl_c_in_a_run_deletes_its_job_and_names_it(
    busy_host: tuple[str, Any],
    gpt2: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, host = busy_host
    quick_polls(monkeypatch)
    interrupt_the_second_status(monkeypatch)
    with Client(url, progress=False) as client:
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            client.run(plan(gpt2), token_ids())
        assert time.monotonic() - start < 5
    deleted_job(capsys.readouterr().err, host)


def test_ctrl_c_in_a_job_wait_deletes_the_job(
    busy_host: tuple[str, Any],
    gpt2: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, host = busy_host
    quick_polls(monkeypatch)
    with Client(url, progress=False) as client:
        job = client.submit(plan(gpt2), token_ids())
        interrupt_the_second_status(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            job.result(timeout=30)
    assert deleted_job(capsys.readouterr().err, host) == job.id


def test_ctrl_c_before_the_submission_is_answered_deletes_the_job_it_made(
    busy_host: tuple[str, Any],
    gpt2: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, host = busy_host
    quick_polls(monkeypatch)
    read_answer, made = client_module.read_answer, []

    def interrupted(response: httpx.Response, *args: Any) -> Any:
        answer = read_answer(response, *args)
        if response.request.method == "POST" and not made:  # Ctrl-C before it is read
            made.append(json.loads(answer.body)["id"])
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(client_module, "read_answer", interrupted)
    with Client(url, progress=False) as client, pytest.raises(KeyboardInterrupt):
        client.run(plan(gpt2), token_ids())
    assert deleted_job(capsys.readouterr().err, host) == made[0]


def test_a_real_sigint_during_the_long_poll_deletes_the_job(
    busy_host: tuple[str, Any],
    gpt2: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, host = busy_host
    quick_polls(monkeypatch)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by something else here")
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    timer = threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGINT))
    with Client(url, progress=False) as client:
        start = time.monotonic()
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                client.run(plan(gpt2), token_ids())  # queued behind the busy worker
        finally:
            timer.cancel()  # never a signal after the run (it cannot end while the host is busy)
            timer.join()
        assert time.monotonic() - start < 6
    deleted_job(capsys.readouterr().err, host)


# --------------------------------------------------------------------------- reaching the host


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_dead_port_fails_at_once_with_one_line() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", reconnect_seconds=60) as client:
        start = time.monotonic()
        with pytest.raises(RemoteError, match="nothing accepts connections there") as error:
            client.models()
        assert time.monotonic() - start < 5
    assert error.value.code == "unreachable" and "\n" not in str(error.value)


def test_a_host_that_was_reached_is_retried_when_it_drops() -> None:
    calls = []

    def respond(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"models": []})

    with mocked(respond, reconnect_seconds=30) as client:
        assert client.models() == [] and client.models() == []
    assert len(calls) == 3 and client.reconnects == 1


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8000",
        "localhost:8000",
        "ftp://127.0.0.1:8000",
        "http://",
        "http:///v1",
        "http://127.0.0.1:notaport",
        "",
    ],
)
def test_a_malformed_url_is_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="host URL"):
        Client(url)
