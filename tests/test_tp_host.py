"""A tensor-parallel host: ``serve --tp 2`` answers like the single-process host.

One Llama checkpoint is served twice, in-process: by a plain host and by a host whose two
gloo ranks each hold half of every sharded weight (``create_app(..., tensor_parallel=2)``,
what ``torchsurgeon serve --tp 2`` builds). Every case of the distributed battery — every
layer type at sharded sites (MLP hidden, gate/up outputs, heads, q/k/v) and at replicated
ones (the residual stream) — sent through ``Client.run`` must give the same logits and the
same saved tensors from both (max abs diff <= 1e-5), and so must gradients (``backward=``)
and generations. What the ranks do not serve is refused when the host starts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import CONVERTED_CASES, LLAMA_CASES, TOLERANCE, make_llama

import torchsurgeon as ts
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread

KEYS = ["k1", "k2", "k3"]

pytestmark = pytest.mark.slow  # spawns two ranks and starts two hosts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp-host") / "llama"
    make_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hosts(checkpoint: Path) -> Iterator[dict[str, Any]]:
    single = create_app({"llama": checkpoint})
    limits = Limits(batch_window_seconds=0.1)
    sharded = create_app(
        {"llama": checkpoint}, tensor_parallel=2, co_batch=True, api_keys=KEYS, limits=limits
    )
    processes = [p for group in sharded.state.host.executor.processes() for p in group]
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    with (
        serve_in_thread(single) as one,
        serve_in_thread(sharded) as two,
        Client(one.url, progress=False, model="llama") as plain,
        Client(two.url, KEYS[0], progress=False, model="llama") as ranks,
    ):
        yield {"single": plain, "tp": ranks, "app": sharded, "url": two.url}
    assert not any(p.is_alive() for p in processes)  # the host's shutdown stopped its ranks


def _tensors(result: ts.Result) -> dict[str, torch.Tensor]:
    output = result.output
    logits = output if isinstance(output, torch.Tensor) else output["logits"]
    return {"logits": logits, **{k: v for k, v in result.saved.items()}}


def case_diffs(single: Client, sharded: Client, *, converted: bool = False) -> dict[str, float]:
    """Every case of the distributed battery on both hosts: the max abs diff per case (of
    the converted model's cases, on ``"llama-converted"``, with ``converted``)."""
    base = ts.wrap(ts.convert(make_llama()) if converted else make_llama())
    cases, model = (CONVERTED_CASES, "llama-converted") if converted else (LLAMA_CASES, "llama")
    ids = torch.randint(1, 64, (5, 7), generator=torch.Generator().manual_seed(0))
    worst: dict[str, float] = {}
    for name, probe in cases.items():
        tree = probe(base)
        want = _tensors(single.run(tree, ids, model_name=model))
        got = _tensors(sharded.run(tree, ids, model_name=model))
        assert got.keys() == want.keys(), name
        worst[name] = max(float((got[k] - want[k]).abs().max()) for k in want)
    return worst


def test_every_case_equals_the_single_process_host(hosts: dict[str, Any]) -> None:
    worst = case_diffs(hosts["single"], hosts["tp"])
    print("max abs diff, tp=2 host vs single-process host:", worst)
    assert max(worst.values()) <= TOLERANCE, worst
    health = hosts["tp"]._json("GET", "/v1/health")
    assert health["replicas"]["state"] == "ok" and health["replicas"]["ranks"] == 2


def test_gradients_and_generation_on_the_ranks_equal_the_single_host(
    hosts: dict[str, Any],
) -> None:
    base = ts.wrap(make_llama())
    probe = ts.select(base).at("model.layers.0").insert_after(ts.layers.SaveGrad("g"))
    probe = (
        ts.select(probe).at("model.layers.1.mlp.down_proj").insert_before(ts.layers.SaveGrad("h"))
    )
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    loss = ts.out("logits")[:, -1].logsumexp(-1).sum()
    want = hosts["single"].run(probe, ids, backward=loss).saved
    got = hosts["tp"].run(probe, ids, backward=loss).saved
    for key in ("g", "h"):
        assert float((got[key] - want[key]).abs().max()) <= TOLERANCE, key
    steered = ts.select(base).at("model.layers.0").insert_after(ts.layers.Add(torch.ones(32)))
    tokens = [
        h.generate(steered, ids, max_new_tokens=3).output for h in (hosts["single"], hosts["tp"])
    ]
    assert torch.equal(tokens[0], tokens[1])


def test_a_tensor_parallel_host_refuses_what_it_cannot_serve_at_start(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel must be an int >= 2"):
        create_app({"llama": checkpoint}, tensor_parallel=1)
    with pytest.raises(TypeError, match="checkpoint paths"):
        create_app({"llama": make_llama()}, tensor_parallel=2)


def test_a_rank_that_dies_fails_its_job_and_the_ranks_start_again(hosts: dict[str, Any]) -> None:
    pool = hosts["app"].state.host.executor
    base = ts.wrap(make_llama())
    probe = ts.select(base).at("model.layers.1").insert_after(ts.layers.Save("x"))
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    want = hosts["single"].run(probe, ids).saved["x"]
    victim = pool.processes()[0][1]
    victim.kill()
    victim.join()
    with pytest.raises(RemoteError) as failed:
        hosts["tp"].run(probe, ids)
    assert failed.value.code == "replica_died", failed.value
    assert "rank 1 died" in failed.value.message
    assert float((hosts["tp"].run(probe, ids).saved["x"] - want).abs().max()) <= TOLERANCE
    assert pool.restarts == 1 and all(p.is_alive() for g in pool.processes() for p in g)


def test_requests_of_three_keys_merge_on_the_ranks(hosts: dict[str, Any]) -> None:
    base = ts.wrap(make_llama())
    probe = ts.select(base).at("model.layers.1.mlp.act_fn").insert_after(ts.layers.Save("act"))
    probe = ts.select(probe).at("model.layers.0").insert_after(ts.layers.Scale(0.5))
    inputs = {
        key: torch.randint(1, 64, (k + 1, 5), generator=torch.Generator().manual_seed(k))
        for k, key in enumerate(KEYS)
    }
    alone = {key: hosts["tp"].run(probe, ids, co_batch=False) for key, ids in inputs.items()}
    queue = hosts["app"].state.host.queue
    merged_before = sum(n for size, n in queue.batch_sizes.items() if size > 1)
    got: dict[str, ts.Result] = {}

    def run(key: str) -> None:
        with Client(hosts["url"], key, progress=False, model="llama") as client:
            got[key] = client.run(probe, inputs[key])

    for _ in range(6):  # until one pass merged
        threads = [threading.Thread(target=run, args=(key,)) for key in KEYS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for key in KEYS:
            for name, want in (
                ("logits", alone[key].output["logits"]),
                ("act", alone[key].saved["act"]),
            ):
                have = got[key].output["logits"] if name == "logits" else got[key].saved["act"]
                assert have.shape == want.shape, (key, name)
                assert float((have - want).abs().max()) <= 1e-6, (key, name)
        if sum(n for size, n in queue.batch_sizes.items() if size > 1) > merged_before:
            return
    pytest.fail(f"no pass merged on the ranks: {dict(queue.batch_sizes)}")
