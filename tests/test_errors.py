"""Bad input gets a clear error naming what was wrong and the nearest valid choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts
from torchsurgeon.selectors.expression import steps_to_json


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    return ts.wrap(GPT2LMHeadModel(config).eval())


def test_wrong_path_names_the_missing_segment_and_nearest_paths(gpt2: nn.Module) -> None:
    with pytest.raises(ts.PathError) as error:
        ts.select(gpt2).at("transformer.hh.0.mlp")
    message = str(error.value)
    assert "'transformer' (GPT2Model) has no child 'hh'" in message
    assert "Its children: wte, wpe, drop, h, ln_f" in message
    assert "'transformer.h.0.mlp'" in message


def test_glob_matching_nothing_is_an_error(gpt2: nn.Module) -> None:
    with pytest.raises(ts.PathError, match=r"at\('\*\*\.down_proj'\) matched nothing.*Nearest"):
        ts.select(gpt2).at("**.down_proj")


def test_index_out_of_range_in_path(gpt2: nn.Module) -> None:
    with pytest.raises(ts.PathError, match=r"no child '7'"):
        ts.select(gpt2).at("transformer.h.7")


def test_unknown_class_name_suggests_close_ones(gpt2: nn.Module) -> None:
    with pytest.raises(ts.SelectionError, match=r"did you mean one of: .*GPT2MLP"):
        ts.select(gpt2).at_instances_of("GPT2Mlp")


def test_at_instances_of_rejects_non_module_classes(gpt2: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"expects an nn\.Module class, got int"):
        ts.select(gpt2).at_instances_of(int)  # type: ignore[arg-type]


def test_empty_selection_cannot_be_rewritten(gpt2: nn.Module) -> None:
    empty = ts.select(gpt2).at("transformer.h.0.mlp").at_instances_of("LayerNorm")
    with pytest.raises(ts.SelectionError, match=r"insert_after: the selection is empty.*LayerNorm"):
        empty.insert_after(ts.layers.Save("x"))


def test_get_needs_exactly_one(gpt2: nn.Module) -> None:
    with pytest.raises(ts.SelectionError, match=r"exactly one selected node; this selection has 2"):
        ts.select(gpt2).at("transformer.h.*").get()


def test_rewrite_with_a_non_module_is_a_type_error(gpt2: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"insert_before expects an nn.Module .* got function"):
        ts.select(gpt2).at("transformer.h.0").insert_before(lambda x: x)  # type: ignore[arg-type]


def test_remove_from_a_non_sequence_parent(gpt2: nn.Module) -> None:
    with pytest.raises(ts.SelectionError, match=r"parent of 'transformer.h.0.mlp' is a GPT2Block"):
        ts.select(gpt2).at("transformer.h.0.mlp").remove_from_parent()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ts.idx[0.5], r"entry 0 is float \(0.5\); use ints, slices of ints"),
        (lambda: ts.idx[:, "a"], r"entry 1 is str"),
        (lambda: ts.idx[[1, 2.0]], r"entry 0 is \[1, 2.0\]; a list entry must be"),
        (lambda: ts.idx[::-1], r"slice step -1"),
        (lambda: ts.idx[..., 0, ...], r"at most one '...'"),
        (lambda: ts.idx[0.0:2], r"slice whose start is 0.0"),
    ],
)
def test_bad_index_at_construction(build: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        build()  # type: ignore[operator]


def test_index_that_does_not_fit_names_site_dimension_and_range(gpt2: nn.Module) -> None:
    probe = (
        ts.select(gpt2)
        .at("transformer.h.0.mlp.c_proj")
        .insert_before(ts.layers.SetValues(ts.idx[:, -1, [7171]], 5.0))
    )
    with pytest.raises(IndexError) as error:
        probe(torch.randint(0, 64, (1, 4)))
    message = str(error.value)
    assert "SetValues at 'transformer.h.0.mlp.c_proj.ts_before.0'" in message or (
        "SetValues at 'transformer.h.0.mlp.c_proj'" in message
    )
    assert "dimension 2 has size 128, so 7171 is out of range (valid: -128..127)" in message


def test_layer_spec_errors() -> None:
    with pytest.raises(TypeError, match=r"index built with ts\.idx"):
        ts.layers.Zero((0, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN or infinite"):
        ts.layers.SetValues(None, float("nan"))
    with pytest.raises(ValueError, match="one source, or one per target"):
        ts.layers.Patch([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="std must be a number >= 0"):
        ts.layers.Noise(-1.0)
    with pytest.raises(TypeError, match="on= must be an int, a str or None"):
        ts.layers.Save("x", on=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown intervention layer type 'Sav'; registered: Add"):
        ts.layers.layer_class("Sav")


def test_duplicate_save_keys_are_refused_when_inserted(gpt2: nn.Module) -> None:
    with pytest.raises(
        ts.SelectionError, match=r"key 'resid'.*'transformer.h.0'.*Save\('resid\{layer\}'\)"
    ):
        ts.select(gpt2).at("transformer.h.*").insert_after(ts.layers.Save("resid"))
    probe = ts.select(gpt2).at("transformer.h.0").insert_after(ts.layers.Save("resid"))
    with pytest.raises(ts.SelectionError, match=r"key 'resid'"):
        ts.select(probe).at("transformer.h.1").insert_before(ts.layers.SaveGrad("resid"))


def test_missing_target_names_the_call(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.0").insert_before(ts.layers.Zero(on="no_such_arg"))
    with pytest.raises(ValueError, match=r"Zero inserted before GPT2Block at 'transformer.h.0'"):
        probe(torch.randint(0, 64, (1, 4)))


def test_callable_predicate_refuses_to_serialize_naming_the_step(gpt2: nn.Module) -> None:
    selection = ts.select(gpt2).at("transformer.h.*").where(lambda m: True)
    with pytest.raises(ts.SerializationError, match=r"selector step 1 \.where\(.*Python callable"):
        steps_to_json(selection.steps)


def test_frozen_error_names_path_and_functional_way(gpt2: nn.Module) -> None:
    with pytest.raises(ts.FrozenModuleError, match=r"'transformer.h.0.mlp' of frozen GPT2Block"):
        gpt2.transformer.h[0].mlp = nn.Identity()
    with pytest.raises(ts.FrozenModuleError, match=r"ts\.select\(model\)\.at\('mlp'\)"):
        gpt2.transformer.h[0].mlp = nn.Identity()
    with pytest.raises(ts.FrozenModuleError, match=r"new tensors instead: ts\.tree\.map"):
        gpt2.lm_head.weight = nn.Parameter(torch.zeros(64, 32))
    with pytest.raises(ts.FrozenModuleError, match="load_state_dict"):
        gpt2.load_state_dict(gpt2.state_dict())
