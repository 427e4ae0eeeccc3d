"""Plans: record, save, load, validate and replay rewrites as data.

Round trips are property-tested over random mixes of selectors and layers; replay is
checked for every registered layer type against the model built interactively (max abs
diff 0); every malformed file in ``plan_cases.MALFORMED`` must be refused with an error
naming its problem.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_cases import (
    BLOCKS,
    HIDDEN,
    MAKERS,
    MALFORMED,
    TEST_LIMITS,
    VOCAB,
    good_plan,
    layer_cases,
    make_gpt2,
    make_llama,
    rewrite_with,
    token_ids,
)
from torch import nn

import torchsurgeon as ts
from torchsurgeon import plans
from torchsurgeon.plans import (
    IdentityMismatchError,
    Plan,
    PlanError,
    PlanFormatError,
    Structure,
    apply,
    execute,
    identity_of,
    meta,
    plan,
)
from torchsurgeon.plans.identity import fingerprint
from torchsurgeon.plans.wire import pack

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return ts.wrap(make_gpt2())


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return ts.wrap(make_llama())


def assert_same_result(got: ts.Result, want: ts.Result) -> None:
    """Outputs and saved tensors equal exactly: dtype, shape, every value."""
    got_out = got.output.logits if hasattr(got.output, "logits") else got.output
    want_out = want.output.logits if hasattr(want.output, "logits") else want.output
    assert got_out.dtype == want_out.dtype
    assert (got_out - want_out).abs().max().item() == 0
    assert got.saved.keys() == want.saved.keys()
    for key, value in want.saved.items():
        assert got.saved[key].dtype == value.dtype
        assert torch.equal(got.saved[key], value), key


# --------------------------------------------------------------------------- recording


def test_plan_records_steps_layers_and_base_identity(gpt2: nn.Module) -> None:
    recorded = good_plan(gpt2)
    assert [s.operation for s in recorded.steps] == [
        "insert_after",
        "insert_before",
        "insert_after",
    ]
    assert [s.layer.type_name for s in recorded.steps] == ["Add", "SetValues", "Save"]
    assert recorded.steps[0].selection[1].to_json()["arg"]["op"] == "isin"
    assert recorded.base == identity_of(gpt2)
    assert recorded.base.architecture == "GPT2LMHeadModel"
    assert plan(gpt2).steps == ()  # an unrewritten model: an empty plan


def test_plan_of_replayed_model_is_the_same_plan(gpt2: nn.Module) -> None:
    recorded = good_plan(gpt2)
    assert plan(apply(recorded, make_gpt2())) == recorded


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("type_name", sorted(layer_cases()))
def test_every_layer_type_replays_exactly_on_a_fresh_base(family: str, type_name: str) -> None:
    base = ts.wrap(MAKERS[family]())
    probe = rewrite_with(base, family, type_name)
    loaded = Plan.from_bytes(plan(probe).to_bytes())
    fresh = MAKERS[family]()  # same seed, another object: nothing shared with `base`
    rebuilt = apply(loaded, fresh)
    ids = token_ids()
    assert_same_result(ts.run(rebuilt, ids), ts.run(probe, ids))
    assert_same_result(execute(loaded, fresh, ids), ts.run(probe, ids))


def test_layer_cases_cover_the_registry() -> None:
    built_in = {  # a test module may register its own layer (tests/test_custom_layer.py)
        name
        for name, cls in ts.layers.layer_types().items()
        if cls.__module__.startswith("torchsurgeon.")
    }
    assert set(layer_cases()) | {"SaveGrad", "ComputeGrad", "Stop"} == built_in


def test_save_grad_replays_exactly(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.1").insert_after(ts.layers.SaveGrad("g"))
    rebuilt = apply(Plan.from_bytes(plan(probe).to_bytes()), make_gpt2())
    grads = []
    for model in (probe, rebuilt):
        result = ts.run(model, token_ids())
        result.output.logits.sum().backward()
        grads.append(result.saved["g"])
    assert torch.equal(grads[0], grads[1])


def test_replace_and_remove_from_parent_replay(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.0.mlp.act").replace(ts.layers.Scale(1.5))
    probe = ts.select(probe).at("transformer.h.2").remove_from_parent()
    rebuilt = apply(Plan.from_bytes(plan(probe).to_bytes()), make_gpt2())
    assert len(rebuilt.transformer.h) == 2
    assert_same_result(ts.run(rebuilt, token_ids()), ts.run(probe, token_ids()))


def test_apply_never_changes_the_base(gpt2: nn.Module) -> None:
    base = make_gpt2()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    apply(good_plan(gpt2), base)
    assert not ts.is_frozen(base) and not hasattr(base.transformer.h[0], "ts_after")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


# --------------------------------------------------------------------------- round trips

_SELECTIONS = [
    lambda s: s.at("transformer.h.*"),
    lambda s: s.at_instances_of("GPT2MLP"),
    lambda s: s.at("transformer.h.*").where(ts.layer_index.isin([0, 2])),
    lambda s: s.at_subtrees_where(ts.instance_of("GPT2Attention")),
    lambda s: s.at("transformer.h").at_children().pick_nth_selected([1]),
    lambda s: s.at("**.c_fc"),
    lambda s: s.at("transformer.h.*").where(ts.path.matches("*.1") | (ts.layer_index == 0)),
    lambda s: s.at("transformer.h.*").where(~(ts.layer_index >= 2)),
    lambda s: s.at("transformer.h.-1.mlp"),
]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_ANY_SHAPE = [
    "Save",
    "SetValues",
    "Add",
    "Scale",
    "Zero",
    "MeanAblate",
    "Noise",
    "StopGradient",
    "Patch",
]
"""Layer types whose instances below fit any activation (LowRankAdapter needs its widths)."""


@st.composite
def layers(draw: st.DrawFn, step: int) -> nn.Module:
    """A random layer that fits any (batch >= 2, seq, features >= 4) activation."""
    kind = draw(st.sampled_from(_ANY_SHAPE))
    dtype = draw(st.sampled_from(_DTYPES))
    number = draw(st.floats(-3, 3, allow_nan=False, width=16))
    value = torch.tensor(number, dtype=dtype)
    L = ts.layers
    return {
        "Save": lambda: L.Save(f"s{step}_{{n}}"),
        "SetValues": lambda: L.SetValues(ts.idx[:, -1, [0, 3]], value),
        "Add": lambda: L.Add(value.reshape(1), draw(st.sampled_from([0.5, 2.0]))),
        "Scale": lambda: L.Scale(value, index=ts.idx[..., 1:3]),
        "Zero": lambda: L.Zero(ts.idx[:, draw(st.integers(-3, 2))]),
        "MeanAblate": lambda: L.MeanAblate(value.reshape(1, 1)),
        "Noise": lambda: L.Noise(abs(number), seed=draw(st.integers(0, 2**31))),
        "StopGradient": lambda: L.StopGradient(),
        "Patch": lambda: L.Patch(0, [1], index=ts.idx[-1]),
    }[kind]()


@st.composite
def rewritten(draw: st.DrawFn, base: nn.Module) -> nn.Module:
    model = base
    for step in range(draw(st.integers(1, 4))):
        selection = draw(st.sampled_from(_SELECTIONS))(ts.select(model))
        operation = draw(st.sampled_from(["insert_before", "insert_after"]))
        model = getattr(selection, operation)(draw(layers(step)))
    return model


@SETTINGS
@given(data=st.data())
def test_round_trip_of_random_rewrites(gpt2: nn.Module, data: st.DataObject) -> None:
    probe = data.draw(rewritten(gpt2))
    recorded = plan(probe)
    if data.draw(st.booleans()):
        recorded = recorded.returning("logits", topk=3).returning("output", positions=-1)
    encoded = recorded.to_bytes()
    loaded = Plan.from_bytes(encoded)
    assert loaded == recorded
    assert loaded.to_bytes() == encoded  # deterministic bytes
    ids = token_ids()
    rebuilt = apply(loaded, make_gpt2())
    assert plan(rebuilt, base_identity=recorded.base) == plan(probe)
    assert_same_result(ts.run(rebuilt, ids), ts.run(probe, ids))


def test_save_and_load_a_file(gpt2: nn.Module, tmp_path) -> None:
    recorded = good_plan(gpt2).returning("h2", mean=[1])
    path = recorded.save(tmp_path / "probe.tsplan")
    assert Plan.load(path) == recorded
    with pytest.raises(Exception):  # noqa: B017 - whatever torch says, it must not load it
        torch.load(path, weights_only=True)


def test_header_length_starting_with_0x80_is_not_taken_for_a_pickle(gpt2: nn.Module) -> None:
    for length in range(1, 300):
        probe = ts.select(gpt2).at("transformer.h.0").insert_after(ts.layers.Save("x" * length))
        encoded = plan(probe).to_bytes()
        if encoded[0] == 0x80:
            assert Plan.from_bytes(encoded).steps[0].layer.config["name"] == "x" * length
            return
    pytest.fail("no header length with a first byte of 0x80 was produced")


# --------------------------------------------------------------------------- refusing


@pytest.mark.parametrize(("case", "build", "words"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_plan_is_refused_naming_the_problem(
    gpt2: nn.Module, case: str, build, words: str
) -> None:
    with pytest.raises(PlanFormatError) as error:
        Plan.from_bytes(build(good_plan(gpt2)), TEST_LIMITS)
    assert words in str(error.value)


def test_path_missing_from_the_base_names_the_step_and_the_path(gpt2: nn.Module) -> None:
    manifest, tensors = good_plan(gpt2).manifest()
    manifest["steps"][2]["selection"][0]["arg"] = "transformer.hh.2"
    loaded = Plan.from_bytes(pack(manifest, tensors))
    with pytest.raises(PlanError, match=r"step 2 .*'transformer\.hh\.2'.*Nearest valid paths"):
        apply(loaded, gpt2)


def test_callable_predicate_refuses_to_serialize_naming_the_step(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.0").insert_after(ts.layers.Save("a"))
    probe = (
        ts.select(probe)
        .at("transformer.h.*")
        .where(lambda module: True)
        .insert_after(ts.layers.Zero())
    )
    with pytest.raises(ts.SerializationError) as error:
        plan(probe)
    message = str(error.value)
    assert "rewrite step 1" in message and "selector step 1" in message
    assert "Python callable" in message


@pytest.mark.parametrize(
    ("rewrite", "words"),
    [
        (lambda s: s.apply(lambda m: m), "apply("),
        (lambda s: s.replace(nn.Identity()), "Identity is not an intervention layer"),
    ],
    ids=["apply-function", "replace-with-module"],
)
def test_steps_that_are_not_data_refuse_to_serialize(gpt2: nn.Module, rewrite, words: str) -> None:
    probe = ts.select(gpt2).at("transformer.h.0").insert_after(ts.layers.Save("a"))
    probe = rewrite(ts.select(probe).at("transformer.h.1.mlp.act"))
    with pytest.raises(ts.SerializationError, match="rewrite step 1") as error:
        plan(probe)
    assert words in str(error.value)


def test_unregistered_subclass_refuses_to_serialize(gpt2: nn.Module) -> None:
    class Doubler(ts.layers.Scale):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    probe = ts.select(gpt2).at("transformer.h.0").insert_after(Doubler(1.0))
    with pytest.raises(ts.SerializationError, match="not the registered layer"):
        plan(probe)


# --------------------------------------------------------------------------- identity


def test_identity_mismatch_is_a_clear_error(gpt2: nn.Module, llama: nn.Module) -> None:
    recorded = good_plan(gpt2)
    with pytest.raises(IdentityMismatchError, match="GPT2LMHeadModel, this base is a Llama"):
        apply(recorded, llama)
    with pytest.raises(IdentityMismatchError, match="fingerprint") as error:
        apply(recorded, make_gpt2(seed=1))
    assert "architecture" not in str(error.value) and "structure:" not in str(error.value)
    with pytest.raises(IdentityMismatchError, match="structure"):
        apply(recorded, make_gpt2(n_layer=4), match="structure")


def test_structure_match_accepts_other_weights(gpt2: nn.Module) -> None:
    other = make_gpt2(seed=1)
    rebuilt = apply(good_plan(gpt2), other, match="structure")
    assert rebuilt.transformer.wte.weight.data_ptr() == other.transformer.wte.weight.data_ptr()


def test_fingerprint_tells_checkpoints_and_dtypes_apart(gpt2: nn.Module) -> None:
    assert fingerprint(make_gpt2()) == fingerprint(gpt2)
    assert fingerprint(make_gpt2(seed=1)) != fingerprint(gpt2)
    assert fingerprint(make_gpt2().half()) != fingerprint(gpt2)


def test_fingerprint_reads_only_a_few_elements() -> None:
    # 2**28 floats (1 GiB) left uninitialised: the OS maps pages only when they are touched,
    # so hashing every byte would take far longer than sampling a handful of them.
    huge = nn.Module()
    huge.weight = nn.Parameter(torch.empty(2**28), requires_grad=False)
    import time

    start = time.perf_counter()
    fingerprint(huge)
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- returning


def test_reductions_compute_what_they_say(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.*").insert_after(ts.layers.Save("b{n}"))
    recorded = (
        plan(probe)
        .returning("logits", topk=5, positions=-1)
        .returning("b1", mean=[1])
        .returning("b2")
    )
    ids = token_ids()
    full = ts.run(probe, ids)
    got = execute(Plan.from_bytes(recorded.to_bytes()), make_gpt2(), ids)
    values, indices = got.output.logits
    want = full.output.logits[:, -1:].topk(5)
    assert torch.equal(values, want.values) and torch.equal(indices, want.indices)
    assert set(got.saved) == {"b1", "b2"}
    assert torch.equal(got.saved["b1"], full.saved["b1"].mean(1))
    assert torch.equal(got.saved["b2"], full.saved["b2"])


def test_returning_an_unknown_name_lists_what_exists(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.0").insert_after(ts.layers.Save("b0"))
    recorded = plan(probe).returning("b9")
    with pytest.raises(PlanError, match=r"'b9'.*saved \['b0'\].*'logits'"):
        execute(recorded, gpt2, token_ids())


def test_reduction_that_does_not_fit_names_the_entry(gpt2: nn.Module) -> None:
    recorded = plan(gpt2).returning("logits", mean=[5])
    with pytest.raises(PlanError, match="returning 'logits': cannot reduce a tensor of shape"):
        execute(recorded, gpt2, token_ids())


# --------------------------------------------------------------------------- structure only


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meta_model_has_the_structure_and_runs_shapes(family: str) -> None:
    base = ts.wrap(MAKERS[family]())
    structure_only = meta(base)
    assert ts.is_frozen(structure_only)
    real = {p: (type(m).__name__) for p, m in base.named_modules()}
    assert {p: type(m).__name__ for p, m in structure_only.named_modules()} == real
    shapes = {n: t.shape for n, t in base.named_parameters()}
    assert {n: t.shape for n, t in structure_only.named_parameters()} == shapes
    assert all(t.is_meta for t in structure_only.parameters())
    probe = rewrite_with(structure_only, family, "SetValues")
    ids = token_ids()
    result = ts.run(probe, ids.to("meta"))
    want = ts.run(rewrite_with(base, family, "SetValues"), ids)
    assert result.output.logits.shape == want.output.logits.shape == (3, 7, VOCAB)
    assert {k: v.shape for k, v in result.saved.items()} == {
        k: v.shape for k, v in want.saved.items()
    }


@pytest.mark.parametrize("type_name", sorted(layer_cases()))
def test_every_layer_type_runs_on_a_meta_model(gpt2: nn.Module, type_name: str) -> None:
    recorded = plan(rewrite_with(gpt2, "gpt2", type_name))
    result = ts.run(apply(recorded, meta(gpt2)), token_ids().to("meta"))
    assert result.output.logits.is_meta and result.output.logits.shape == (3, 7, VOCAB)


def test_plan_made_on_a_meta_model_applies_exactly_to_the_real_one(gpt2: nn.Module) -> None:
    probe = rewrite_with(meta(gpt2), "gpt2", "Add")
    recorded = Plan.from_bytes(plan(probe).to_bytes())
    assert recorded.base == identity_of(gpt2)  # pinned: the real model's fingerprint
    real = rewrite_with(gpt2, "gpt2", "Add")
    assert_same_result(execute(recorded, make_gpt2(), token_ids()), ts.run(real, token_ids()))


def test_structure_round_trips_through_json_and_builds_a_pinned_meta_model(
    llama: nn.Module,
) -> None:
    structure = plans.structure_of(llama)
    assert structure.kind == "transformers"
    built = Structure.from_json(json.loads(json.dumps(structure.to_json()))).build()
    assert identity_of(built) == identity_of(llama)
    assert all(t.is_meta for t in built.parameters())
    result = ts.run(built, token_ids().to("meta"))
    assert result.output.logits.shape == (3, 7, VOCAB)


def test_tree_structure_of_any_module_supports_selectors_and_plans() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    structure = Structure.from_json(json.loads(json.dumps(plans.structure_of(mlp).to_json())))
    assert structure.kind == "tree"
    stand_in = structure.build()
    chosen = ts.select(stand_in).at_instances_of("Linear").where(ts.attr("out_features") == 16)
    assert chosen.paths == ("0",)
    probe = chosen.insert_after(ts.layers.Scale(3.0))
    with pytest.raises(TypeError, match="stand-in"):
        stand_in(torch.zeros(1, 8))
    x = torch.randn(2, 8)
    rebuilt = apply(Plan.from_bytes(plan(probe).to_bytes()), mlp)
    assert torch.equal(rebuilt(x), mlp[2](mlp[1](3.0 * mlp[0](x))))


def test_hidden_size_constant_matches_the_models(gpt2: nn.Module) -> None:
    assert gpt2.config.n_embd == HIDDEN and BLOCKS["gpt2"] == "transformer.h"
