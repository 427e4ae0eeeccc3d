"""The thin remote path: what a small blocking run and a large download cost the host.

A blocking run (``Client.run``: one POST that waits for its answer and forgets the job)
gets its result from the worker in memory — the host's store never writes it — while a
submitted job's result is stored as before, and a blocking request that gives up waiting
leaves a result the store keeps. The host reads a plan it has seen once (same bytes, same
limits) and replays it once. A downloaded result is streamed into one buffer and its large
tensors are views of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from plan_cases import VOCAB, make_gpt2, token_ids
from torch import nn

import torchsurgeon as ts
from torchsurgeon.layers.results import Result
from torchsurgeon.plans import execute, plan
from torchsurgeon.plans.errors import PlanFormatError
from torchsurgeon.remote import Client, Limits, create_app, serve_in_thread
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.jobs import JobQueue
from torchsurgeon.remote.result_wire import decode_result, encode_result
from torchsurgeon.remote.store import JobStore


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return ts.wrap(make_gpt2().eval())


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids whose result the store wrote."""
    written: list[str] = []
    original = JobStore.write_result

    def counted(self: JobStore, job_id: str, data: bytes) -> None:
        written.append(job_id)
        original(self, job_id, data)

    monkeypatch.setattr(JobStore, "write_result", counted)
    return written


def _probe(gpt2: nn.Module) -> nn.Module:
    layer = ts.layers.SetValues(ts.idx[:, -1, [3, 7]], 2.0)
    probe = ts.select(gpt2).at("transformer.h.1.mlp").insert_before(layer)
    return ts.select(probe).at("transformer.h.0").insert_after(ts.layers.Save("h0"))


def _same(a: Result, b: Result) -> bool:
    return torch.equal(a.output["logits"], b.output["logits"]) and torch.equal(
        a.saved["h0"], b.saved["h0"]
    )


@pytest.mark.slow  # starts a host on a loopback port
def test_a_blocking_run_never_reaches_the_store_and_a_submitted_job_does(
    gpt2: nn.Module, writes: list[str]
) -> None:
    probe, ids = _probe(gpt2), token_ids(2, 6)
    want = execute(plan(probe), gpt2, ids)
    app = create_app({"gpt2": gpt2})
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        for _ in range(3):
            assert _same(client.run(probe, ids), want)
        assert writes == []  # handed from the worker to the waiting answer in memory
        store = app.state.host.queue.store
        assert list(store.rows()) == []  # each job forgotten once answered
        job = client.submit(probe, ids)
        assert _same(job.result(), want)
        assert writes == [job.id]  # a job fetched later is stored, as before


def test_a_handed_job_whose_request_gave_up_keeps_its_result_in_the_store(
    writes: list[str],
) -> None:
    queue = JobQueue(1, Limits(), JobStore(None))
    gate = threading.Event()

    def work(deadline: float) -> bytes:
        gate.wait(30)
        return b"the result"

    queue.start()
    try:
        job = queue.submit("alice", "m", work, hand_over=True)
        _wait_for(lambda: job.state == "running")
        assert queue.take(job) is None  # the request stops waiting before the result comes
        gate.set()
        _wait_for(lambda: job.state == "done")
        assert writes == [job.id] and job.held is None
        assert queue.store.result_path(job.id).read_bytes() == b"the result"
        assert queue.status(job)["result_bytes"] == len(b"the result")

        finished = queue.submit("alice", "m", lambda _: b"quick", hand_over=True)
        _wait_for(lambda: finished.state == "done")
        assert queue.take(finished) == b"quick"  # came while handed: from memory
        assert writes == [job.id] and queue.take(finished) is None  # taken once
    finally:
        gate.set()
        queue.stop(timeout=5)


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_plan_is_read_and_replayed_once_per_bytes_and_limits(gpt2: nn.Module) -> None:
    hosted = HostedModel.load("gpt2", gpt2)
    data = plan(_probe(gpt2)).to_bytes()
    first = hosted.read_plan(data, Limits())
    assert hosted.read_plan(data, Limits()) is first
    assert hosted.read_plan(data, Limits(max_steps=10)) is not first  # other limits: read again
    view, _ = hosted.prepare(first, Limits())
    again, _ = hosted.prepare(first, Limits())
    assert again is view
    ids = token_ids(1, 5)
    assert torch.equal(
        ts.run(view, ids).output.logits, execute(plan(_probe(gpt2)), gpt2, ids).output.logits
    )
    with pytest.raises(PlanFormatError):
        hosted.read_plan(data[:-3], Limits())
    with pytest.raises(PlanFormatError):  # a plan that fails is not kept: it fails again
        hosted.read_plan(data[:-3], Limits())


def test_a_result_decoded_from_a_buffer_views_its_large_tensors() -> None:
    big = torch.randn(2, 512, 512)  # 2 MiB: a view
    small = torch.arange(10)
    mask = torch.tensor([True, False, True])
    data = encode_result(Result({"logits": big}, {"k": [small], "m": [mask]}))
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    got = decode_result(buffer)
    assert torch.equal(got.output["logits"], big) and torch.equal(got.saved["k"], small)
    assert torch.equal(got.saved["m"], mask)
    base = buffer.untyped_storage().data_ptr()
    inside = range(base, base + buffer.numel())
    assert got.output["logits"].untyped_storage().data_ptr() in inside  # no copy
    assert got.saved["k"].untyped_storage().data_ptr() not in inside  # small: its own copy
    from_bytes = decode_result(data)
    assert torch.equal(from_bytes.output["logits"], got.output["logits"])
    with pytest.raises(Exception, match="uint8"):
        decode_result(torch.zeros(8, dtype=torch.int32))


@pytest.mark.slow  # starts a host on a loopback port
def test_a_large_download_equals_the_local_result(gpt2: nn.Module, tmp_path: Path) -> None:
    ids = torch.randint(0, VOCAB, (128, 32), generator=torch.Generator().manual_seed(1))
    want = execute(plan(gpt2).returning("logits"), gpt2, ids)
    app = create_app({"gpt2": gpt2})
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        job = client.submit(plan(gpt2).returning("logits"), ids)
        got = job.result()
    assert got.output["logits"].numel() * 4 > 1 << 20
    assert torch.equal(got.output["logits"], want.output["logits"])


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    left = {t.name for t in threading.enumerate()} - before
    assert not {n for n in left if n.startswith("torchsurgeon-worker")}, left
