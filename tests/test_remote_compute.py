"""Plans that compute, through a loopback host: one request each, equal to the local run.

Computed returns (a logit difference, the logit lens by module calls), layers holding
expressions, ``Stop`` and sessions run on the host exactly as ``ts.plans.execute`` runs them
here. Every bad expression is a 4xx naming its field before anything is queued: an op
outside the allow-list, a module path the model lacks, a ``ts.saved`` key nothing records,
shapes that do not fit, a session run nobody named; the base is unchanged afterwards.
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
from torchsurgeon.layers.allowed import OPS
from torchsurgeon.plans import Plan, execute
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread

L = ts.layers
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
FINAL_NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("computing")
    make_gpt2().save_pretrained(root / "gpt2")
    make_llama().save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


@pytest.fixture(scope="module")
def local(checkpoints: dict[str, Path]) -> dict[str, nn.Module]:
    return {
        name: ts.wrap(AutoModelForCausalLM.from_pretrained(path).eval())
        for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def hosting(checkpoints: dict[str, Path]) -> Iterator[tuple[Any, Client]]:
    limits = Limits(max_activation_bytes=256 << 20, max_session_runs=4)
    app = create_app(checkpoints, limits=limits, workers=2)
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        yield app, client


@pytest.fixture
def client(hosting: tuple[Any, Client]) -> Client:
    return hosting[1]


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got, want.detach())


def insert(model: nn.Module, path: str, operation: str, layer: nn.Module) -> nn.Module:
    return getattr(ts.select(model).at(path), operation)(layer)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_computed_values_and_expression_layers_equal_local(
    client: Client, local: dict[str, nn.Module], family: str
) -> None:
    blocks, model = BLOCKS[family], local[family]
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(4))
    d = d / d.norm()
    probe = insert(model, f"{blocks}.0", "insert_after", L.Save("h0"))
    probe = insert(
        probe, f"{blocks}.1", "insert_after", L.Compute(ts.here - (ts.here @ d)[..., None] * d)
    )
    probe = insert(
        probe,
        f"{blocks}.2",
        "insert_before",
        L.Add(ts.ops.where(ts.saved("h0") > 0, ts.saved("h0"), 0.0).mean(1, keepdim=True), 0.5),
    )
    logits = ts.out("logits")
    lens = ts.call("lm_head", ts.call(FINAL_NORM[family], ts.saved("h0")))
    plan = ts.plan(probe).returning(
        diff=logits[:, -1, 5] - logits[:, -1, 9],
        lens=lens.log_softmax(-1)[:, -1].topk(3).indices,
        norm=ts.saved("h0").norm(dim=-1),
    )
    got = client.run(plan, ids())
    want = execute(plan, model, ids())
    assert sorted(got.records) == ["diff", "lens", "norm"] and got.output is None
    for key in ("diff", "lens", "norm"):
        assert same(got.saved[key], want.saved[key]), key


def test_stop_and_a_session_are_one_request_each(
    client: Client, local: dict[str, nn.Module]
) -> None:
    model = local["gpt2"]
    early = insert(
        insert(model, "transformer.h.0", "insert_after", L.Save("h0")),
        "transformer.h.1",
        "insert_before",
        L.Stop(),
    )
    got = client.run(early, ids())
    assert got.output is None and same(got.saved["h0"], ts.run(early, ids()).saved["h0"])

    clean = insert(model, "transformer.h.1", "insert_after", L.Save("h1"))
    fv = ts.saved("h1", run="clean").mean(0)[-1]  # a function-vector-like mean over the batch
    patched = insert(model, "transformer.h.1", "insert_after", L.Add(fv, 2.0, index=ts.idx[:, -1]))
    last = ts.plan(patched).returning(
        "logits", diff=ts.out("logits")[:, -1, 3] - ts.saved("h1", run="clean")[:, -1, 0]
    )
    session = ts.session(clean=(clean, ids(1)), patched=(last, ids(2)))
    before = client.reconnects
    remote = client.run(session)
    assert client.reconnects == before and list(remote) == ["clean", "patched"]
    here = execute(session, model)
    assert same(remote["clean"].output.logits, here["clean"].output.logits)
    assert same(remote["patched"].output.logits, here["patched"].output.logits)
    assert same(remote["patched"].saved["diff"], here["patched"].saved["diff"])
    by_run = ts.run(ts.session(clean=(clean, ids(1)), patched=(patched, ids(2))), backend=client)
    assert same(by_run["patched"].output.logits, here["patched"].output.logits)


def refusal(client: Client, plan_or_session: Any, *inputs: Any) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        client.run(plan_or_session, *inputs)
    error = caught.value
    assert 400 <= error.status < 500, error
    return error


def test_bad_expressions_are_refused_naming_them(
    hosting: tuple[Any, Client], local: dict[str, nn.Module]
) -> None:
    app, client = hosting
    model = local["gpt2"]
    digests = {name: full_digest(m.base) for name, m in app.state.host.models.items()}

    def at_block(layer: nn.Module) -> nn.Module:
        return insert(model, "transformer.h.1", "insert_after", layer)

    missing = refusal(client, at_block(L.Compute(ts.here + ts.saved("later"))), ids())
    assert missing.code == "bad_expression" and missing.field == "steps.0.layer.config.expr"
    assert "nothing was saved under 'later'" in missing.message

    path = refusal(client, at_block(L.Compute(ts.call("transformer.nope", ts.here))), ids())
    assert (
        path.field == "steps.0.layer.config.expr"
        and "no module at path 'transformer.nope'" in path.message
    )
    assert "Nearest valid paths" in path.message

    shapes = refusal(client, at_block(L.Compute(ts.here @ torch.randn(5))), ids())
    assert (
        shapes.code == "bad_expression"
        and "matmul" in shapes.message
        and "[5] float32" in shapes.message
    )

    computed = ts.plan(model).returning(x=ts.out("logits")[:, -1] @ torch.randn(3))
    bad_return = refusal(client, computed, ids())
    assert bad_return.code == "bad_returning" and "returning 'x'" in bad_return.message

    unknown_run = ts.session(
        a=(model, ids()), b=(at_block(L.Compute(ts.saved("h", run="z"))), ids())
    )
    run_error = refusal(client, unknown_run)
    assert (
        run_error.field == "runs.b.steps.0.layer.config.expr" and "named 'z'" in run_error.message
    )

    bomb = at_block(L.Compute(ts.here[:, :, :, None].expand(3, 7, HIDDEN, 1 << 16).exp().sum(-1)))
    too_big = refusal(client, bomb, ids())
    assert too_big.code == "limit_exceeded" and "max_activation_bytes" in too_big.message

    too_many = ts.session(**{f"r{i}": (model, ids()) for i in range(5)})
    assert refusal(client, too_many).field == "runs"

    assert {name: full_digest(m.base) for name, m in app.state.host.models.items()} == digests


def test_a_host_may_narrow_the_allow_list(
    checkpoints: dict[str, Path], local: dict[str, nn.Module]
) -> None:
    allowed = tuple(sorted(set(OPS) - {"call", "einsum"}))
    app = create_app({"gpt2": checkpoints["gpt2"]}, limits=Limits(allowed_ops=allowed), workers=1)
    model = local["gpt2"]
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        fine = insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here * 2))
        assert same(client.run(fine, ids()).output.logits, ts.run(fine, ids()).output.logits)
        lens = ts.plan(model).returning(lens=ts.call("lm_head", ts.out("logits")[..., :HIDDEN]))
        error = refusal(client, lens, ids())
        assert error.code == "invalid_plan" and error.field == "returning.computed.lens.expr"
        assert "'call' is not allowed on this host" in error.message
        mixed = insert(
            model, "transformer.h.1", "insert_after", L.Compute(ts.ops.einsum("bsd->bsd", ts.here))
        )
        error = refusal(client, mixed, ids())
        assert (
            error.field == "steps.0.layer.config.expr"
            and "'einsum' is not allowed" in error.message
        )


def test_plans_with_expressions_survive_the_wire_unchanged(local: dict[str, nn.Module]) -> None:
    probe = insert(
        local["llama"],
        "model.layers.1.mlp",
        "insert_after",
        L.Compute(ts.ops.rearrange(ts.here, "b s (k d) -> b s k d", k=4).flip([2]).flatten(2)),
    )
    plan = ts.plan(probe).returning(top=ts.out("logits").softmax(-1)[:, -1].topk(2).values)
    again = Plan.from_bytes(plan.to_bytes())
    assert again == plan
    a, b = execute(plan, local["llama"], ids()), execute(again, local["llama"], ids())
    assert same(a.saved["top"], b.saved["top"])


def test_constant_tensors_in_computed_values_meet_the_run_on_its_device(
    client: Client, local: dict[str, nn.Module]
) -> None:
    """A returning / backward constant is moved to the run's device (meta in the estimate)."""
    model = local["gpt2"]
    weights = torch.linspace(0, 1, VOCAB)
    plan = ts.plan(model).returning(x=(ts.out("logits") * weights).sum(-1))
    got, want = client.run(plan, ids()), execute(plan, model, ids())
    assert same(got.saved["x"], want.saved["x"])
    probe = insert(model, "transformer.h.0", "insert_after", L.SaveGrad("g"))
    scalar = (ts.out("logits")[:, -1] * weights).sum()
    got = client.run(probe, ids(), backward=scalar)
    assert same(got.saved["g"], ts.run(probe, ids(), backward=scalar).saved["g"])
