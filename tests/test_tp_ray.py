"""Tensor-parallel ranks as Ray actors: ``serve --tp 2 --ray`` answers like a single host.

``create_app(..., tensor_parallel=2, ray_replicas=1)`` places the two gloo ranks as Ray
actors in one placement group of the host's private cluster (:mod:`torchsurgeon.remote.ray_tp`).
Checked from outside: every case of the distributed battery gives the single-process
host's logits and saved tensors (max abs diff <= 1e-5); the ranks are processes of the
host's Ray cluster (not the host's children); a rank killed with SIGKILL shows in
``/v1/health``, fails the next job with ``replica_died``, and the job after it succeeds on a
fresh group; training equals the single host's; and the stopped host leaves no rank
running. What does not combine is refused when the host starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from requirements import require
from test_distributed import TOLERANCE, UP, WIDTH, make_llama
from test_tp_host import case_diffs

import torchsurgeon as ts
from torchsurgeon.remote import (
    Client,
    LocalCheckpoint,
    RayCluster,
    RemoteError,
    create_app,
    serve_in_thread,
)

pytestmark = pytest.mark.slow  # a Ray cluster, two ranks and two hosts


@pytest.fixture(scope="module")
def psutil() -> Any:
    require("ray", "the Ray tests need `pip install ray`")
    return require("psutil")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp-ray") / "llama"
    make_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hosts(psutil: Any, checkpoint: Path) -> Iterator[dict[str, Any]]:
    served = {"llama": checkpoint, "llama-converted": LocalCheckpoint(checkpoint, convert=True)}
    single = create_app(served)
    sharded = create_app(served, tensor_parallel=2, ray_replicas=1)
    pool = sharded.state.host.executor
    ranks: list[Any] = []
    with (
        serve_in_thread(single) as one,
        serve_in_thread(sharded) as two,
        Client(one.url, progress=False, model="llama") as plain,
        Client(two.url, progress=False, model="llama") as on_ray,
    ):
        ranks = [psutil.Process(m["pid"]) for m in pool.health(detail=True)["members"]]
        yield {"single": plain, "tp": on_ray, "pool": pool, "psutil": psutil, "ranks": ranks}
    _, left = psutil.wait_procs(ranks, timeout=30)
    assert not left, f"the stopped host left ranks {[p.pid for p in left]} running"


def _ids(seed: int, rows: int = 5) -> torch.Tensor:
    return torch.randint(1, 64, (rows, 7), generator=torch.Generator().manual_seed(seed))


def test_every_case_on_ray_ranks_equals_the_single_process_host(hosts: dict[str, Any]) -> None:
    worst = case_diffs(hosts["single"], hosts["tp"])
    print("max abs diff, tp=2 on Ray vs single-process host:", worst)
    assert max(worst.values()) <= TOLERANCE, worst
    health = hosts["tp"]._json("GET", "/v1/health")["replicas"]
    assert health == {"state": "ok", "live": 2, "ranks": 2, "restarts": 0, "placement": "PACK"}
    # the ranks are Ray worker processes, not processes this host spawned itself
    children = {p.pid for p in hosts["psutil"].Process().children()}
    assert all(rank.pid not in children and rank.is_running() for rank in hosts["ranks"])


def test_a_converted_model_on_ray_ranks_equals_the_single_process_host(
    hosts: dict[str, Any],
) -> None:
    worst = case_diffs(hosts["single"], hosts["tp"], converted=True)
    print("max abs diff, converted, tp=2 on Ray vs single-process host:", worst)
    assert max(worst.values()) <= TOLERANCE, worst


def test_training_on_ray_ranks_equals_the_single_process_host(hosts: dict[str, Any]) -> None:
    base = ts.wrap(make_llama())
    probe = ts.select(base).at("model.layers.0").insert_after(ts.layers.Add(torch.zeros(32)))
    a = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    adapter = ts.layers.LowRankAdapter(a, torch.zeros(WIDTH, 2), 1.0)
    probe = ts.select(probe).at(UP).insert_after(adapter)  # a column-wise shard: summed
    settings = {
        "loss": ts.out("logits")[:, -1].logsumexp(-1).mean(),
        "params": ["model.layers.0.ts_after.0", f"{UP}.ts_after.0"],
        "optimizer": ts.optim.SGD(lr=0.5),
        "steps": 2,
    }
    batches = [_ids(3, rows=2), _ids(4, rows=2)]
    want = hosts["single"].train(probe, batches, **settings)
    got = hosts["tp"].train(probe, batches, **settings)
    assert got.tensors.keys() == want.tensors.keys() and len(got.tensors) == 3
    for g, w in zip(got.losses, want.losses, strict=True):
        assert abs(g - w) <= TOLERANCE * abs(w)
    diffs = {k: float((got.tensors[k] - t).abs().max()) for k, t in want.tensors.items()}
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert float(want.tensors[f"{UP}.ts_after.0.b"].abs().max()) > 1e-3  # it trained


def test_a_killed_rank_fails_one_job_and_a_fresh_group_serves_the_next(
    hosts: dict[str, Any],
) -> None:
    pool, psutil = hosts["pool"], hosts["psutil"]
    base = ts.wrap(make_llama())
    probe = ts.select(base).at("model.layers.1").insert_after(ts.layers.Save("x"))
    ids = _ids(2, rows=2)
    want = hosts["single"].run(probe, ids).saved["x"]
    victim = psutil.Process(pool.health(detail=True)["members"][1]["pid"])
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    deadline = time.monotonic() + 30  # the owner's monitor pings the ranks twice a second
    while pool.health()["live"] != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool.health()["state"] == "down" and pool.health()["live"] == 1
    with pytest.raises(RemoteError) as failed:
        hosts["tp"].run(probe, ids)
    assert failed.value.code == "replica_died", failed.value
    got = hosts["tp"].run(probe, ids).saved["x"]
    assert float((got - want).abs().max()) <= TOLERANCE
    health = pool.health(detail=True)
    assert health["state"] == "ok" and health["restarts"] == 1
    hosts["ranks"].extend(psutil.Process(m["pid"]) for m in health["members"])


def test_what_does_not_combine_with_ray_ranks_is_refused_at_start(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="one group of ranks"):
        create_app({"llama": checkpoint}, tensor_parallel=2, ray_replicas=2)
    with pytest.raises(ValueError, match="on Ray run on CPU"):
        create_app(
            {"llama": checkpoint},
            tensor_parallel=2,
            ray_replicas=1,
            tensor_parallel_device="cuda",
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def two_nodes(psutil: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An operator's Ray cluster of two nodes (``ray start --block``, one CPU each, both on
    loopback), with token authentication (set for this test in this process's environment,
    which the host's pool owner inherits); the address of its head. Every process the two
    ``ray start`` started is stopped at the end."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    address = f"127.0.0.1:{_free_port()}"
    ray_start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1"]
    local = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = [*ray_start, "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    started = [subprocess.Popen([*head, *local], env=env, start_new_session=True, **quiet)]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS answers before the second node may join
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", int(address.split(":")[1])), 1),
            ):
                break
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        worker = [*ray_start, f"--address={address}", *local]
        started.append(subprocess.Popen(worker, env=env, start_new_session=True, **quiet))
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # what the host's owner inherits
            monkeypatch.setenv(key, env[key])
        yield address
    finally:  # the second node first (it drains through the head), then the head
        descendants = []
        for process in started:
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(process.pid).children(recursive=True)
        for process in reversed(started):
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(40)
        for process in [*started, *descendants]:
            with contextlib.suppress(psutil.Error, OSError):
                process.kill()


def test_ranks_spread_over_the_nodes_of_a_joined_cluster_equal_the_single_host(
    hosts: dict[str, Any], checkpoint: Path, two_nodes: str
) -> None:
    cluster = RayCluster(address=two_nodes, placement="STRICT_SPREAD")  # a node per rank
    app = create_app({"llama": checkpoint}, tensor_parallel=2, ray_replicas=1, ray_cluster=cluster)
    base = ts.wrap(make_llama())
    probe = ts.select(base).at(UP).insert_after(ts.layers.Save("up"))  # gathered
    scale = ts.layers.Scale(2.0, index=ts.idx[..., 4700:4800])  # both shards, inside a region
    probe = ts.select(probe).at("model.layers.1.mlp.act_fn").insert_after(scale)
    ids = _ids(6)
    with serve_in_thread(app) as server, Client(server.url, progress=False, model="llama") as tp:
        health = tp._json("GET", "/v1/health")["replicas"]
        members = app.state.host.executor.health(detail=True)["members"]
        got, want = tp.run(probe, ids), hosts["single"].run(probe, ids)
    assert health["state"] == "ok" and health["placement"] == "STRICT_SPREAD"
    assert len({member["node"] for member in members}) == 2, members  # two Ray nodes
    assert float((got.saved["up"] - want.saved["up"]).abs().max()) <= TOLERANCE
    assert float((got.output["logits"] - want.output["logits"]).abs().max()) <= TOLERANCE


def test_joining_a_cluster_without_token_authentication_is_refused(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cluster = RayCluster(address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="needs Ray's token authentication"):
        create_app({"llama": checkpoint}, tensor_parallel=2, ray_replicas=1, ray_cluster=cluster)
    with pytest.raises(ValueError, match="placement must be one of"):
        RayCluster(placement="EVERYWHERE")
    with pytest.raises(ValueError, match="'host:port' of a running cluster's head"):
        RayCluster(address="ray://somewhere:10001")
    with pytest.raises(ValueError, match="it needs ray_replicas"):
        create_app({"llama": checkpoint}, tensor_parallel=2, ray_cluster=RayCluster())
