"""Co-batching: different keys' requests in one forward pass, each getting its solo result.

A loopback host started with ``co_batch=True`` and one worker (so requests queue up and
merge) serves clients of three keys at once, with different plans and prompt lengths; every
result must equal the same request run alone, merged passes must actually happen, a
structural rewrite (``replace``) and an opted-out request run alone, and a plan that saves
everything gets only its own rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, make_gpt2
from torch import nn
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon.remote import Client, Limits, create_app, serve_in_thread
from torchsurgeon.remote.batching import RowScope

pytestmark = pytest.mark.slow  # starts a server

KEYS = ["alice", "bob", "carol"]
L = ts.layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cobatch") / "gpt2"
    make_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> nn.Module:
    return ts.wrap(AutoModelForCausalLM.from_pretrained(checkpoint).eval())


@pytest.fixture(scope="module")
def host(checkpoint: Path) -> Iterator[tuple[Any, str]]:
    limits = Limits(batch_window_seconds=0.25)  # wide: requests here arrive ~50 ms apart
    app = create_app({"gpt2": checkpoint}, api_keys=KEYS, workers=1, co_batch=True, limits=limits)
    with serve_in_thread(app) as server:
        yield app, server.url


def ids(seed: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def plans(model: nn.Module) -> list[nn.Module]:
    g = torch.Generator().manual_seed(0)
    save_all = ts.select(model).at("transformer.h.*").insert_after(L.Save("h{layer}"))
    forced = (
        ts.select(model)
        .at("transformer.h.1.mlp")
        .insert_before(L.SetValues(ts.idx[:, -1, [1, 2]], 4.0))
    )
    steered = (
        ts.select(model)
        .at("transformer.h.0")
        .insert_after(L.Add(torch.randn(HIDDEN, generator=g), 2.0))
    )
    patched = ts.select(model).at("transformer.h.1").insert_after(L.Patch(0, [1], index=ts.idx[-1]))
    return [save_all, forced, steered, patched]


def test_merged_requests_equal_their_solo_runs(host: tuple[Any, str], model: nn.Module) -> None:
    app, url = host
    probes = plans(model)
    work = [  # key, probe, inputs: lengths 5 and 7, batches of 2-3 rows
        (KEYS[i % 3], probes[i % 4], ids(i, 2 + i % 2, 5 if i % 3 else 7)) for i in range(24)
    ]
    results: dict[int, ts.Result] = {}
    start = threading.Barrier(3)

    def client(key: str) -> None:
        with Client(url, api_key=key, progress=False) as connected:
            start.wait()
            for i, (owner, probe, inputs) in enumerate(work):
                if owner == key:
                    results[i] = connected.run(probe, inputs)

    before = sum(n * c for n, c in app.state.host.queue.batch_sizes.items() if n > 1)
    threads = [threading.Thread(target=client, args=(key,)) for key in KEYS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == len(work)
    merged = sum(n * c for n, c in app.state.host.queue.batch_sizes.items() if n > 1) - before
    assert merged >= 4, app.state.host.queue.batch_sizes  # some requests really shared a pass
    for i, (_, probe, inputs) in enumerate(work):
        alone = ts.run(probe, inputs)
        got = results[i]
        assert (got.output.logits - alone.output.logits).abs().max() <= 1e-6, i
        assert got.output.logits.shape == alone.output.logits.shape
        assert sorted(got.records) == sorted(alone.records), i
        for key, values in alone.records.items():  # only its own rows, every one of them
            assert [v.shape for v in got.records[key]] == [v.shape for v in values]
            assert all(
                (a - b).abs().max() <= 1e-6 for a, b in zip(got.records[key], values, strict=True)
            )


def test_structural_and_opted_out_requests_run_alone(
    host: tuple[Any, str], model: nn.Module
) -> None:
    from torchsurgeon.remote.batching import batch_key
    from torchsurgeon.remote.execution import prepare_submission
    from torchsurgeon.remote.transfer import encode_request

    app, _ = host
    hosted = app.state.host.models["gpt2"]
    replaced = ts.select(model).at("transformer.h.1.mlp.act").replace(nn.Identity())
    simple = plans(model)[1]
    inputs = ids(1, 2, 5)

    def key_of(probe: nn.Module, **details: Any) -> Any:
        plan = ts.plans.plan(probe) if isinstance(probe, nn.Module) else probe
        body = encode_request(plan.to_bytes(), (), {"input_ids": inputs}, **details)
        runs = prepare_submission(hosted, body, app.state.host.limits)
        return batch_key(hosted, runs, runs[0].inputs.alone)

    assert key_of(simple) is not None
    assert key_of(simple, alone=True) is None
    with pytest.raises(Exception, match=r"not an intervention layer|cannot travel"):
        key_of(replaced)  # a plain module does not travel at all
    reader = (
        ts.select(model).at("transformer.h.1").insert_after(L.Compute(ts.here + ts.saved("h0")))
    )
    reader = ts.select(reader).at("transformer.h.0").insert_after(L.Save("h0"))
    assert key_of(reader) is None  # reads the run: values of other rows could reach it
    assert key_of(ts.plans.plan(simple).with_backward(None).returning("logits")) is not None


def test_row_scope_gives_a_layer_only_its_rows() -> None:
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x * 2

    x = torch.arange(12.0).reshape(4, 3)
    out = RowScope(Spy(), 1, 3, 4, "0")(x)
    assert torch.equal(seen[0], x[1:3])
    assert torch.equal(out, torch.cat([x[:1], 2 * x[1:3], x[3:]]))
