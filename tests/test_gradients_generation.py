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


# --------------------------------------------------------------------------- training


def lm_loss() -> ts.Expr:
    logits = ts.out("logits")[:, :-1]
    return -logits.log_softmax(-1).gather(-1, ts.input("input_ids")[:, 1:, None]).mean()


def adapted(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    adapter = L.LowRankAdapter(
        0.1 * torch.randn(4, HIDDEN, generator=g), torch.zeros(HIDDEN, 4), 2.0
    )
    return insert(model, "transformer.h.1.attn.c_proj", "insert_after", adapter)


BATCHES = [ids(10), ids(11)]


def test_train_equals_a_plain_pytorch_loop() -> None:
    hf = make_gpt2()
    probe = adapted(ts.wrap(hf))
    params = ts.select(probe).at_instances_of("LowRankAdapter")
    got = ts.train(
        probe, BATCHES, loss=lm_loss(), params=params, optimizer=ts.optim.AdamW(lr=1e-2), steps=5
    )
    layer = ts.select(probe).at_instances_of("LowRankAdapter").get()
    a, b = layer.a.clone().requires_grad_(True), layer.b.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([a, b], lr=1e-2)

    def adapter(m: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return out + (inputs[0] @ a.T) @ b.T * 2.0

    handle = hf.transformer.h[1].attn.c_proj.register_forward_hook(adapter)
    losses = []
    try:
        for step in range(5):
            batch = BATCHES[step % 2]
            logits = hf(batch).logits[:, :-1]
            loss = -logits.log_softmax(-1).gather(-1, batch[:, 1:, None]).mean()
            a.grad, b.grad = torch.autograd.grad(loss, [a, b])
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        handle.remove()
    assert got.losses == losses
    name = "transformer.h.1.attn.c_proj.ts_after.0"
    assert sorted(got.tensors) == [f"{name}.a", f"{name}.b"]  # the scale is not trained
    assert torch.equal(got.tensors[f"{name}.a"], a.detach()) and torch.equal(
        got.tensors[f"{name}.b"], b.detach()
    )
    assert all(p.grad is None for p in hf.parameters())
    trained = ts.run(got.model, BATCHES[0]).output.logits
    with torch.no_grad():
        handle = hf.transformer.h[1].attn.c_proj.register_forward_hook(adapter)
        try:
            assert (trained - hf(BATCHES[0]).logits).abs().max() <= 1e-6
        finally:
            handle.remove()


def test_training_on_the_host_is_one_request_and_feeds_the_next_run(
    hosting: tuple[Any, Client], local: dict[str, nn.Module]
) -> None:
    app, client = hosting
    hosted = app.state.host.models["gpt2"]
    before = full_digest(hosted.base)
    probe = adapted(local["gpt2"])
    params = ts.select(probe).at_instances_of("LowRankAdapter")
    settings = {
        "loss": lm_loss(),
        "params": params,
        "optimizer": ts.optim.AdamW(lr=1e-2),
        "steps": 4,
    }
    want = ts.train(probe, BATCHES, **settings)
    got = ts.train(probe, BATCHES, backend=client, **settings)
    assert got.losses == want.losses
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    session = ts.session(
        fit=ts.training(probe, BATCHES, **settings), test=(ts.trained(probe, "fit"), ids(12))
    )
    remote, here = client.run(session), ts.run(session)
    assert torch.equal(remote["test"].output.logits, here["test"].output.logits.detach())
    assert torch.equal(here["test"].output.logits, ts.run(want.model, ids(12)).output.logits)
    assert torch.equal(remote["fit"].records["loss"][0], torch.tensor(want.losses))
    assert full_digest(hosted.base) == before and all(
        p.grad is None for p in hosted.base.parameters()
    )


def test_training_progress_is_pushed_per_step(
    hosting: tuple[Any, Client], local: dict[str, nn.Module]
) -> None:
    from torchsurgeon.remote.client import Job, _training_request
    from torchsurgeon.remote.transfer import encode_request

    client = hosting[1]
    probe = adapted(local["gpt2"])
    params = ts.select(probe).at_instances_of("LowRankAdapter")
    plan, settings, calls = _training_request(
        probe, BATCHES, lm_loss(), params, ts.optim.SGD(lr=0.1), 60
    )
    body = encode_request(plan.to_bytes(), (), {}, "train", training=settings, batches=calls)
    data = client._json(
        "POST",
        "/v1/models/gpt2/jobs",
        content=body,
        headers={"Content-Type": "application/octet-stream"},
    )
    job, seen = Job(client, data["id"], "gpt2"), []
    status = job.status()
    while not status.finished:
        if status.progress is not None:
            seen.append(status.progress)
        status = job.status(since=status.version, wait=5.0)
    assert status.state == "done" and seen and seen[-1]["steps"] == 60
    steps = [p["step"] for p in seen]
    assert steps == sorted(steps) and all(isinstance(p["loss"], float) for p in seen)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"steps": 0}, "train.steps", "from 1 to max_train_steps"),
        ({"optimizer": {"name": "Adam2", "settings": {}}}, "train.optimizer", "unknown optimizer"),
        ({"optimizer": {"name": "AdamW", "settings": {"lr": -1}}}, "train.optimizer", "lr must be"),
        ({"params": ["transformer.h.0.mlp"]}, "train.params", "not an intervention layer"),
        ({"params": ["transformer.h.1.attn.c_proj.ts_after.0.nope"]}, "train.params", "nope"),
        ({"extra": 1}, "train", "unknown training setting"),
    ],
)
def test_bad_training_requests_name_the_field(
    client: Client, local: dict[str, nn.Module], change: dict[str, Any], field: str, message: str
) -> None:
    from torchsurgeon.remote.client import _training_request
    from torchsurgeon.remote.transfer import encode_request

    probe = adapted(local["gpt2"])
    params = ts.select(probe).at_instances_of("LowRankAdapter")
    plan, settings, calls = _training_request(
        probe, BATCHES, lm_loss(), params, ts.optim.AdamW(), 2
    )
    body = encode_request(
        plan.to_bytes(), (), {}, "train", training={**settings, **change}, batches=calls
    )
    with pytest.raises(RemoteError, match=message) as caught:
        client._json(
            "POST",
            "/v1/models/gpt2/jobs",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert caught.value.status == 422 and caught.value.field == field


def test_a_host_without_training_names_the_flag(
    checkpoints: dict[str, Path], local: dict[str, nn.Module]
) -> None:
    app = create_app({"gpt2": checkpoints["gpt2"]}, limits=Limits(allow_train=False), workers=1)
    probe = adapted(local["gpt2"])
    params = ts.select(probe).at_instances_of("LowRankAdapter")
    with (
        serve_in_thread(app) as server,
        Client(server.url, progress=False) as client,
        pytest.raises(RemoteError, match="--no-train") as caught,
    ):
        ts.train(
            probe,
            BATCHES,
            loss=lm_loss(),
            params=params,
            optimizer=ts.optim.AdamW(),
            steps=2,
            backend=client,
        )
    assert caught.value.code == "training_disabled"
