"""The host's memory: each run's estimate gets a share of what the machine allows, and a run
that still takes the process over its ceiling is stopped (``507 host_memory``) before the
kernel kills the host with every other user's work."""

from __future__ import annotations

import time

import pytest
from plan_cases import make_gpt2, token_ids

import torchsurgeon as ts
from torchsurgeon.plans import plan
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, memory, serve_in_thread
from torchsurgeon.remote.memory import fitted, machine_memory, resident_bytes, run_budget

MiB = 1 << 20


def test_each_run_gets_its_share_of_the_machine() -> None:
    assert machine_memory() and machine_memory() > 256 * MiB
    assert resident_bytes() and resident_bytes() > 10 * MiB
    resolved = fitted(Limits(), workers=2)
    assert resolved.max_host_memory_bytes == int(machine_memory() * memory.HOST_FRACTION)
    small = fitted(Limits(max_host_memory_bytes=400 * MiB), workers=4)
    assert small.max_activation_bytes == run_budget(400 * MiB, 4) == 50 * MiB
    assert fitted(Limits(max_activation_bytes=MiB), 2).max_activation_bytes == MiB  # kept
    with pytest.raises(ValueError, match="max_host_memory_bytes"):
        Limits(max_host_memory_bytes=-1)


@pytest.mark.slow
def test_a_run_over_the_hosts_share_is_refused_and_a_run_over_its_ceiling_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ts.wrap(make_gpt2())
    probe = ts.select(model).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
    limits = Limits(max_host_memory_bytes=8 * MiB)  # 2 MiB a run with 2 workers
    app = create_app({"gpt2": model}, limits=limits, workers=2)
    assert app.state.host.limits.max_activation_bytes == 2 * MiB
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        with pytest.raises(RemoteError) as refused:  # estimated over its share: not queued
            client.run(probe, token_ids(batch=64, length=30))
        assert refused.value.status == 422 and refused.value.field == "max_activation_bytes"

        small = plan(probe).returning("h1", mean=[1])
        monkeypatch.setattr(memory, "resident_bytes", lambda: 9 * MiB)  # over the ceiling
        with pytest.raises(RemoteError) as stopped:
            client.run(small, token_ids())
        assert stopped.value.code == "host_memory"  # a job error: 422 on the blocking path
        assert stopped.value.field == "max_host_memory_bytes"
        monkeypatch.setattr(memory, "resident_bytes", lambda: 1 * MiB)  # given back
        time.sleep(2 * memory.CHECK_SECONDS)
        assert client.run(small, token_ids()).saved["h1"].shape[0] == 3
