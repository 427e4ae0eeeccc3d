"""Rewrites never change the model they start from, and share everything they do not touch.

"Unchanged" is checked three ways against a snapshot taken before: the structure (every
``(path, class, children, hook counts)``), every parameter/buffer value (``torch.equal``
against a clone) and every tensor's ``data_ptr`` and identity. "Shared" means the new model
holds the very same tensor object at every place the rewrite did not touch.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, make_gpt2, make_llama
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts


@dataclass
class Snapshot:
    structure: list[tuple[str, type, tuple[str, ...], int, int]]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, int]]


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by every name it has (tied ones under each place)."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


def snapshot(model: nn.Module) -> Snapshot:
    structure = [
        (path, type(m), tuple(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks))
        for path, m in model.named_modules(remove_duplicate=False)
    ]
    tensors = {n: (t, t.detach().clone(), t.data_ptr()) for n, t in tensors_of(model).items()}
    return Snapshot(structure, tensors)


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after.structure == before.structure
    assert after.tensors.keys() == before.tensors.keys()
    for name, (tensor, value, ptr) in before.tensors.items():
        now = after.tensors[name][0]
        assert now is tensor, name
        assert now.data_ptr() == ptr, name
        assert now.dtype == value.dtype and torch.equal(now, value), name


def assert_shared_except(new: nn.Module, old: nn.Module, touched: tuple[str, ...]) -> int:
    """Every tensor of ``old`` outside ``touched`` sits unchanged (same object) in ``new``."""
    new_tensors = tensors_of(new)
    shared = 0
    for name, tensor in tensors_of(old).items():
        if any(name == t or name.startswith(t + ".") for t in touched):
            continue
        assert new_tensors[name] is tensor, name
        assert new_tensors[name].data_ptr() == tensor.data_ptr(), name
        shared += 1
    return shared


@pytest.fixture
def llama_pair() -> tuple[nn.Module, nn.Module]:
    """A fresh plain Llama and its frozen wrap (fresh: these tests try to break them)."""
    plain = make_llama()
    return plain, ts.wrap(plain)


# --------------------------------------------------------------------- rewrites

Rewrite = Callable[[nn.Module], tuple[nn.Module, tuple[str, ...]]]
VEC = torch.ones(HIDDEN)


def _insert_before_many(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    new = ts.select(model).at("**.down_proj").insert_before(ts.layers.Scale(2.0))
    return new, ()


def _insert_after_block(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    new = ts.select(model).at("model.layers.1").insert_after(ts.layers.Add(VEC, 0.5))
    new = ts.select(new).at("model.layers.1").insert_after(ts.layers.Save("x"))
    return new, ()


def _replace(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    new = ts.select(model).at("model.layers.0.mlp.up_proj").replace(nn.Linear(HIDDEN, 128))
    return new, ("model.layers.0.mlp.up_proj",)


def _apply(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    new = ts.select(model).at_instances_of("LlamaRMSNorm").apply(lambda node: nn.Identity())
    return new, tuple(p for p, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm")


def _remove(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    new = ts.select(model).at("model.layers.1").remove_from_parent()
    assert len(new.model.layers) == 2
    moved, was = new.model.layers[1], model.model.layers[2]
    assert moved is not was  # moved up: a new node that knows its new path ...
    moved_tensors, was_tensors = dict(moved.named_parameters()), dict(was.named_parameters())
    assert moved_tensors.keys() == was_tensors.keys()
    assert all(moved_tensors[name] is was_tensors[name] for name in was_tensors)  # same tensors
    return new, ("model.layers.1", "model.layers.2")  # layer 2 is renumbered to 1


def _map_one(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    target = model.model.norm.weight
    new = ts.tree.map(lambda t: t * 2 if t is target else t, model)
    return new, ("model.norm.weight",)


def _to_double(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    return model.to(torch.float64), ("",)


REWRITES: dict[str, Rewrite] = {
    "insert_before-3-sites": _insert_before_many,
    "insert_after-stacked": _insert_after_block,
    "replace": _replace,
    "apply": _apply,
    "remove_from_parent": _remove,
    "tree.map-one-tensor": _map_one,
    "to-float64": _to_double,
}


@pytest.mark.parametrize("name", list(REWRITES))
def test_rewrite_leaves_original_unchanged_and_shares_the_rest(
    name: str, llama_pair: tuple[nn.Module, nn.Module]
) -> None:
    plain, frozen = llama_pair
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_before = plain(ids).logits
    before_plain, before_frozen = snapshot(plain), snapshot(frozen)

    new, touched = REWRITES[name](frozen)

    assert new is not frozen
    assert ts.is_frozen(new)
    assert_unchanged(plain, before_plain)
    assert_unchanged(frozen, before_frozen)
    if touched != ("",):
        shared = assert_shared_except(new, frozen, touched)
        assert shared > 0
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, out_before)
        assert torch.equal(frozen(ids).logits, out_before)
        new(ids)  # the new model runs


def test_insertions_share_every_base_tensor_and_copy_only_the_route(
    llama_pair: tuple[nn.Module, nn.Module],
) -> None:
    _, frozen = llama_pair
    new = ts.select(frozen).at("model.layers.2.mlp.down_proj").insert_before(ts.layers.Zero())
    old_modules = {id(m) for m in frozen.modules()}
    fresh = [p for p, m in new.named_modules() if id(m) not in old_modules]
    # the route root -> model -> layers -> 2 -> mlp -> down_proj, plus the ModuleList and
    # the layer inserted there; nothing else is a new object
    assert fresh == [
        "",
        "model",
        "model.layers",
        "model.layers.2",
        "model.layers.2.mlp",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.mlp.down_proj.ts_before",
        "model.layers.2.mlp.down_proj.ts_before.0",
    ]
    assert new.model.layers[1] is frozen.model.layers[1]
    assert new.model.layers[2].self_attn is frozen.model.layers[2].self_attn
    assert assert_shared_except(new, frozen, ()) == len(tensors_of(frozen))


# --------------------------------------------------------------------- failed rewrites


class Boom(RuntimeError):
    pass


def _bad_path(model: nn.Module) -> None:
    ts.select(model).at("model.layer.0.mlp").insert_before(ts.layers.Zero())


def _bad_layer(model: nn.Module) -> None:
    ts.select(model).at("**.down_proj").insert_before("not a layer")  # type: ignore[arg-type]


def _bad_layer_name(model: nn.Module) -> None:
    # the name is filled in per site: model.norm (the last site) has no layer index
    ts.select(model).at_instances_of("LlamaRMSNorm").insert_after(ts.layers.Save("n{layer}"))


def _apply_raises_half_way(model: nn.Module) -> None:
    calls: list[nn.Module] = []

    def fn(node: nn.Module) -> nn.Module:
        calls.append(node)
        if len(calls) == 3:
            raise Boom("third site")
        return nn.Identity()

    try:
        ts.select(model).at("**.mlp.*").apply(fn)  # 9 sites: 3 projections x 3 layers
    finally:
        assert len(calls) == 3  # two edits had already happened when it raised


def _apply_returns_junk(model: nn.Module) -> None:
    ts.select(model).at("**.up_proj").apply(lambda node: "junk")  # type: ignore[arg-type,return-value]


def _remove_from_non_sequence(model: nn.Module) -> None:
    ts.select(model).at("model.layers.0.mlp").remove_from_parent()


FAILURES: dict[str, tuple[Callable[[nn.Module], None], type[BaseException]]] = {
    "bad-path": (_bad_path, ts.PathError),
    "bad-layer": (_bad_layer, TypeError),
    "bad-layer-name": (_bad_layer_name, ValueError),
    "apply-raises-half-way": (_apply_raises_half_way, Boom),
    "apply-returns-junk": (_apply_returns_junk, TypeError),
    "remove-from-non-sequence": (_remove_from_non_sequence, ts.SelectionError),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failed_rewrite_leaves_original_unchanged(
    name: str, llama_pair: tuple[nn.Module, nn.Module]
) -> None:
    plain, frozen = llama_pair
    # a rewritten model made earlier must survive its base's failed rewrite too
    earlier = ts.select(frozen).at("model.layers.0").insert_after(ts.layers.Save("h0"))
    before = snapshot(plain), snapshot(frozen), snapshot(earlier)
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_before = plain(ids).logits

    action, error = FAILURES[name]
    with pytest.raises(error):
        action(frozen)
    with pytest.raises(error):
        action(earlier)

    assert_unchanged(plain, before[0])
    assert_unchanged(frozen, before[1])
    assert_unchanged(earlier, before[2])
    assert not any(("ts_before" in p or "ts_after" in p) for p, _ in frozen.named_modules())
    with torch.no_grad():
        assert torch.equal(frozen(ids).logits, out_before)
        result = ts.run(earlier, ids)
    assert torch.equal(result.output.logits, out_before)
    assert set(result.saved) == {"h0"}
    # and the tree still takes a good rewrite afterwards
    good = ts.select(frozen).at("model.layers.0.mlp.down_proj").insert_before(ts.layers.Zero())
    with torch.no_grad():
        assert not torch.equal(good(ids).logits, out_before)


# --------------------------------------------------------------------- frozen trees


def test_setattr_submodule_raises_naming_the_path(llama_pair: tuple[nn.Module, nn.Module]) -> None:
    plain, frozen = llama_pair
    before = snapshot(plain), snapshot(frozen)
    with pytest.raises(ts.FrozenModuleError) as info:
        frozen.model.layers[1].mlp = nn.Identity()
    message = str(info.value)
    assert "'model.layers.1.mlp'" in message
    assert "ts.select" in message
    assert isinstance(info.value, AttributeError)  # hasattr-style callers still behave
    with pytest.raises(ts.FrozenModuleError, match=r"model\.layers\.1\.mlp\.down_proj"):
        del frozen.model.layers[1].mlp.down_proj
    with pytest.raises(ts.FrozenModuleError, match=r"model\.layers\.0\.extra"):
        frozen.model.layers[0].add_module("extra", nn.Identity())
    with pytest.raises(ts.FrozenModuleError):
        frozen.model.layers[0] = nn.Identity()  # ModuleList.__setitem__ -> setattr
    assert_unchanged(plain, before[0])
    assert_unchanged(frozen, before[1])


def test_setattr_parameter_raises_naming_the_path(llama_pair: tuple[nn.Module, nn.Module]) -> None:
    plain, frozen = llama_pair
    before = snapshot(plain), snapshot(frozen)
    with pytest.raises(ts.FrozenModuleError) as info:
        frozen.lm_head.weight = nn.Parameter(torch.zeros(VOCAB, HIDDEN))
    assert "'lm_head.weight'" in str(info.value)
    assert "ts.tree.map" in str(info.value) and "ts.tree.unflatten" in str(info.value)
    with pytest.raises(ts.FrozenModuleError, match=r"model\.norm\.weight"):
        frozen.model.norm.weight = torch.zeros(HIDDEN)  # a plain tensor over a parameter
    with pytest.raises(ts.FrozenModuleError, match=r"model\.norm\.bias"):
        frozen.model.norm.register_parameter("bias", nn.Parameter(torch.zeros(HIDDEN)))
    with pytest.raises(ts.FrozenModuleError, match=r"model\.norm\.weight"):
        del frozen.model.norm.weight
    with pytest.raises(ts.FrozenModuleError, match="load_state_dict"):
        frozen.load_state_dict(plain.state_dict())
    assert_unchanged(plain, before[0])
    assert_unchanged(frozen, before[1])
    with pytest.raises(ts.FrozenModuleError, match=r"model\.norm\.some_flag"):
        frozen.model.norm.some_flag = 3  # every write is refused, not only structure
    assert not hasattr(frozen.model.norm, "some_flag")


def test_inserted_layer_lists_are_frozen_too(llama_pair: tuple[nn.Module, nn.Module]) -> None:
    """``ts_before``/``ts_after`` are nodes of the tree: shared by later rewrites, so frozen."""
    _, frozen = llama_pair
    site = "model.layers.1"
    probe = ts.select(frozen).at(site).insert_after(ts.layers.Scale(2.0))
    later = ts.select(probe).at("model.layers.0").insert_after(ts.layers.Zero())
    assert later.model.layers[1] is probe.model.layers[1]  # the site node is shared
    layers = probe.get_submodule(f"{site}.ts_after")
    assert ts.is_frozen(layers) and ts.is_frozen(layers[0])
    with pytest.raises(ts.FrozenModuleError, match=r"model\.layers\.1\.ts_after\.1"):
        layers.append(ts.layers.Zero())
    with pytest.raises(ts.FrozenModuleError, match=r"model\.layers\.1\.ts_after\.0"):
        layers[0] = ts.layers.Zero()
    with pytest.raises(ts.FrozenModuleError, match=r"model\.layers\.1\.ts_after\.0\.extra"):
        layers[0].extra = nn.Linear(2, 2)
    assert len(later.get_submodule(f"{site}.ts_after")) == 1
    assert [type(m).__name__ for m in later.get_submodule(f"{site}.ts_after")] == ["Scale"]


def test_moved_frozen_nodes_name_their_new_paths(llama_pair: tuple[nn.Module, nn.Module]) -> None:
    """A frozen node moved by a rewrite reports where it now is, not where it came from."""
    plain, frozen = llama_pair
    donor = ts.wrap(plain)
    swapped = ts.select(frozen).at("model.layers.0.mlp").replace(donor.model.layers[1].mlp)
    moved = swapped.model.layers[0].mlp
    assert moved.down_proj.weight is donor.model.layers[1].mlp.down_proj.weight  # still shared
    with pytest.raises(ts.FrozenModuleError, match=r"'model\.layers\.0\.mlp\.down_proj'"):
        moved.down_proj = nn.Identity()
    with pytest.raises(ts.FrozenModuleError, match=r"'model\.layers\.1\.mlp\.down_proj'"):
        donor.model.layers[1].mlp.down_proj = nn.Identity()  # the donor keeps its own paths

    shorter = ts.select(frozen).at("model.layers.0").remove_from_parent()
    with pytest.raises(ts.FrozenModuleError, match=r"'model\.layers\.0\.mlp'"):
        shorter.model.layers[0].mlp = nn.Identity()  # was model.layers.1 before the removal


@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.to(torch.float64),
        lambda m: m.double(),
        lambda m: m.to(dtype=torch.float64),
    ],
    ids=["to-float64", "double", "to-dtype-kw"],
)
def test_dtype_move_returns_a_new_tree(
    move: Callable[[nn.Module], nn.Module], llama_pair: tuple[nn.Module, nn.Module]
) -> None:
    plain, frozen = llama_pair
    before = snapshot(plain), snapshot(frozen)
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))

    moved = move(frozen)

    assert moved is not frozen and ts.is_frozen(moved)
    assert {t.dtype for t in tensors_of(moved).values() if t.is_floating_point()} == {torch.float64}
    assert {t.dtype for t in tensors_of(frozen).values() if t.is_floating_point()} == {
        torch.float32
    }
    assert_unchanged(plain, before[0])
    assert_unchanged(frozen, before[1])
    gpt2 = ts.wrap(make_gpt2())
    moved_gpt2 = move(gpt2)
    assert moved_gpt2.lm_head.weight is moved_gpt2.transformer.wte.weight  # still tied
    assert moved_gpt2.lm_head.weight.dtype == torch.float64
    assert gpt2.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        got = moved(ids).logits
        want = frozen(ids).logits
    assert got.dtype == torch.float64
    assert (got - want.double()).abs().max().item() <= 1e-5


def test_to_same_dtype_shares_everything(llama_pair: tuple[nn.Module, nn.Module]) -> None:
    _, frozen = llama_pair
    same = frozen.to(torch.float32)
    assert assert_shared_except(same, frozen, ()) == len(tensors_of(frozen))


# --------------------------------------------------------------------- cost of a rewrite


@pytest.fixture(scope="module")
def gpt2_small() -> nn.Module:
    """A real GPT-2-small-shaped model: 12 layers, 768 wide, 124M fp32 parameters."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return ts.wrap(GPT2LMHeadModel(config).eval())


