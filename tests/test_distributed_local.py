"""Edits cut to shards, on one process: every shard's edit, put together, is the full edit.

Tensor parallelism splits an activation along its last dimension into equal parts, one per
rank. ``ts.distributed`` runs an edit written for the full tensor on each shard with its
index translated and its value cut (``torchsurgeon.distributed.split``); here the shards are
slices of one tensor, so the claim is checked without processes: for random indices (ints,
slices with steps, lists — several of them, paired —, ``...``) and values broadcast every
way, ``cat(local edit of each shard) == edit of the whole``, bit for bit. The seed
experiment's neuron 7171 of a 9472-wide MLP split in two is local neuron 2435 of rank 1 and
nothing of rank 0.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchsurgeon as ts
from torchsurgeon.distributed import Split
from torchsurgeon.distributed.sharded import _local_copy
from torchsurgeon.distributed.split import local_part
from torchsurgeon.layers import Add, MeanAblate, Noise, Patch, Scale, SetValues, StopGradient, Zero
from torchsurgeon.layers.base import GATHER

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def sharded_apply(layer: torch.nn.Module, x: torch.Tensor, parts: int) -> torch.Tensor:
    """Each shard of ``x`` (split on the last dimension) edited by its local copy, joined.

    The layer is a tree's (frozen) copy, as ``ts.distributed`` meets it, and must be cut to
    each shard — never left to the gather-edit-scatter path.
    """
    size = x.shape[-1]
    outs = []
    for part in range(parts):
        split = Split(-1, size, parts, part)
        shard = x[..., split.offset : split.offset + split.width]
        local = _local_copy(ts.wrap(layer), tuple(x.shape), split, x.dtype, x.device)
        assert local is not GATHER, layer
        outs.append(shard.clone() if local is None else local(shard))
    return torch.cat(outs, dim=-1)


@st.composite
def cases(draw: st.DrawFn) -> tuple[tuple[int, ...], int, ts.Index]:
    parts = draw(st.sampled_from([1, 2, 3, 4]))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)), parts * draw(st.integers(1, 4)))
    list_length = draw(st.integers(1, 3))

    def entry(size: int) -> object:
        kind = draw(st.sampled_from(["int", "slice", "list", "all"]))
        if kind == "int":
            return draw(st.integers(-size, size - 1))
        if kind == "slice":
            start = draw(st.none() | st.integers(-size - 1, size + 1))
            stop = draw(st.none() | st.integers(-size - 1, size + 1))
            return slice(start, stop, draw(st.none() | st.integers(1, 3)))
        if kind == "list":
            values = draw(st.permutations(range(size)))
            length = min(size, list_length) if draw(st.booleans()) else 1
            return [v - size if draw(st.booleans()) else v for v in values[:length]]
        return slice(None)

    entries = [entry(size) for size in shape]
    form = draw(st.sampled_from(["full", "ellipsis", "short"]))
    if form == "ellipsis":
        cut = draw(st.integers(0, 2))
        entries = [Ellipsis, *entries[cut + 1 :]]
    elif form == "short":
        entries = entries[: draw(st.integers(1, 2))]
    return shape, parts, ts.Index(tuple(entries))


def part_shape(x: torch.Tensor, index: ts.Index) -> tuple[int, ...] | None:
    try:
        return tuple(x[index.torch].shape)
    except (IndexError, RuntimeError):  # lists PyTorch cannot pair
        return None


def values_for(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Values broadcasting against ``shape`` every way: whole, trailing dims, size-1 dims."""
    g = torch.Generator().manual_seed(seed)
    found = [torch.tensor(2.5), torch.randn(shape, generator=g)]
    for start in range(1, len(shape)):
        found.append(torch.randn(shape[start:], generator=g))
    if shape:
        ones = tuple(1 if i % 2 else s for i, s in enumerate(shape))
        found.append(torch.randn(ones, generator=g))
    return found


