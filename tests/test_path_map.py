"""A plan crosses between a wrapped transformers model and its conversion (``ts.paths``).

Small random-weight Llama and GPT-2 models: a plan built on one form (Save and Add at a
block's output and at an MLP, and a Save at every MLP by a glob) replays on the other form
with the same saved values and logits; a step at a site only one form has, a selector that
is not a literal path and a plan from another checkpoint are refused, naming what is
wrong; a selector path of the other vocabulary names its counterpart. In every family of
the model zoo, each paired site (block, attention, MLP, their output projections, norms,
embeddings, final norm, unembedding) saves the same tensor under both names.
"""

from __future__ import annotations

import pytest
import torch
from models.model_zoo import FAMILIES, make_hf_model
from plan_cases import BLOCKS, HIDDEN, MAKERS, token_ids

import torchsurgeon as ts
from torchsurgeon.plans import IdentityMismatchError, PlanError

TOLERANCE = 1e-5


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


def _probe(model: torch.nn.Module, blocks: str) -> torch.nn.Module:
    """Save at block 1's output, Add at block 0's MLP, Save at every MLP (a glob)."""
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    model = ts.select(model).at(f"{blocks}.1").insert_after(ts.layers.Save("block1"))
    model = ts.select(model).at(f"{blocks}.0.mlp").insert_after(ts.layers.Add(vector, 3.0))
    return ts.select(model).at(f"{blocks}.*.mlp").insert_after(ts.layers.Save("mlp{n}"))


