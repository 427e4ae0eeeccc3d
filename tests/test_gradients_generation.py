"""Gradients and generation, locally and on a loopback host: one request each, equal.

``backward=`` differentiates a scalar expression after the forward pass; ``SaveGrad``
records the gradient at its site and ``ComputeGrad`` edits it on its way back — compared with
plain ``register_hook`` code. Generation applies a plan at every step (``steps=`` picks
steps), with saves per step; greedy and seeded sampling give the same tokens on the host.
Unknown options are 4xx naming them; after gradient requests the hosted base is unchanged
and holds no ``.grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, make_gpt2, make_llama
from plan_cases import full_digest
from torch import nn
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon.plans import identity_of
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread

L = ts.layers
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


def ids(seed: int = 0, rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def insert(model: nn.Module, path: str, operation: str, layer: nn.Module) -> nn.Module:
    return getattr(ts.select(model).at(path), operation)(layer)


def logit_diff() -> ts.Expr:
    logits = ts.out("logits")[:, -1]
    return (logits[:, 3] - logits[:, 4]).sum()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grads")
    make_gpt2().save_pretrained(root / "gpt2")
    make_llama().save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


@pytest.fixture(scope="module")
def local(checkpoints: dict[str, Path]) -> dict[str, nn.Module]:
    return {
        n: ts.wrap(AutoModelForCausalLM.from_pretrained(p).eval()) for n, p in checkpoints.items()
    }


@pytest.fixture(scope="module")
def hosting(checkpoints: dict[str, Path]) -> Iterator[tuple[Any, Client]]:
    app = create_app(checkpoints, workers=2)
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        yield app, client


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_grad_and_compute_grad_equal_tensor_hooks(family: str) -> None:
    hf = (make_gpt2 if family == "gpt2" else make_llama)()
    blocks = BLOCKS[family]
    probe = insert(ts.wrap(hf), f"{blocks}.0", "insert_after", L.SaveGrad("g0"))
    probe = insert(probe, f"{blocks}.1", "insert_after", L.ComputeGrad(ts.here.clamp(-1e-3, 1e-3)))
    probe = insert(probe, f"{blocks}.1", "insert_after", L.SaveGrad("g1"))
    got = ts.run(probe, ids(), backward=logit_diff())
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(m: nn.Module, a: Any, o: Any) -> None:
            first(o).register_hook(lambda g: kept.__setitem__(name, g))

        return hook

    def clip(m: nn.Module, a: Any, o: Any) -> None:
        first(o).register_hook(lambda g: g.clamp(-1e-3, 1e-3))

    blocks_of = hf.transformer.h if family == "gpt2" else hf.model.layers
    handles = [
        blocks_of[0].register_forward_hook(keep("g0")),
        blocks_of[1].register_forward_hook(keep("g1")),  # sees the gradient before the clip
        blocks_of[1].register_forward_hook(clip),
    ]
    try:
        logits = hf(ids()).logits[:, -1]
        (logits[:, 3] - logits[:, 4]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    for key in ("g0", "g1"):
        assert (got.saved[key] - kept[key]).abs().max() <= 1e-6, key
    assert kept["g1"].abs().max() > 1e-3  # the clip changed something upstream
    assert all(p.grad is None for p in ts.wrap(hf).parameters())


def test_backward_refuses_what_it_cannot_differentiate() -> None:
    model = ts.wrap(make_gpt2())
    probe = insert(model, "transformer.h.0", "insert_after", L.SaveGrad("g"))
    with pytest.raises(ts.layers.ExpressionError, match="scalar"):
        ts.run(probe, ids(), backward=ts.out("logits")[:, -1, 3])
    with pytest.raises(ts.layers.ExpressionError, match="no SaveGrad or ComputeGrad"):
        ts.run(model, ids(), backward=logit_diff())
    with pytest.raises(ts.layers.ExpressionError, match="known only after the forward"):
        L.ComputeGrad(ts.out("logits"))


def test_gradients_on_the_host_are_one_request_and_leave_the_base_clean(
    hosting: tuple[Any, Client], local: dict[str, nn.Module]
) -> None:
    app, client = hosting
    hosted = app.state.host.models["gpt2"]
    before = (identity_of(hosted.base).fingerprint, full_digest(hosted.base))
    probe = insert(local["gpt2"], "transformer.h.0", "insert_after", L.SaveGrad("g0"))
    probe = insert(probe, "transformer.h.1", "insert_after", L.ComputeGrad(ts.here * 0.5))
    want = ts.run(probe, ids(), backward=logit_diff())
    got = ts.run(probe, ids(), backward=logit_diff(), backend=client)
    assert torch.equal(got.saved["g0"], want.saved["g0"])
    plan = ts.plan(probe).with_backward(logit_diff()).returning("g0")
    assert torch.equal(client.run(plan, ids()).saved["g0"], want.saved["g0"])
    assert (identity_of(hosted.base).fingerprint, full_digest(hosted.base)) == before
    assert all(p.grad is None for p in hosted.base.parameters())
    with pytest.raises(RemoteError, match=r"needs_backward|act on the backward pass") as caught:
        client.run(probe, ids())
    assert caught.value.field == "backward"


def test_a_host_without_gradients_names_the_flag(
    checkpoints: dict[str, Path], local: dict[str, nn.Module]
) -> None:
    app = create_app({"gpt2": checkpoints["gpt2"]}, limits=Limits(allow_grad=False), workers=1)
    probe = insert(local["gpt2"], "transformer.h.0", "insert_after", L.SaveGrad("g0"))
    with (
        serve_in_thread(app) as server,
        Client(server.url, progress=False) as client,
        pytest.raises(RemoteError, match="--no-grad") as caught,
    ):
        client.run(probe, ids(), backward=logit_diff())
    assert caught.value.code == "gradients_disabled" and caught.value.status == 422


# --------------------------------------------------------------------------- generation


def test_steps_pick_generation_steps_as_hooks_counting_calls_do() -> None:
    hf = make_gpt2()
    vector = 20 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    probe = insert(ts.wrap(hf), "transformer.h.1", "insert_after", L.Save("h1"))
    probe = insert(probe, "transformer.h.1", "insert_after", L.Add(vector, steps=[1, 2]))
    got = ts.run(probe.generate, ids(), max_new_tokens=4, do_sample=False)
    calls = [0]

    def add(m: nn.Module, a: Any, o: Any) -> Any:
        calls[0] += 1
        if calls[0] - 1 not in (1, 2):
            return None
        return (first(o) + vector, *o[1:]) if isinstance(o, tuple) else o + vector

    handle = hf.transformer.h[1].register_forward_hook(add)
    try:
        want = hf.generate(ids(), max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(got.output, want)
    assert [t.shape[1] for t in got.records["h1"]] == [6, 1, 1, 1]
    plain = ts.run(ts.wrap(hf).generate, ids(), max_new_tokens=4, do_sample=False).output
    assert not torch.equal(plain, want)  # the edit at steps 1 and 2 changed the tokens
    with pytest.raises(RuntimeError, match=r"counts the calls .* within one ts\.run"):
        probe(ids())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_on_the_host_equals_local(
    client: Client, local: dict[str, nn.Module], family: str
) -> None:
    blocks = BLOCKS[family]
    probe = insert(local[family], f"{blocks}.1", "insert_after", L.Save("h1"))
    probe = insert(
        probe,
        f"{blocks}.1",
        "insert_after",
        L.Add(torch.ones(HIDDEN), 2.0, steps=slice(1, None, 2)),
    )
    want = ts.run(probe.generate, ids(), max_new_tokens=5, do_sample=False)
    got = ts.run(probe.generate, ids(), max_new_tokens=5, do_sample=False, backend=client)
    assert torch.equal(got.output, want.output)
    assert len(got.records["h1"]) == len(want.records["h1"]) == 5
    assert all(
        torch.equal(a, b) for a, b in zip(got.records["h1"], want.records["h1"], strict=True)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        sampled = ts.run(probe.generate, ids(), max_new_tokens=5, do_sample=True, top_k=8)
    remote = client.generate(probe, ids(), max_new_tokens=5, do_sample=True, top_k=8, seed=11)
    assert torch.equal(remote.output, sampled.output)


@pytest.fixture
def client(hosting: tuple[Any, Client]) -> Client:
    return hosting[1]


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"max_new_tokens": 2, "num_beams": 2}, "num_beams", "'num_beams' is not one of them"),
        ({"max_new_tokn": 2}, "max_new_tokn", "'max_new_tokn' is not one of them"),
        ({"do_sample": True, "max_new_tokens": 2}, "seed", "needs seed="),
        ({"max_new_tokens": 0}, "max_new_tokens", "from 1"),
        ({"max_new_tokens": 2, "temperature": -1.0}, "temperature", "> 0"),
        ({}, "max_new_tokens", "needs max_new_tokens"),
    ],
)
def test_generate_options_are_checked_naming_them(
    client: Client, local: dict[str, nn.Module], options: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(RemoteError, match=message) as caught:
        client.generate(local["gpt2"], ids(), **options)
    assert caught.value.status == 422 and caught.value.field == f"inputs.{field}"


def test_a_forward_call_with_a_generate_option_is_refused(
    client: Client, local: dict[str, nn.Module]
) -> None:
    with pytest.raises(RemoteError, match="it is a generate option") as caught:
        client.run(local["gpt2"], ids(), max_new_tokens=3)
    assert caught.value.field == "inputs.max_new_tokens"
