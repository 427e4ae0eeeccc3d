"""The pytree view: flatten/unflatten, map, and the functional form under vmap and grad.

References are plain PyTorch on the unmodified transformers model: ``copy.deepcopy`` plus
in-place weight writes for new leaves, forward hooks for steering, ``torch.autograd.grad``
for gradients, a Python loop for ``vmap``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from hook_reference import (
    HIDDEN,
    VOCAB,
    hooks,
    make_bert,
    make_gpt2,
    make_llama,
    max_diff,
    replace_output,
)
from torch import nn

import torchsurgeon as ts


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(77))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


# --------------------------------------------------------------------- flatten / unflatten


def test_flatten_lists_each_tensor_once_and_tied_weights_as_one_leaf(
    gpt2_hf: nn.Module,
) -> None:
    model = ts.wrap(gpt2_hf)
    leaves, treedef = ts.tree.flatten(model)
    distinct = {id(t) for t in _tensors(gpt2_hf).values()}
    assert len(leaves) == len(distinct) == len(treedef.slots)
    ptrs = {t.data_ptr() for t in _tensors(gpt2_hf).values()}
    assert all(leaf.data_ptr() in ptrs for leaf in leaves)  # the tree's own objects, same bytes
    tied = [places for places in treedef.slots if len(places) > 1]
    assert tied == [(("transformer.wte", "weight"), ("lm_head", "weight"))]
    assert treedef.names[0] == "transformer.wte.weight"


def test_unflatten_of_the_same_leaves_is_the_same_model(
    gpt2_hf: nn.Module, ids: torch.Tensor
) -> None:
    model = ts.wrap(gpt2_hf)
    leaves, treedef = ts.tree.flatten(model)
    again = ts.tree.unflatten(treedef, leaves)
    new_tensors = _tensors(again)
    for name, tensor in _tensors(model).items():
        assert new_tensors[name] is tensor, name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, gpt2_hf(ids).logits)


def test_unflatten_new_leaves_round_trip_and_keep_ties(
    gpt2_hf: nn.Module, ids: torch.Tensor
) -> None:
    model = ts.wrap(gpt2_hf)
    leaves, treedef = ts.tree.flatten(model)
    generator = torch.Generator().manual_seed(3)
    new_leaves = [
        leaf + 0.01 * torch.randn(leaf.shape, generator=generator)
        if leaf.is_floating_point()
        else leaf.clone()
        for leaf in leaves
    ]
    with torch.no_grad():
        new_leaves = [leaf.detach() for leaf in new_leaves]
    new = ts.tree.unflatten(treedef, new_leaves)

    # tied: one leaf, written to both places
    assert new.transformer.wte.weight is new.lm_head.weight
    assert torch.equal(new.lm_head.weight, new_leaves[0])
    assert isinstance(new.lm_head.weight, nn.Parameter)
    # round trip: flattening the new model gives back the new leaves, in the same order
    back, back_def = ts.tree.flatten(new)
    assert back_def.slots == treedef.slots
    assert all(torch.equal(a, b) for a, b in zip(back, new_leaves, strict=True))
    # the original is untouched
    assert model.transformer.wte.weight.data_ptr() == gpt2_hf.transformer.wte.weight.data_ptr()
    assert all(a is b for a, b in zip(ts.tree.flatten(model)[0], leaves, strict=True))

    # reference: a deep copy of the plain model with the new values written in by hand
    reference = copy.deepcopy(gpt2_hf)
    with torch.no_grad():
        for places, value in zip(treedef.slots, new_leaves, strict=True):
            path, name = places[0]
            getattr(reference.get_submodule(path), name).copy_(value)
        assert reference.lm_head.weight is reference.transformer.wte.weight
        assert max_diff(new(ids).logits, reference(ids).logits) <= 1e-6
        assert max_diff(new(ids).logits, gpt2_hf(ids).logits) > 1e-3


def test_unflatten_checks_count_and_shape(gpt2_hf: nn.Module) -> None:
    leaves, treedef = ts.tree.flatten(ts.wrap(gpt2_hf))
    with pytest.raises(ValueError, match="leaves"):
        ts.tree.unflatten(treedef, leaves[:-1])
    bad = list(leaves)
    bad[0] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight"):
        ts.tree.unflatten(treedef, bad)


# --------------------------------------------------------------------- map


def _to_fp64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_map_casts_to_a_new_fp64_model(
    family: str, tiny_model: Callable, ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    model = ts.wrap(hf)
    before = {n: (t, t.data_ptr(), t.dtype) for n, t in _tensors(model).items()}

    wide = ts.tree.map(_to_fp64, model)

    wide_tensors = _tensors(wide)
    for name, (tensor, ptr, dtype) in before.items():
        now = _tensors(model)[name]
        assert now is tensor and now.data_ptr() == ptr and now.dtype == dtype == tensor.dtype
        if tensor.is_floating_point():
            assert dtype == torch.float32
            assert wide_tensors[name].dtype == torch.float64, name
            assert torch.equal(wide_tensors[name], tensor.double()), name
        else:  # integer buffers (BERT's position_ids) come back as they were: shared
            assert wide_tensors[name] is tensor, name
    # tied tensors (GPT-2 and BERT tie embedding and unembedding) are cast once, stay tied
    groups: dict[int, list[str]] = {}
    for name, (tensor, _, _) in before.items():
        groups.setdefault(id(tensor), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    assert bool(tied) == (family != "llama")  # GPT-2 and BERT tie the unembedding
    for names in tied:
        assert all(wide_tensors[n] is wide_tensors[names[0]] for n in names), names
    # modules holding no tensors at all are shared objects
    no_tensors = [
        p for p, m in model.named_modules() if not list(m.parameters()) and not list(m.buffers())
    ]
    assert no_tensors
    for path in no_tensors:
        assert wide.get_submodule(path) is model.get_submodule(path), path
    with torch.no_grad():
        got = wide(ids).logits
        want = hf(ids).logits
    assert got.dtype == torch.float64 and want.dtype == torch.float32
    assert max_diff(got, want) <= 1e-5


def test_map_that_changes_one_tensor_shares_every_other_subtree(gpt2_hf: nn.Module) -> None:
    model = ts.wrap(gpt2_hf)
    target = model.transformer.h[1].ln_2.weight
    new = ts.tree.map(lambda t: t * 2 if t is target else t, model)
    assert torch.equal(new.transformer.h[1].ln_2.weight, target * 2)
    assert new.transformer.h[0] is model.transformer.h[0]
    assert new.transformer.h[2] is model.transformer.h[2]
    assert new.transformer.h[1].attn is model.transformer.h[1].attn
    assert new.transformer.h[1].mlp is model.transformer.h[1].mlp
    assert new.transformer.wte is model.transformer.wte
    assert new.lm_head is model.lm_head


# --------------------------------------------------------------------- functional


def test_functional_is_a_pure_function_of_params(gpt2_hf: nn.Module, ids: torch.Tensor) -> None:
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    probe = ts.select(ts.wrap(gpt2_hf)).at("transformer.h.1").insert_after(ts.layers.Add(vec, 2.0))
    fn, params = ts.functional(probe)
    key = "transformer.h.1.ts_after.0.scale"
    assert {"transformer.h.1.ts_after.0.vector", key} <= set(params)
    assert params["transformer.wte.weight"].data_ptr() == gpt2_hf.transformer.wte.weight.data_ptr()

    with torch.no_grad():
        assert torch.equal(fn(params, ids).logits, probe(ids).logits)
        zeroed = fn({**params, key: torch.tensor(0.0)}, ids).logits
        assert torch.equal(zeroed, gpt2_hf(ids).logits)
        # the swap is temporary and private: the model and its params are as they were
        assert torch.equal(fn(params, ids).logits, probe(ids).logits)
        assert probe.transformer.h[1].ts_after[0].scale.item() == 2.0


def _steered(
    family: str,
) -> tuple[nn.Module, nn.Module, str, torch.Tensor]:
    hf = make_gpt2("eager") if family == "gpt2" else make_llama("eager")
    block = "transformer.h.1" if family == "gpt2" else "model.layers.1"
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(6))
    probe = ts.select(ts.wrap(hf)).at(block).insert_after(ts.layers.Add(vec, 1.0))
    return hf, probe, block, vec


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_vmap_over_steering_scales_equals_a_python_loop(family: str, ids: torch.Tensor) -> None:
    hf, probe, block, vec = _steered(family)
    fn, params = ts.functional(probe)
    key = f"{block}.ts_after.0.scale"
    scales = torch.linspace(-4.0, 4.0, 16)

    def logits(scale: torch.Tensor) -> torch.Tensor:
        return fn({**params, key: scale}, ids).logits

    with torch.no_grad():
        batched = torch.func.vmap(logits)(scales)
        loop = torch.stack([logits(s) for s in scales])
        reference = []
        for s in scales:
            with hooks(hf, post={block: replace_output(lambda x, s=s: x + s * vec)}):
                reference.append(hf(ids).logits)
        reference = torch.stack(reference)

    assert batched.shape == (16, *ids.shape, VOCAB)
    assert max_diff(batched, loop) <= 1e-5
    assert max_diff(batched, reference) <= 1e-5
    assert max_diff(batched[0], batched[-1]) > 1e-2  # the scale matters


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grad_of_a_logit_wrt_the_steering_vector_equals_autograd(
    family: str, ids: torch.Tensor
) -> None:
    hf, probe, block, vec = _steered(family)
    fn, params = ts.functional(probe)
    key = f"{block}.ts_after.0.vector"
    token = 17

    def logit(vector: torch.Tensor) -> torch.Tensor:
        return fn({**params, key: vector}, ids).logits[0, -1, token]

    got = torch.func.grad(logit)(vec)

    leaf = vec.clone().requires_grad_(True)
    with hooks(hf, post={block: replace_output(lambda x: x + leaf)}):
        out = hf(ids).logits[0, -1, token]
    (want,) = torch.autograd.grad(out, [leaf])

    assert got.shape == (HIDDEN,)
    assert max_diff(got, want) <= 1e-6
    assert want.abs().max() > 1e-4
    assert all(p.grad is None for p in hf.parameters())


def test_map_of_bert_keeps_integer_buffers_shared() -> None:
    bert = ts.wrap(make_bert())
    wide = ts.tree.map(_to_fp64, bert)
    position_ids = bert.bert.embeddings.position_ids
    assert position_ids.dtype == torch.int64
    assert wide.bert.embeddings.position_ids is position_ids