def _assert_same(a: ts.Result, b: ts.Result) -> None:
    assert list(a.saved.keys()) == list(b.saved.keys())
    for key in a.saved:
        assert (a.saved[key] - b.saved[key]).abs().max().item() <= TOLERANCE, key
    assert (_logits(a.output) - _logits(b.output)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_plan_on_the_wrapped_model_replays_on_its_conversion(family: str) -> None:
    hf = MAKERS[family]()
    converted = ts.convert(hf)
    ids = token_ids()
    wrapped_probe = _probe(hf, BLOCKS[family])
    plan = ts.plan(wrapped_probe)

    translated = ts.paths(converted).translate(plan)
    assert [str(s.selection[0]) for s in translated.steps] == [
        "at('blocks.1')",
        "at('blocks.0.mlp')",
        "at('blocks.*.mlp')",
    ]
    expected = ts.run(wrapped_probe, ids)
    _assert_same(expected, ts.run(ts.apply(translated, converted), ids))
    # the Add changed the logits: equality above is not that of two untouched models
    assert (_logits(expected.output) - converted(ids)).abs().max().item() > 1e-3
    # the record of the conversion survives a rewrite of the converted tree
    rewritten = ts.select(converted).at("blocks.2").insert_after(ts.layers.Save("other"))
    again = ts.paths(rewritten).translate(plan)
    assert all(s.same_as(t) for s, t in zip(again.steps, translated.steps, strict=True))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_plan_on_the_conversion_replays_on_the_wrapped_model(family: str) -> None:
    hf = MAKERS[family]()
    converted = ts.convert(hf)
    ids = token_ids()
    converted_probe = _probe(converted, "blocks")
    wrapped = ts.wrap(hf)

    translated = ts.paths(wrapped).translate(ts.plan(converted_probe))
    blocks = BLOCKS[family]
    assert str(translated.steps[2].selection[0]) == f"at('{blocks}.*.mlp')"
    _assert_same(ts.run(converted_probe, ids), ts.run(ts.apply(translated, wrapped), ids))


def test_a_step_at_a_site_only_one_form_has_is_refused_naming_it() -> None:
    hf = MAKERS["llama"]()
    converted = ts.convert(hf)
    only_converted = (
        ts.select(converted).at("blocks.1.resid_mid").insert_after(ts.layers.Save("mid"))
    )
    with pytest.raises(PlanError) as error:
        ts.paths(ts.wrap(hf)).translate(ts.plan(only_converted))
    message = str(error.value)
    assert "step 0" in message and "'blocks.1.resid_mid'" in message
    assert "nearest: 'model.layers.1'" in message

    only_wrapped = ts.select(hf).at("model.layers.2.mlp.act_fn").insert_after(ts.layers.Save("a"))
    with pytest.raises(ts.SurgeryError) as error:
        ts.paths(converted).translate(ts.plan(only_wrapped))
    assert "'model.layers.2.mlp.act_fn'" in str(error.value)
    assert "nearest: 'blocks.2.mlp'" in str(error.value)

    by_class = ts.select(hf).at_instances_of("LlamaMLP").insert_after(ts.layers.Save("m{n}"))
    with pytest.raises(PlanError, match="only literal at"):
        ts.paths(converted).translate(ts.plan(by_class))


def test_a_plan_from_another_checkpoint_or_vocabulary_is_refused() -> None:
    converted = ts.convert(MAKERS["llama"](seed=0))
    other = ts.select(MAKERS["llama"](seed=1)).at("model.layers.0").insert_after(ts.layers.Save())
    with pytest.raises(IdentityMismatchError, match="fingerprint"):
        ts.paths(converted).translate(ts.plan(other))
    same_side = ts.select(converted).at("blocks.0").insert_after(ts.layers.Save("b"))
    with pytest.raises(PlanError, match="needs no translation"):
        ts.paths(converted).translate(ts.plan(same_side))


@pytest.mark.parametrize(
    ("converted_side", "path", "counterpart"),
    [
        (True, "model.layers.1.self_attn.o_proj", "blocks.1.attn.out"),
        (True, "model.layers.*.post_attention_layernorm", "blocks.*.ln2"),
        (False, "blocks.2.mlp.out", "model.layers.2.mlp.down_proj"),
        (False, "final_norm", "model.norm"),
    ],
)
def test_a_selector_path_of_the_other_form_names_its_counterpart(
    converted_side: bool, path: str, counterpart: str
) -> None:
    hf = MAKERS["llama"]()
    model = ts.convert(hf) if converted_side else ts.wrap(hf)
    with pytest.raises(ts.PathError) as error:
        ts.select(model).at(path)
    assert f"calls that site {counterpart!r}" in str(error.value.args[0])
    ts.select(model).at(counterpart)  # and it is a path here


def test_the_map_pairs_every_shared_site_from_the_layouts() -> None:
    gpt2 = MAKERS["gpt2"]()
    pairs = dict(ts.paths(gpt2).pairs)
    assert ts.paths(ts.convert(gpt2)).pairs == ts.paths(gpt2).pairs
    assert pairs["transformer.wte"] == "embed" and pairs["transformer.wpe"] == "pos_embed"
    assert pairs["transformer.h.2.ln_2"] == "blocks.2.ln2"
    assert pairs["transformer.h.0.attn.c_proj"] == "blocks.0.attn.out"
    assert pairs["transformer.ln_f"] == "final_norm" and pairs["lm_head"] == "unembed"
    assert len([w for w in pairs if w.startswith("transformer.h.")]) == 3 * 7


@pytest.mark.parametrize("base", [False, True], ids=["lm", "base"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_paired_site_holds_the_same_tensor_in_both_forms(family: str, base: bool) -> None:
    hf = make_hf_model(family, base=base)
    converted = ts.convert(hf)
    paired = ts.paths(hf)
    assert paired.pairs == ts.paths(converted).pairs
    containers = {paired.layout.blocks, ""}
    sites = [w for w, _ in paired.pairs if w not in containers]
    probe = ts.wrap(hf)
    for i, site in enumerate(sites):
        probe = ts.select(probe).at(site).insert_after(ts.layers.Save(f"s{i}"))
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    wrapped = ts.run(probe, ids).saved
    translated = ts.paths(converted).translate(ts.plan(probe))
    explicit = ts.run(ts.apply(translated, converted), ids).saved
    for i, site in enumerate(sites):
        a, b = wrapped[f"s{i}"], explicit[f"s{i}"]
        if a.shape != b.shape and a.shape[0] == 1:  # BERT's position embeddings broadcast
            a = a.expand_as(b)
        assert (a - b).abs().max().item() <= 1e-4, site
