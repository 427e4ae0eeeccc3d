"""Co-batching never mixes users: every row-changing operation of the expression allow-list,
placed by one key in a merged pass, leaves the other keys' results exactly their solo runs,
and no row of theirs appears in the attacker's result.

Three layers of defence are tested apart: the estimate check (``batch_key`` refuses to merge
a plan whose layers change their target's shape), the merged pass's own check (``RowScope``
takes such a request out of the batch, even when the estimate check is bypassed), and the
split (an output tensor without the merged rows ends the merge). The host test runs three
keys with different prompt lengths through a loopback host.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_reference import VOCAB, make_gpt2
from torch import nn
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon.remote import Client, Limits, create_app, serve_in_thread
from torchsurgeon.remote.batching import BatchPart, _check_rows, _NotBatched, batch_key, run_batch
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.estimates import Cost
from torchsurgeon.remote.execution import prepare_submission
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.jobs import JobQueue
from torchsurgeon.remote.result_wire import decode_result
from torchsurgeon.remote.store import JobStore
from torchsurgeon.remote.transfer import encode_request
from torchsurgeon.remote.worker import RUN_ALONE

L = ts.layers
h = ts.here
LIMITS = Limits()

ROW_CHANGERS = {  # every operation of the allow-list that can add, drop, fold or move rows
    "cat": ts.ops.cat([h, h], 0),
    "stack": ts.ops.stack([h, h], 0)[0, :1],
    "slice_empty": h[:0],
    "slice_one": h[:1],
    "index_row": h[0],
    "index_list": h[[0, 0, 0]],
    "expand": h[:1].expand(3, -1, -1),
    "sum_0": h.sum(0),
    "mean_0_keepdim": h.mean(0, keepdim=True),
    "amax_0": h.amax(0, keepdim=True),
    "topk_0": h.topk(1, 0).values,
    "reshape": h.reshape(-1, VOCAB)[None],
    "rearrange": ts.ops.rearrange(h, "b s v -> 1 (b s) v"),
    "flatten": h.flatten(0, 1)[None],
    "transpose": h.transpose(0, 1),
    "unsqueeze": h.unsqueeze(0),
}
SITES = ["lm_head", "transformer.h.0"]  # the output itself, and a block inside the model


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> tuple[HostedModel, nn.Module, Path]:
    path = tmp_path_factory.mktemp("isolation") / "gpt2"
    make_gpt2().save_pretrained(path)
    model = ts.wrap(AutoModelForCausalLM.from_pretrained(path).eval())
    return HostedModel.load("gpt2", path), model, path


def ids(seed: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def part(hosted: HostedModel, probe: nn.Module, inputs: torch.Tensor) -> BatchPart:
    body = encode_request(ts.plans.plan(probe).to_bytes(), (), {"input_ids": inputs})
    runs = prepare_submission(hosted, body, LIMITS)
    return BatchPart(hosted, runs[0])


def rows_of(result: ts.Result) -> list[torch.Tensor]:
    """Every last-dimension vector of every tensor in a result."""
    tensors = [result.output.logits, *(v for vs in result.records.values() for v in vs)]
    return [t.reshape(-1, t.shape[-1]) for t in tensors if t.dim() >= 1 and t.numel()]


def leaked(victim: ts.Result, other: ts.Result) -> bool:
    """Whether any vector of ``victim``'s logits or records appears in ``other``."""
    mine = torch.cat([r for r in rows_of(victim) if r.shape[-1] == VOCAB])
    for theirs in rows_of(other):
        if theirs.shape[-1] == mine.shape[-1] and (theirs[:, None] == mine[None]).all(-1).any():
            return True
    return False


def victims(model: nn.Module) -> list[nn.Module]:
    saved = ts.select(model).at("transformer.h.1").insert_after(L.Save("h1"))
    forced = ts.select(model).at("transformer.h.0.mlp").insert_before(L.Scale(2.0))
    return [saved, forced]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("name", sorted(ROW_CHANGERS))