@SETTINGS
@given(case=cases(), seed=st.integers(0, 3))
def test_indexed_edits_on_shards_equal_the_full_edit(case: tuple, seed: int) -> None:
    shape, parts, index = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    part = part_shape(x, index)
    if part is None:
        with pytest.raises((IndexError, RuntimeError)):
            for p in range(parts):
                local_part(index, shape, Split(-1, shape[-1], parts, p))
            SetValues(index, 1.0)(x)
        return
    layers: list[torch.nn.Module] = [Zero(index), Noise(0.5, seed=seed, index=index)]
    for value in values_for(part, seed):
        layers += [
            SetValues(index, value),
            Add(value, 0.5, index=index),
            Scale(value, index=index),
            MeanAblate(value, index=index),
        ]
    for layer in layers:
        assert torch.equal(sharded_apply(layer, x, parts), layer(x)), (layer, index, shape)


@SETTINGS
@given(case=cases(), seed=st.integers(0, 3))
def test_whole_tensor_edits_on_shards_equal_the_full_edit(case: tuple, seed: int) -> None:
    shape, parts, _ = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    layers: list[torch.nn.Module] = [Zero(), StopGradient(), Noise(1.0, seed=seed)]
    for value in values_for(shape, seed):
        layers += [SetValues(None, value), Add(value), Scale(value), MeanAblate(value)]
    for layer in layers:
        assert torch.equal(sharded_apply(layer, x, parts), layer(x)), layer


@SETTINGS
@given(case=cases(), seed=st.integers(0, 3))
def test_patches_on_shards_equal_the_full_patch(case: tuple, seed: int) -> None:
    shape, parts, index = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    rows = shape[0]
    inner = ts.Index(index.entries[1:]) if index.entries[0] is not Ellipsis else index
    for layer in (
        Patch(0, [rows - 1], inner),
        Patch(rows - 1, [0], None),
        Patch.table([(0, [rows - 1], inner), (rows - 1, [0], ts.idx[..., 0])]),
    ):
        try:
            want = layer(x)
        except (IndexError, RuntimeError):
            continue
        assert torch.equal(sharded_apply(layer, x, parts), want), (layer, inner)


def test_the_seed_neuron_is_local_neuron_2435_of_rank_1_and_nothing_of_rank_0() -> None:
    shape = (6, 5, 9472)
    index = ts.idx[3:, -1, [7171, 2519]]
    first = local_part(index, shape, Split(-1, 9472, 2, 0))
    second = local_part(index, shape, Split(-1, 9472, 2, 1))
    assert first is not None and second is not None
    assert first.index == ts.idx[3:6:1, 4, [2519]]
    assert second.index == ts.idx[3:6:1, 4, [7171 - 4736]] == ts.idx[3:6:1, 4, [2435]]
    assert local_part(ts.idx[3:, -1, 7171], shape, Split(-1, 9472, 2, 0)) is None
    alone = local_part(ts.idx[3:, -1, [7171]], shape, Split(-1, 9472, 2, 0))
    assert alone is None
    layer = SetValues(ts.idx[3:, -1, [7171]], 5.0)
    assert _local_copy(layer, shape, Split(-1, 9472, 2, 0), torch.float32, "cpu") is None


def test_a_value_that_does_not_fit_is_refused_as_on_the_full_tensor() -> None:
    x = torch.zeros(2, 3, 8)
    layer = Add(torch.ones(5), index=ts.idx[..., 0:4])  # the part has 4, the vector 5
    with pytest.raises(RuntimeError):
        layer(x)
    with pytest.raises(ValueError, match="does not broadcast"):
        _local_copy(layer, (2, 3, 8), Split(-1, 8, 2, 0), torch.float32, torch.device("cpu"))


def test_split_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="equal parts"):
        Split(-1, 10, 4, 0)
    with pytest.raises(ValueError, match="from the end"):
        Split(2, 8, 2, 0)
    split = Split(-1, 8, 4, 3)
    assert (split.offset, split.width, split.full_shape((2, 2))) == (6, 2, (2, 8))
