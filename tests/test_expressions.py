"""Expressions in plans: values, operations, Compute/Stop, computed returns and sessions.

Every edit is compared with the unmodified ``transformers`` model plus hand-written hooks;
every plan is read back from its bytes (the host's path) before it runs; every refusal names
the node, the field or the step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, hooks, make_gpt2, make_llama, max_diff, replace_output
from torch import nn

import torchsurgeon as ts
from torchsurgeon.layers.allowed import OPS, ExpressionError
from torchsurgeon.layers.graph import Graph
from torchsurgeon.plans import Plan, PlanFormatError, PlanLimits, execute
from torchsurgeon.plans.wire import pack

L = ts.layers


def ids(seed: int = 0, rows: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def direction(seed: int = 1) -> torch.Tensor:
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def read_back(plan: Plan) -> Plan:
    return Plan.from_bytes(plan.to_bytes())


def first(output: object) -> torch.Tensor:
    """A block's hidden states, whether it returns a tensor or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def insert(model: nn.Module, path: str, operation: str, layer: nn.Module) -> nn.Module:
    return getattr(ts.select(model).at(path), operation)(layer)


# --------------------------------------------------------------------------- the graph


def test_operations_equal_torch() -> None:
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(8, generator=torch.Generator().manual_seed(1))
    h, o = ts.here, ts.ops
    cases = [
        (h + y * 2 - 1 / (h.abs() + 1), x + y * 2 - 1 / (x.abs() + 1)),
        ((h @ y)[..., None] * y, (x @ y)[..., None] * y),
        (h.softmax(-1).log(), x.softmax(-1).log()),
        (h.log_softmax(-1)[:, -1, [1, 3]], x.log_softmax(-1)[:, -1, [1, 3]]),
        (h.sum(dim=[0, 1]), x.sum(dim=[0, 1])),
        (h.mean(1, keepdim=True), x.mean(1, keepdim=True)),
        (h.amax(-1), x.amax(-1)),
        (h.norm(dim=-1), x.norm(dim=-1)),
        (h.topk(3).values, x.topk(3).values),
        (h.topk(3).indices, x.topk(3).indices),
        (h.argmax(-1), x.argmax(-1)),
        (h.clamp(min=-0.5, max=0.5), x.clamp(-0.5, 0.5)),
        (h.exp().sqrt().tanh().sigmoid().relu(), x.exp().sqrt().tanh().sigmoid().relu()),
        (h.reshape(2, 40).transpose(0, 1).flatten(), x.reshape(2, 40).transpose(0, 1).flatten()),
        (h.permute(2, 0, 1).unsqueeze(0).squeeze(0), x.permute(2, 0, 1)),
        (h[:, None, 2:4].expand(2, 3, 2, 8), x[:, None, 2:4].expand(2, 3, 2, 8)),
        (h.to("float64"), x.double()),
        (o.where(h > 0, h, h * 0.1), torch.where(x > 0, x, x * 0.1)),
        (o.einsum("bsd,d->bs", h, y), torch.einsum("bsd,d->bs", x, y)),
        (o.cat([h, h * 2], dim=-1), torch.cat([x, x * 2], -1)),
        (o.stack([h, -h]), torch.stack([x, -x])),
        (o.cosine_similarity(h, y), torch.nn.functional.cosine_similarity(x, y, -1)),
        (o.outer(h[0, 0], y), torch.outer(x[0, 0], y)),
        (o.rearrange(h, "b s (k d) -> b k s d", k=2), x.reshape(2, 5, 2, 4).transpose(1, 2)),
        (o.reduce(h, "b s d -> b d", "max"), x.amax(1)),
        (h.gather(-1, (h.argmax(-1, keepdim=True))), x.gather(-1, x.argmax(-1, keepdim=True))),
        (h[:, h.argmax(-1)[0, 0] % 5], x[:, x.argmax(-1)[0, 0] % 5]),
        ((h > 0) & (h < 1) | ~(h != h), ((x > 0) & (x < 1)) | ~(x != x)),
    ]
    for expr, want in cases:
        graph = Graph.from_json(
            json.loads(json.dumps(Graph.of(expr).to_json())), Graph.of(expr).tensors
        )
        got = graph.evaluate(x)
        assert got.dtype == want.dtype and torch.equal(got, want), expr


def test_a_value_used_twice_is_one_node_and_one_constant() -> None:
    d = direction()
    graph = Graph.of(ts.here - (ts.here @ d)[..., None] * d)
    assert [op for op, _, _ in graph.nodes].count("here") == 1
    assert len(graph.tensors) == 1
    doubled = ts.here
    for _ in range(100):  # 2**100 paths, 101 nodes
        doubled = doubled + doubled
    assert len(Graph.of(doubled).nodes) == 101


