"""A host whose workers are processes it spawns (``processes=True``): results equal the
in-process host's, requests co-batch there too, and a run stuck inside one kernel — which a
thread cannot be stopped from — is killed with its process at its deadline while a spare
takes its place, so a legitimate key keeps being served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from plan_cases import make_gpt2, token_ids

import torchsurgeon as ts
from torchsurgeon.plans import plan
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread

pytestmark = pytest.mark.slow  # spawns worker processes and starts servers

KEYS = ["legit", "attacker", "third"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("processes") / "gpt2"
    make_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hosts(checkpoint: Path) -> Iterator[dict[str, Any]]:
    limits = Limits(batch_window_seconds=0.2)
    here = create_app({"gpt2": checkpoint}, api_keys=KEYS, limits=limits, co_batch=True)
    spawned = create_app(
        {"gpt2": checkpoint}, api_keys=KEYS, limits=limits, co_batch=True, processes=True
    )
    processes = [p for group in spawned.state.host.executor.processes() for p in group]
    assert len(processes) == 3  # two workers and a spare
    with serve_in_thread(here) as one, serve_in_thread(spawned) as two:
        yield {"here": one.url, "spawned": two.url, "app": spawned}
    assert not any(p.is_alive() for p in processes)  # the host's shutdown stopped them


def _probe() -> Any:
    base = ts.wrap(make_gpt2())
    probe = ts.select(base).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
    return ts.select(probe).at("transformer.h.2.mlp").insert_after(ts.layers.Scale(0.5))


def test_results_equal_the_in_process_host(hosts: dict[str, Any]) -> None:
    probe, ids = _probe(), token_ids()
    with (
        Client(hosts["here"], KEYS[0], progress=False, model="gpt2") as here,
        Client(hosts["spawned"], KEYS[0], progress=False, model="gpt2") as spawned,
    ):
        want, got = here.run(probe, ids), spawned.run(probe, ids)
        assert float((got.output["logits"] - want.output["logits"]).abs().max()) <= 1e-6
        assert float((got.saved["h1"] - want.saved["h1"]).abs().max()) <= 1e-6
        generated = spawned.generate(probe, ids[:1], max_new_tokens=4)
        assert torch.equal(generated.output, here.generate(probe, ids[:1], max_new_tokens=4).output)
        health = spawned._json("GET", "/v1/health")["replicas"]
    assert health["state"] == "ok" and health["live"] == 3


def test_requests_of_three_keys_merge_on_worker_processes(hosts: dict[str, Any]) -> None:
    probe = _probe()
    queue = hosts["app"].state.host.queue
    merged_before = sum(n for size, n in queue.batch_sizes.items() if size > 1)
    inputs = {key: token_ids(seed=k, batch=k + 1, length=6) for k, key in enumerate(KEYS)}
    with Client(hosts["here"], KEYS[0], progress=False, model="gpt2") as here:
        want = {key: here.run(probe, ids, co_batch=False) for key, ids in inputs.items()}
    got: dict[str, ts.Result] = {}

    def run(key: str) -> None:
        with Client(hosts["spawned"], key, progress=False, model="gpt2") as client:
            got[key] = client.run(probe, inputs[key])

    for _ in range(6):  # until one pass merged (the window is 0.2 s)
        threads = [threading.Thread(target=run, args=(key,)) for key in KEYS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for key in KEYS:
            assert got[key].saved["h1"].shape[0] == inputs[key].shape[0]
            diff = (got[key].saved["h1"] - want[key].saved["h1"]).abs().max()
            assert float(diff) <= 1e-6, key
        if sum(n for size, n in queue.batch_sizes.items() if size > 1) > merged_before:
            return
    pytest.fail(f"no pass merged: {dict(queue.batch_sizes)}")


def test_a_run_stuck_in_one_kernel_is_killed_and_others_are_served(checkpoint: Path) -> None:
    model = ts.wrap(make_gpt2())
    h = ts.here
    huge = h[:1, :1, :1].expand(600_000_000, 1000, 1).sum()  # minutes inside one kernel
    attack = ts.select(model).at("lm_head").insert_after(ts.layers.Compute(h + huge))
    probe = ts.select(model).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
    small = plan(probe).returning("h1", mean=[1])
    ids = token_ids()
    # max_work overrides the measured time budget: the attack passes admission, as an op the
    # cost model underestimates would
    limits = Limits(max_run_seconds=1.0, watchdog_grace_seconds=0.5, max_work=1e24)
    app = create_app({"gpt2": checkpoint}, api_keys=KEYS, limits=limits, processes=True)
    executor = app.state.host.executor
    before = {p.pid for group in executor.processes() for p in group}
    outcomes: list[str] = []
    stop = threading.Event()

    def flood(url: str) -> None:
        with Client(url, "attacker", progress=False, timeout=30) as client:
            while not stop.is_set() and len(outcomes) < 2000:
                started = time.monotonic()
                try:
                    client.run(attack, ids)
                    outcomes.append("done")
                except RemoteError as error:
                    outcomes.append(f"{error.code} after {time.monotonic() - started:.1f} s")

    times = []
    with (
        serve_in_thread(app) as server,
        Client(server.url, "legit", progress=False, timeout=30) as client,
    ):
        client.run(small, ids)  # warm
        attacker = threading.Thread(target=flood, args=(server.url,), daemon=True)
        attacker.start()
        try:
            for _ in range(50):
                start = time.monotonic()
                got = client.run(small, ids)
                times.append(time.monotonic() - start)
                assert got.saved["h1"].shape[0] == ids.shape[0]
                time.sleep(0.05)
        finally:
            stop.set()
            attacker.join(timeout=60)
        waited = time.monotonic() + 120
        while (health := executor.health())["state"] != "ok":  # the replacement loads
            assert time.monotonic() < waited, health
            time.sleep(0.2)
        after = {p.pid for group in executor.processes() for p in group}
    killed = [o for o in outcomes if o.startswith("timeout")]
    assert killed, outcomes
    assert "done" not in outcomes
    refused = [o for o in outcomes if o.startswith("overruns")]
    assert refused, outcomes  # the key that overran waits out overrun_cooldown_seconds
    ends = [float(o.split()[2]) for o in killed]
    times.sort()
    fast = sum(t < 2.0 for t in times)
    print(
        f"\n{len(killed)} stuck runs killed (ended after {min(ends):.1f}-{max(ends):.1f} s), "
        f"{len(refused)} refused after, "
        f"{executor.restarts} workers replaced; {fast}/50 small runs under 2 s, "
        f"p95 {times[47]:.2f} s; health {health}"
    )
    assert executor.restarts == len(killed) and len(before - after) == len(killed)
    assert max(ends) <= limits.max_run_seconds + limits.watchdog_grace_seconds + 1.5
    assert fast >= 48, times