def test_a_row_changing_layer_never_reaches_another_keys_rows(
    hosted: tuple[HostedModel, nn.Module, Path], name: str, site: str
) -> None:
    base, model, _ = hosted
    attack = ts.select(model).at(site).insert_after(L.Compute(ROW_CHANGERS[name]))
    first, second = victims(model)
    inputs = [ids(1, 1, 6), ids(2, 2, 6), ids(3, 3, 6)]  # 1, 2 and 3 rows
    try:
        attacker = part(base, attack, inputs[1])
    except ApiError as refused:  # inside the model, the estimate finds it cannot run at all
        assert site != "lm_head" and refused.status == 422, refused
        return
    assert batch_key(base, [attacker.run], False) is None  # the estimate check

    parts = [part(base, first, inputs[0]), attacker, part(base, second, inputs[2])]
    outcomes = run_batch(parts, LIMITS)  # the estimate check bypassed: the pass checks
    results = []
    for (data, error), inputs_k, probe in zip(
        outcomes, inputs, [first, attack, second], strict=True
    ):
        assert error is None, error
        got = decode_result(data)
        alone = ts.run(probe, inputs_k)
        assert got.output.logits.shape == alone.output.logits.shape
        assert torch.allclose(got.output.logits, alone.output.logits, atol=1e-6)
        for key, values in alone.records.items():
            assert [v.shape for v in got.records[key]] == [v.shape for v in values]
        results.append(got)
    assert not leaked(results[0], results[1]) and not leaked(results[2], results[1])
    assert not leaked(results[0], results[2]) and not leaked(results[2], results[0])


def test_merges_still_happen_for_row_keeping_plans(
    hosted: tuple[HostedModel, nn.Module, Path],
) -> None:
    base, model, _ = hosted
    flipped = ts.select(model).at("lm_head").insert_after(L.Compute(h.flip(0)))  # own rows
    parts = [part(base, probe, ids(k, 2, 5)) for k, probe in enumerate([*victims(model), flipped])]
    assert all(batch_key(base, [p.run], False) is not None for p in parts)
    for (data, error), p, probe in zip(
        run_batch(parts, LIMITS), parts, [*victims(model), flipped], strict=True
    ):
        assert error is None
        alone = ts.run(probe, p.run.inputs.kwargs["input_ids"])
        assert torch.allclose(decode_result(data).output.logits, alone.output.logits, atol=1e-6)


def test_the_split_refuses_an_output_without_the_merged_rows() -> None:
    _check_rows({"logits": torch.zeros(5, 2, 3), "hidden": (torch.zeros(5, 1),)}, 5)
    for bad in (torch.zeros(()), torch.zeros(4, 2), {"x": [torch.zeros(6)]}):
        with pytest.raises(_NotBatched):
            _check_rows(bad, 5)


def test_a_merged_pass_past_its_deadline_sends_each_request_to_run_alone(
    hosted: tuple[HostedModel, nn.Module, Path],
) -> None:
    base, model, _ = hosted
    parts = [part(base, probe, ids(k, 1, 5)) for k, probe in enumerate(victims(model))]
    outcomes = run_batch(parts, Limits(max_run_seconds=0.0))
    assert outcomes == [(None, RUN_ALONE)] * 2