def test_expressions_refuse_truth_values_and_unknown_methods() -> None:
    with pytest.raises(ExpressionError, match=r"ts\.ops\.where"):
        bool(ts.here > 0)
    with pytest.raises(AttributeError, match="did you mean softmax"):
        ts.here.sofmax(-1)
    with pytest.raises(ExpressionError, match="required"):
        ts.here.topk()
    with pytest.raises(ExpressionError, match="dim"):
        ts.here.sum(dim="0")
    with pytest.raises(ExpressionError, match="einsum equation"):
        ts.ops.einsum("{0.__class__}", ts.here)
    with pytest.raises(ExpressionError, match="deep"):
        chain = ts.here
        for _ in range(300):
            chain = chain.abs()


def node(op: str, args: list[int] | None = None, **params: object) -> dict[str, object]:
    return {"op": op, "args": args or [], "params": params}


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([node("__import__")], "unknown operation '__import__'"),
        ([node("here"), node("getattr", [0])], "unknown operation 'getattr'"),
        ([node("here"), node("sum", [1])], "indices of earlier nodes"),
        ([node("here"), node("sum", [0], dim="x")], "dim"),
        ([node("here"), node("sum", [0], nope=1)], "unknown parameter"),
        ([node("here"), node("add", [0])], "takes 2 argument"),
        ([node("const", tensor=3)], "not there"),
        ([node("const")], "a value or a tensor"),
        ([node("here"), node("rearrange", [0], pattern="b s -> {x}")], "einops pattern"),
        ([node("here"), node("getitem", [0], index=[{"arg": 1}])], "tensor entries"),
        ([node("here", [0])], "indices of earlier nodes"),
        ([node("saved", key="")], "non-empty string"),
        ([node("here"), node("call", [0], path="a..b")], "bad path"),
    ],
)
def test_graph_parser_refuses_malformed_nodes(nodes: list[object], message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        Graph.from_json({"nodes": nodes}, [])


def test_graph_parser_limits_and_allow_list() -> None:
    many = {"nodes": [node("here")] + [node("abs", [i]) for i in range(5000)]}
    with pytest.raises(ExpressionError, match="over the limit"):
        Graph.from_json(many, [])
    allowed = frozenset(OPS) - {"call"}
    graph = {"nodes": [node("here"), node("call", [0], path="lm_head")]}
    with pytest.raises(ExpressionError, match="not allowed on this host"):
        Graph.from_json(graph, [], allowed=allowed)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compute_directional_ablation_equals_hooks(family: str) -> None:
    hf = (make_gpt2 if family == "gpt2" else make_llama)()
    block = "transformer.h.1" if family == "gpt2" else "model.layers.1"
    d = direction()
    probe = insert(
        ts.wrap(hf), block, "insert_after", L.Compute(ts.here - (ts.here @ d)[..., None] * d)
    )
    got = execute(read_back(ts.plan(probe)), ts.wrap(hf), ids())
    with hooks(hf, post={block: replace_output(lambda x: x - (x @ d)[..., None] * d)}):
        want = hf(ids()).logits
    assert max_diff(got.output.logits, want) <= 1e-6


def test_setvalues_and_add_take_expressions_that_read_earlier_saves() -> None:
    hf = make_gpt2()
    probe = insert(ts.wrap(hf), "transformer.h.0", "insert_after", L.Save("h0"))
    probe = insert(
        probe,
        "transformer.h.1",
        "insert_after",
        L.SetValues(ts.idx[:, 1], ts.saved("h0")[:, 4] * 2.0),
    )
    probe = insert(
        probe, "transformer.h.2", "insert_before", L.Add(ts.saved("h0").mean(1, keepdim=True), 0.5)
    )
    got = execute(read_back(ts.plan(probe)), ts.wrap(hf), ids())
    kept: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: object, output: object) -> None:
        kept["h0"] = first(output)

    def set_row(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 1] = kept["h0"][:, 4] * 2.0
        return x

    def add(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] + 0.5 * kept["h0"].mean(1, keepdim=True), *args[1:])

    with hooks(
        hf,
        pre={"transformer.h.2": add},
        post={"transformer.h.0": keep, "transformer.h.1": replace_output(set_row)},
    ):
        want = hf(ids()).logits
    assert max_diff(got.output.logits, want) <= 1e-6


