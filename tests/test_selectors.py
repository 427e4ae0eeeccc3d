"""Selector expressions: every refinement, inspection and rewrite method of ``Selection``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts
from torchsurgeon.selectors import replay
from torchsurgeon.selectors.expression import steps_from_json, steps_to_json


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    return ts.wrap(GPT2LMHeadModel(config).eval())


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
    )
    return ts.wrap(LlamaForCausalLM(config).eval())


def test_select_starts_at_root(gpt2: nn.Module) -> None:
    selection = ts.select(gpt2)
    assert selection.paths == ("",)
    assert selection.count() == 1
    assert selection.get() is gpt2


def test_select_wraps_plain_modules_without_touching_them() -> None:
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    selection = ts.select(plain)
    assert ts.is_frozen(selection.model)
    assert not ts.is_frozen(plain)
    tree_weight, weight = selection.model[0].weight, plain[0].weight
    assert tree_weight is not weight and tree_weight.data_ptr() == weight.data_ptr()


def test_at_dotted_path_and_parts(gpt2: nn.Module) -> None:
    by_dots = ts.select(gpt2).at("transformer.h.1.mlp")
    by_parts = ts.select(gpt2).at("transformer", "h", 1, "mlp")
    assert by_dots.paths == by_parts.paths == ("transformer.h.1.mlp",)
    assert by_dots.get() is gpt2.transformer.h[1].mlp


def test_at_negative_index_resolves_to_the_real_name(gpt2: nn.Module) -> None:
    assert ts.select(gpt2).at("transformer.h.-1").paths == ("transformer.h.2",)


def test_at_is_relative_to_each_selected_node(gpt2: nn.Module) -> None:
    blocks = ts.select(gpt2).at("transformer.h.*")
    assert blocks.paths == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    assert blocks.at("mlp.c_fc").paths == tuple(f"transformer.h.{i}.mlp.c_fc" for i in range(3))


def test_at_double_star_matches_any_depth(gpt2: nn.Module) -> None:
    found = ts.select(gpt2).at("**.c_proj")
    assert found.count() == 6  # attn.c_proj and mlp.c_proj in 3 blocks
    assert all(p.endswith(".c_proj") for p in found.paths)


def test_at_segment_glob(gpt2: nn.Module) -> None:
    assert ts.select(gpt2).at("transformer.h.0.ln_*").paths == (
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
    )


def test_at_instances_of_class_and_name(llama: nn.Module) -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    by_class = ts.select(llama).at_instances_of(LlamaMLP)
    by_name = ts.select(llama).at_instances_of("LlamaMLP")
    assert by_class.paths == by_name.paths == tuple(f"model.layers.{i}.mlp" for i in range(4))


def test_at_instances_of_selects_outermost(gpt2: nn.Module) -> None:
    assert ts.select(gpt2).at_instances_of(nn.Module).paths == ("",)


def test_at_instances_of_follows_one_rule_for_classes_and_names(gpt2: nn.Module) -> None:
    # absent from the whole model: refused for a class as for a name (a typo is likely)
    with pytest.raises(ts.SelectionError, match="Conv2d"):
        ts.select(gpt2).at_instances_of(nn.Conv2d)
    with pytest.raises(ts.SelectionError, match="Conv2d"):
        ts.select(gpt2).at_instances_of("Conv2d")
    # present in the model, but not under the selected nodes: empty for both
    below = ts.select(gpt2).at("transformer.h.0.mlp")
    assert below.at_instances_of(nn.LayerNorm).count() == 0
    assert below.at_instances_of("LayerNorm").count() == 0


def test_where_layer_index(llama: nn.Module) -> None:
    chosen = ts.select(llama).at_instances_of("LlamaMLP").where(ts.layer_index.isin([1, 3]))
    assert chosen.paths == ("model.layers.1.mlp", "model.layers.3.mlp")
    later = ts.select(llama).at("model.layers.*").where(ts.layer_index >= 2)
    assert later.paths == ("model.layers.2", "model.layers.3")


def test_where_path_attr_and_logic(llama: nn.Module) -> None:
    linears = ts.select(llama).at_instances_of(nn.Linear)
    wide = linears.where(ts.attr("out_features") == 64)
    assert all(m.out_features == 64 for m in wide.get_all())
    assert wide.count() == 8  # gate_proj and up_proj in 4 layers
    gates = linears.where(ts.path.matches("*.gate_proj") & (ts.layer_index < 2))
    assert gates.paths == ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj")
    not_first = ts.select(llama).at("model.layers.*").where(~(ts.layer_index == 0))
    assert not_first.count() == 3
    either = (
        ts.select(llama).at("model.layers.*").where((ts.layer_index == 0) | (ts.layer_index == 3))
    )
    assert either.paths == ("model.layers.0", "model.layers.3")


def test_where_accepts_callables(llama: nn.Module) -> None:
    one_arg = ts.select(llama).at_instances_of(nn.Linear).where(lambda m: m.in_features == 64)
    two_args = ts.select(llama).at_instances_of(nn.Linear).where(lambda p, m: "down" in p)
    assert one_arg.paths == two_args.paths
    assert one_arg.count() == 4


def test_at_subtrees_where(gpt2: nn.Module) -> None:
    found = ts.select(gpt2).at_subtrees_where(ts.instance_of("GPT2MLP"))
    assert found.paths == tuple(f"transformer.h.{i}.mlp" for i in range(3))


def test_at_children(gpt2: nn.Module) -> None:
    assert ts.select(gpt2).at("transformer.h.0").at_children().paths == tuple(
        f"transformer.h.0.{n}" for n in ("ln_1", "attn", "ln_2", "mlp")
    )


def test_pick_nth_selected(gpt2: nn.Module) -> None:
    blocks = ts.select(gpt2).at("transformer.h.*")
    assert blocks.pick_nth_selected(-1).paths == ("transformer.h.2",)
    assert blocks.pick_nth_selected([0, 2]).paths == ("transformer.h.0", "transformer.h.2")
    with pytest.raises(IndexError, match=r"has 3 node\(s\), so valid positions are -3..2"):
        blocks.pick_nth_selected(3)


def test_invert_selects_the_largest_disjoint_subtrees(gpt2: nn.Module) -> None:
    inverted = ts.select(gpt2).at("transformer.h.1").invert()
    assert "transformer.h.1" not in inverted.paths
    assert {"transformer.h.0", "transformer.h.2", "transformer.wte", "lm_head"} <= set(
        inverted.paths
    )
    assert "transformer" not in inverted.paths  # it holds the selected block
    assert not any(p.startswith("transformer.h.1.") for p in inverted.paths)


def test_get_all_and_repr(gpt2: nn.Module) -> None:
    blocks = ts.select(gpt2).at("transformer.h.*")
    assert blocks.get_all() == tuple(gpt2.transformer.h)
    assert "at('transformer.h.*')" in repr(blocks)


def test_insert_before_and_after_keep_paths_and_add_nodes(gpt2: nn.Module) -> None:
    probe = ts.select(gpt2).at("transformer.h.0.mlp").insert_before(ts.layers.Zero())
    probe = ts.select(probe).at("transformer.h.0.mlp").insert_after(ts.layers.Save("mlp0"))
    mlp = probe.transformer.h[0].mlp
    assert type(mlp).__name__ == "GPT2MLP"
    assert isinstance(mlp.ts_before[0], ts.layers.Zero)
    assert isinstance(mlp.ts_after[0], ts.layers.Save)
    saves = ts.select(probe).at_instances_of(ts.layers.Save)
    assert saves.paths == ("transformer.h.0.mlp.ts_after.0",)
    assert saves.get().site == "transformer.h.0.mlp"


def test_layers_at_one_site_run_in_insertion_order(gpt2: nn.Module) -> None:
    first = ts.layers.Scale(2.0)
    second = ts.layers.Add(torch.ones(32))
    probe = ts.select(gpt2).at("transformer.h.0").insert_before(first)
    probe = ts.select(probe).at("transformer.h.0").insert_before(second)
    before = probe.transformer.h[0].ts_before
    assert [type(m).__name__ for m in before] == ["Scale", "Add"]


def test_replace_and_apply(gpt2: nn.Module) -> None:
    replaced = ts.select(gpt2).at("transformer.h.*.mlp.act").replace(nn.ReLU())
    assert all(isinstance(b.mlp.act, nn.ReLU) for b in replaced.transformer.h)
    applied = ts.select(gpt2).at("transformer.h.0.ln_1").apply(lambda m: nn.Identity())
    assert isinstance(applied.transformer.h[0].ln_1, nn.Identity)
    assert ts.is_frozen(applied.transformer.h[0].ln_1)
    ids = torch.randint(0, 64, (1, 5))
    assert applied(ids).logits.shape == (1, 5, 64)


def test_remove_from_parent_renumbers(gpt2: nn.Module) -> None:
    shorter = ts.select(gpt2).at("transformer.h.1").remove_from_parent()
    assert len(shorter.transformer.h) == 2
    moved, was = shorter.transformer.h[1], gpt2.transformer.h[2]
    assert moved.mlp.c_fc.weight is was.mlp.c_fc.weight  # same tensors, renumbered node
    assert len(gpt2.transformer.h) == 3


def test_rewrites_leave_the_original_alone(gpt2: nn.Module) -> None:
    before = [(p, type(m)) for p, m in gpt2.named_modules()]
    probe = ts.select(gpt2).at("transformer.h.*").insert_after(ts.layers.Save())
    assert probe is not gpt2
    assert [(p, type(m)) for p, m in gpt2.named_modules()] == before
    assert probe.transformer.wte is gpt2.transformer.wte


def test_expression_round_trips_through_json(llama: nn.Module) -> None:
    selection = (
        ts.select(llama)
        .at_instances_of("LlamaMLP")
        .where(ts.layer_index.isin([1, 2]) & ts.path.matches("model.*"))
        .at("down_proj")
        .pick_nth_selected([0, 1])
    )
    restored = steps_from_json(steps_to_json(selection.steps))
    assert replay(llama, restored).paths == selection.paths


def test_selection_is_immutable(gpt2: nn.Module) -> None:
    selection = ts.select(gpt2)
    refined = selection.at("transformer")
    assert selection.paths == ("",)
    assert refined.paths == ("transformer",)
    with pytest.raises(AttributeError):
        selection.paths = ()  # type: ignore[misc]


@pytest.mark.parametrize("path", ["", "1"])
def test_inserting_on_a_container_is_refused(path: str) -> None:
    """A layer on a Sequential would be iterated as one more element: refuse, naming it."""
    net = ts.wrap(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU())))
    with pytest.raises(ts.SelectionError, match=r"is a container .* Insert on a child"):
        ts.select(net).at(path).insert_after(ts.layers.Save("x"))
    every = ts.select(net).at("**").where(~ts.instance_of("Sequential"))
    probe = every.insert_after(ts.layers.Save())
    assert set(ts.run(probe, torch.randn(2, 4)).saved) == {"0", "1.0", "1.1"}