@pytest.mark.slow
def test_three_keys_on_a_host_never_see_each_others_rows(
    hosted: tuple[HostedModel, nn.Module, Path],
) -> None:
    _, model, path = hosted
    keys = ["victim", "attacker", "bystander"]
    app = create_app(
        {"gpt2": path},
        api_keys=keys,
        workers=1,
        co_batch=True,
        limits=Limits(batch_window_seconds=0.2),
    )
    attacks = [
        ts.select(model).at("lm_head").insert_after(L.Compute(expr))
        for expr in ROW_CHANGERS.values()
    ]
    plans: dict[str, list[tuple[nn.Module, torch.Tensor]]] = {
        "victim": [(victims(model)[i % 2], ids(100 + i, 1 + i % 2, 8)) for i in range(8)],
        "attacker": [(attacks[i % len(attacks)], ids(200 + i, 2, 8)) for i in range(8)],
        "bystander": [(victims(model)[1], ids(300 + i, 3, 5 + 3 * (i % 2))) for i in range(8)],
    }
    results: dict[tuple[str, int], Any] = {}
    start = threading.Barrier(3)

    def client(key: str, url: str) -> None:
        with Client(url, api_key=key, progress=False) as connected:
            start.wait()
            for i, (probe, inputs) in enumerate(plans[key]):
                try:
                    results[key, i] = connected.run(probe, inputs)
                except Exception as error:  # an attack the host refuses: never data
                    results[key, i] = error

    with serve_in_thread(app) as server:
        threads = [threading.Thread(target=client, args=(k, server.url)) for k in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    assert len(results) == 24
    for key in ("victim", "bystander"):
        for i, (probe, inputs) in enumerate(plans[key]):
            got, alone = results[key, i], ts.run(probe, inputs)
            assert isinstance(got, ts.Result), got
            assert got.output.logits.shape == alone.output.logits.shape
            assert torch.allclose(got.output.logits, alone.output.logits, atol=1e-6)
            for j in range(8):
                other = results["attacker", j]
                assert not isinstance(other, ts.Result) or not leaked(got, other), (key, i, j)


# --------------------------------------------------------------------------- the queue


@dataclass(frozen=True)
class _Part:
    name: str
    cost: Cost


def _queue_run(costs: dict[str, float]) -> tuple[list[list[str]], list[str], dict[str, str]]:
    """Submit one job per key (same batch key) with these estimated seconds, behind a job
    that holds the one worker; a batcher that answers :data:`RUN_ALONE` for a merged pass
    (as when it runs out of time). The batches it saw, the jobs run alone, each job's end."""
    seen: list[list[str]] = []
    ran: list[str] = []

    def batcher(parts: list[_Part], deadline: float) -> list[tuple[bytes | None, Any]]:
        seen.append([part.name for part in parts])
        return [(None, RUN_ALONE)] * len(parts)

    limits = Limits(batch_window_seconds=0.05, max_run_seconds=10.0)
    queue = JobQueue(1, limits, JobStore(None), batcher=batcher)
    try:
        gate = threading.Event()
        blocker = queue.submit("first", "m", lambda _: gate.wait(30) and b"x")
        queue.start()
        deadline = time.monotonic() + 30
        while blocker.state != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        jobs = {
            name: queue.submit(
                name,
                "m",
                lambda _, name=name: ran.append(name) or name.encode(),
                batch_key="k",
                part=_Part(name, Cost(0, 0, 0, seconds=seconds)),
            )
            for name, seconds in costs.items()
        }
        gate.set()
        while any(j.state not in ("done", "error") for j in jobs.values()):
            assert time.monotonic() < deadline, {n: j.state for n, j in jobs.items()}
            time.sleep(0.01)
        return seen, ran, {name: job.state for name, job in jobs.items()}
    finally:
        queue.stop(timeout=5)


def test_only_requests_of_similar_cost_share_a_pass() -> None:
    seen, ran, _ = _queue_run({"a": 1.0, "b": 1.5, "slow": 4.9, "c": 0.9})
    assert seen == [["a", "b", "c"]]  # 4.9 s is not like 1 s: it never joins them
    assert sorted(ran) == ["a", "b", "c", "slow"]
    seen, _, _ = _queue_run({"a": 2.0, "b": 2.0, "c": 2.0})
    assert seen == [["a", "b"]]  # a third would not fit the budget: 0.5 x 10 s


def test_a_merged_pass_out_of_time_runs_each_request_again_alone() -> None:
    seen, ran, ends = _queue_run({"a": 0.1, "b": 0.1, "c": 0.1})
    assert seen == [["a", "b", "c"]]
    assert ran == ["a", "b", "c"]  # each alone, under its own deadline, in its key's turn
    assert ends == {"a": "done", "b": "done", "c": "done"}