def test_a_value_saved_later_in_the_pass_is_an_error_naming_the_key() -> None:
    model = ts.wrap(make_gpt2())
    probe = insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here + ts.saved("h3")))
    probe = insert(probe, "transformer.h.2", "insert_after", L.Save("h3"))
    with pytest.raises(ExpressionError, match=r"nothing was saved under 'h3'.*must sit at a site"):
        ts.run(probe, ids())
    with pytest.raises(ExpressionError, match=r"call the model with ts\.run"):
        probe(ids())  # a plain call has no run to read from


def test_layer_expressions_refuse_ts_out_and_returning_refuses_ts_here() -> None:
    with pytest.raises(ExpressionError, match="known only after the forward pass"):
        L.Compute(ts.here + ts.out("logits"))
    recorded = ts.plan(ts.wrap(make_gpt2()))
    with pytest.raises(ExpressionError, match="a computed result has none"):
        recorded.returning(x=ts.here * 2)


def test_stop_ends_the_pass_and_keeps_what_was_saved() -> None:
    hf = make_gpt2()
    probe = insert(ts.wrap(hf), "transformer.h.1", "insert_after", L.Save("h1"))
    probe = insert(probe, "transformer.h.2", "insert_before", L.Stop())
    calls: list[str] = []
    with hooks(
        hf,
        post={
            p: (lambda m, a, o, p=p: calls.append(p))
            for p in ("transformer.h.1", "transformer.h.2", "lm_head")
        },
    ):
        result = execute(read_back(ts.plan(probe)), ts.wrap(hf), ids())
    assert result.output is None and calls == ["transformer.h.1"]
    with hooks(hf, post={"transformer.h.1": lambda m, a, o: calls.append(first(o))}):
        hf(ids())
    assert max_diff(result.saved["h1"], calls[-1]) == 0
    with pytest.raises(L.StopRun, match="stops here"):
        probe(ids())


def test_computed_returns_logit_difference_and_logit_lens() -> None:
    hf = make_gpt2()
    model = ts.wrap(hf)
    probe = insert(model, "transformer.h.1", "insert_after", L.Save("h1"))
    logits = ts.out("logits")
    lens = ts.call("lm_head", ts.call("transformer.ln_f", ts.saved("h1")))
    recorded = read_back(
        ts.plan(probe).returning(
            diff=logits[:, -1, 5] - logits[:, -1, 9], lens=lens.softmax(-1).argmax(-1)
        )
    )
    result = execute(recorded, model, ids())
    assert sorted(result.records) == ["diff", "lens"] and result.output is None
    kept = []
    with hooks(hf, post={"transformer.h.1": lambda m, a, o: kept.append(first(o))}):
        want = hf(ids()).logits
    assert max_diff(result.saved["diff"], want[:, -1, 5] - want[:, -1, 9]) <= 1e-6
    assert torch.equal(result.saved["lens"], hf.lm_head(hf.transformer.ln_f(kept[0])).argmax(-1))


def test_computed_names_that_clash_with_saved_keys_are_refused() -> None:
    probe = insert(ts.wrap(make_gpt2()), "transformer.h.1", "insert_after", L.Save("h1"))
    recorded = ts.plan(probe).returning(h1=ts.saved("h1") * 2)
    with pytest.raises(ts.plans.PlanError, match="already saved keys"):
        execute(recorded, ts.wrap(make_gpt2()), ids())


# --------------------------------------------------------------------------- plans


def test_plans_refuse_bad_expressions_naming_the_field() -> None:
    model = ts.wrap(make_gpt2())
    recorded = ts.plan(insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here.abs())))
    manifest, tensors = recorded.manifest()
    manifest["steps"][0]["layer"]["config"]["expr"]["expr"]["nodes"][1]["op"] = "system"
    with pytest.raises(
        PlanFormatError, match=r"steps\.0\.layer\.config\.expr.*unknown operation 'system'"
    ):
        Plan.from_bytes(pack(manifest, tensors))
    narrowed = PlanLimits(allowed_ops=frozenset({"add"}))
    with pytest.raises(PlanFormatError, match="'abs' is not allowed on this host"):
        Plan.from_bytes(recorded.to_bytes(), narrowed)
    computed = ts.plan(model).returning(x=ts.out("logits").abs())
    manifest, tensors = computed.manifest()
    manifest["returning"]["computed"]["x"]["expr"]["nodes"][1]["params"] = {"dim": 0}
    with pytest.raises(PlanFormatError, match=r"returning\.computed\.x\.expr.*unknown parameter"):
        Plan.from_bytes(pack(manifest, tensors))


