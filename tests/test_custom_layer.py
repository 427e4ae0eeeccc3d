"""A new layer type is one class in one file: defined here, it runs locally (equal to a plain
``register_forward_hook``), on a host (also co-batched with another key's request) and on a
2-rank tensor-parallel model, where its class says how it meets a shard (the default gathers
the full tensor; ``on_shard`` can keep the edit local).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from plan_cases import make_gpt2, make_llama, token_ids

import torchsurgeon as ts
from torchsurgeon.layers import InterventionLayer, register_layer
from torchsurgeon.remote import Client, Limits, create_app, serve_in_thread


@register_layer
class Clamp(InterventionLayer):
    """Clamp the target tensor to ``[-limit, limit]``."""

    type_name = "TestClamp"
    config_fields = ("limit",)
    takes_index = False

    def __init__(self, limit: float, *, on: int | str | None = None) -> None:
        super().__init__(on=on)
        self.limit = float(limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.limit, self.limit)


@register_layer
class LocalClamp(Clamp):
    """``Clamp``, declared elementwise: on a shard it clamps the shard (no gather)."""

    type_name = "TestLocalClamp"

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        return self


def test_a_custom_layer_equals_a_forward_hook_locally() -> None:
    hf = make_gpt2()
    ids = token_ids()
    probe = ts.select(ts.wrap(hf)).at("transformer.h.1").insert_after(Clamp(0.05))
    with torch.no_grad():
        got = ts.run(probe, ids).output["logits"]
        plain = hf(ids).logits

    def clamp(module: torch.nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return out.clamp(-0.05, 0.05)
        return (out[0].clamp(-0.05, 0.05), *out[1:])

    handle = hf.transformer.h[1].register_forward_hook(clamp)
    try:
        with torch.no_grad():
            want = hf(ids).logits
    finally:
        handle.remove()
    assert float((got - want).abs().max()) <= 1e-6
    assert float((got - plain).abs().max()) > 1e-3  # the clamp changed something


@pytest.mark.slow  # starts a server
def test_a_custom_layer_runs_on_a_host_and_co_batched() -> None:
    model = ts.wrap(make_gpt2())
    probe = ts.select(model).at("transformer.h.1").insert_after(Clamp(0.05))
    probe = ts.select(probe).at("transformer.h.2").insert_after(ts.layers.Save("h2"))
    keys = ["a", "b"]
    inputs = {key: token_ids(seed=k, batch=k + 1) for k, key in enumerate(keys)}
    want = {key: ts.run(probe, ids) for key, ids in inputs.items()}
    app = create_app(
        {"gpt2": model}, api_keys=keys, co_batch=True, limits=Limits(batch_window_seconds=0.2)
    )
    queue = app.state.host.queue
    got: dict[str, ts.Result] = {}
    with serve_in_thread(app) as server:

        def run(key: str) -> None:
            with Client(server.url, key, progress=False, model="gpt2") as client:
                got[key] = client.run(probe, inputs[key])

        for _ in range(6):  # until the two requests share a pass
            threads = [threading.Thread(target=run, args=(key,)) for key in keys]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            for key in keys:
                diff = (got[key].saved["h2"] - want[key].saved["h2"]).abs().max().detach()
                assert float(diff) <= 1e-6, key
            if any(size > 1 for size in queue.batch_sizes):
                break
    assert any(size > 1 for size in queue.batch_sizes), dict(queue.batch_sizes)


def _llama() -> torch.nn.Module:
    return make_llama()  # every rank builds the same seeded weights


@pytest.mark.slow  # spawns two ranks
def test_a_custom_layer_runs_on_a_two_rank_sharded_model() -> None:
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    base = ts.wrap(_llama())
    site = "model.layers.1.mlp.up_proj"  # column-wise: each rank holds half the features
    plans = []
    for layer in (Clamp(0.02), LocalClamp(0.02)):
        probe = ts.select(base).at(site).insert_after(layer)
        probe = ts.select(probe).at("model.layers.1").insert_after(ts.layers.Save("h1"))
        plans.append((ts.plan(probe), ts.run(probe, ids)))
    results = ts.distributed.run_plans([plan for plan, _ in plans], _llama, ids)
    for (_, want), got in zip(plans, results, strict=True):
        assert float((got.saved["h1"] - want.saved["h1"]).abs().max()) <= 1e-5
        assert float((got.output["logits"] - want.output["logits"]).abs().max()) <= 1e-5