def test_rewriting_gpt2_small_allocates_under_one_megabyte(gpt2_small: nn.Module) -> None:
    model = gpt2_small
    assert sum(p.numel() for p in model.parameters()) > 124_000_000
    base = tensors_of(model)
    base_ptrs = {t.data_ptr() for t in base.values()}
    steer = ts.layers.Add(torch.randn(768), 4.0)  # layers are built before measuring
    save = ts.layers.Save("resid_{n}")

    tracemalloc.start()
    try:
        snap_before = tracemalloc.take_snapshot()
        new = (
            ts.select(model)
            .at("transformer.h.*.attn.c_proj")
            .pick_nth_selected([0, 5, 11])
            .insert_before(steer)
        )
        new = ts.select(new).at("transformer.h.*").pick_nth_selected([3, 9]).insert_after(save)
        _, peak = tracemalloc.get_traced_memory()
        grown = sum(
            s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap_before, "filename")
        )
    finally:
        tracemalloc.stop()

    print(f"\nGPT-2-small rewrite (5 sites): peak {peak} B, net {grown} B on the Python heap")
    assert peak < 1_000_000
    assert grown < 1_000_000
    # no new tensor storage: every base tensor is the same object at the same address, and
    # the only tensors that are not base tensors are the Add layer's own (shared) buffers
    new_tensors = tensors_of(new)
    for name, tensor in base.items():
        assert new_tensors[name] is tensor, name
    extra = {n: t for n, t in new_tensors.items() if n not in base}
    assert all(".ts_before.0." in n for n in extra), sorted(extra)
    assert {t.data_ptr() for t in extra.values()} == {
        steer.vector.data_ptr(),
        steer.scale.data_ptr(),
    }
    assert {t.data_ptr() for t in new_tensors.values()} - base_ptrs == {
        steer.vector.data_ptr(),
        steer.scale.data_ptr(),
    }
    assert new.lm_head.weight is new.transformer.wte.weight  # still tied
    assert [p for p in new_tensors if p.endswith("ts_before.0.vector")] == [
        "transformer.h.0.attn.c_proj.ts_before.0.vector",
        "transformer.h.5.attn.c_proj.ts_before.0.vector",
        "transformer.h.11.attn.c_proj.ts_before.0.vector",
    ]
    ids = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = ts.run(new, ids)
    assert set(result.saved) == {"resid_0", "resid_1"}