def test_plans_with_expressions_compare_by_value() -> None:
    model = ts.wrap(make_gpt2())
    a = ts.plan(insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here * direction())))
    b = ts.plan(insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here * direction())))
    c = ts.plan(insert(model, "transformer.h.1", "insert_after", L.Compute(ts.here * direction(2))))
    assert a == b and a == read_back(a) and a != c
    assert "Compute(expr=(here * <tensor [64] float32>))" in repr(a)


@pytest.fixture
def registry() -> Iterator[None]:
    """The layer registry as it was, after a test that registers its own layers."""
    from torchsurgeon.layers import base

    kept = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(kept)


@pytest.mark.usefixtures("registry")
def test_custom_layers_follow_the_constructor_protocol_and_round_trip() -> None:
    @L.register_layer
    class Shift(L.InterventionLayer):  # a constructor with neither on= nor index=
        type_name = "TestShift"
        config_fields = ("by",)
        takes_index = False

        def __init__(self, by: float) -> None:
            super().__init__()
            self.by = by

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.by

    hf = make_gpt2()
    probe = insert(ts.wrap(hf), "transformer.h.1", "insert_after", Shift(0.25))
    got = execute(read_back(ts.plan(probe)), ts.wrap(hf), ids())
    with hooks(hf, post={"transformer.h.1": replace_output(lambda x: x + 0.25)}):
        assert max_diff(got.output.logits, hf(ids()).logits) <= 1e-6

    with pytest.raises(TypeError, match=r"does not take \['scale'\]"):

        @L.register_layer
        class Broken(L.InterventionLayer):
            type_name = "TestBroken"
            config_fields = ("scale",)

            def __init__(self) -> None:
                super().__init__()
                self.scale = 1.0


# --------------------------------------------------------------------------- sessions


def test_session_patches_across_prompts_at_another_position() -> None:
    hf = make_llama()
    model = ts.wrap(hf)
    clean = insert(model, "model.layers.1", "insert_after", L.Save("h"))
    patched = insert(
        model,
        "model.layers.1",
        "insert_after",
        L.SetValues(ts.idx[:, 2], ts.saved("h", run="clean")[:, 4]),
    )
    session = ts.session(clean=(clean, ids(0)), patched=(patched, ids(1)))
    results = ts.run(session)
    kept = []
    with hooks(
        hf,
        post={"model.layers.1": lambda m, a, o: kept.append(o[0] if isinstance(o, tuple) else o)},
    ):
        hf(ids(0))

    def patch(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 2] = kept[0][:, 4]
        return x

    with hooks(hf, post={"model.layers.1": replace_output(patch)}):
        want = hf(ids(1)).logits
    assert list(results) == ["clean", "patched"]
    assert max_diff(results["patched"].output.logits, want) <= 1e-6
    as_plans = ts.session(
        clean=(ts.plan(clean), ids(0)), patched=(read_back(ts.plan(patched)), ids(1))
    )
    executed = execute(as_plans, ts.wrap(hf))
    assert max_diff(executed["patched"].output.logits, want) <= 1e-6
    with pytest.raises(TypeError, match=r"ts\.plans\.execute"):
        ts.run(as_plans)


def test_session_names_an_unknown_run() -> None:
    model = ts.wrap(make_gpt2())
    reader = insert(model, "transformer.h.1", "insert_after", L.Compute(ts.saved("h", run="clen")))
    with pytest.raises(
        ExpressionError,
        match=r"no earlier run of this session is named 'clen'; earlier runs: \['clean'\]",
    ):
        ts.run(ts.session(clean=(model, ids()), next=(reader, ids())))
    with pytest.raises(ValueError, match="already has a run named"):
        ts.session(a=(model, ids())).then("a", model, ids())


# --------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_expressions_compile_with_fullgraph() -> None:
    torch.manual_seed(0)
    net = ts.wrap(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    d = torch.randn(8)
    probe = insert(net, "0", "insert_after", L.Save("a"))
    edit = ts.ops.where(ts.here > 0, ts.here - (ts.here @ d)[..., None] * d, ts.saved("a") * 0.5)
    probe = insert(probe, "2", "insert_before", L.Compute(edit))
    x = torch.randn(3, 8)
    eager = ts.run(probe, x)
    compiled = ts.run(torch.compile(probe, fullgraph=True), x)  # a graph break would raise
    assert torch.equal(compiled.output, eager.output)
    assert torch.equal(compiled.saved["a"], eager.saved["a"])
