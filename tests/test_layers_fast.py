"""The editing layers' fast paths: the same results as the plain edits, with the work skipped.

The layers keep what does not depend on their input (index tensors per shape, ``scale *
vector``, dtype conversions, ``Noise``'s draw), and ``Patch`` tables do a sweep's copies in
one indexed assignment. Each test here checks one of those twice: the values are exactly
those of a plain-PyTorch reference written in the test, and the work really is skipped —
counted as the ATen operations a call dispatches (``TorchDispatchMode``), or as the layer
calls a method makes. Then the kept values must follow their tensors: a new dtype, a moved
or swapped buffer, autograd, inference mode and ``vmap`` all get fresh, correct values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hook_reference import VOCAB, hooks, make_gpt2, max_diff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchsurgeon as ts
from torchsurgeon import methods
from torchsurgeon.methods.batching import insert_all, rewrite_at
from torchsurgeon.plans import apply, plan

L = ts.layers


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def ops(call: Callable[[], Any]) -> list[str]:
    """The ATen operations ``call()`` dispatches, by name, in order."""
    with _Ops() as mode:
        call()
    return mode.names


def x_of(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


# --------------------------------------------------------------------------- Patch tables


@st.composite
def indices(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """A plain index into ``shape``: ints, slices, lists of one length (joint), maybe ``...``."""
    dims = draw(st.integers(1, len(shape)))
    width = draw(st.integers(1, 3))
    entries: list[Any] = []
    for size in shape[:dims]:
        kind = draw(st.sampled_from(["int", "slice", "list"]))
        if kind == "int":
            entries.append(draw(st.integers(-size, size - 1)))
        elif kind == "slice":
            bound = st.none() | st.integers(-size, size)
            entries.append(slice(draw(bound), draw(bound), draw(st.none() | st.integers(1, 3))))
        else:
            item = st.integers(-size, size - 1)
            entries.append(draw(st.lists(item, min_size=width, max_size=width)))
    if dims < len(shape) and draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), Ellipsis)
    return tuple(entries)


SHAPE = (6, 4, 5)


@st.composite
def tables(draw: st.DrawFn) -> list[tuple[list[int], list[int], tuple[Any, ...] | None]]:
    """Entries whose target rows each have one source row (what one Patch may do)."""
    rows = SHAPE[0]
    source_of = {t: draw(st.integers(-rows, rows - 1)) for t in range(rows)}
    # A few index shapes, reused by several entries, so that stacking has work to do.
    shapes = draw(st.lists(indices(SHAPE[1:]) | st.none(), min_size=1, max_size=3))
    entries = []
    for _ in range(draw(st.integers(1, 6))):
        targets = draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=3))
        targets = [t - rows if draw(st.booleans()) else t for t in targets]
        index = draw(st.sampled_from(shapes))
        if index is not None and Ellipsis not in index and draw(st.booleans()):
            # the same structure with other ints: entries that stack into one assignment
            index = tuple(
                draw(st.integers(-size, size - 1)) if isinstance(e, int) else e
                for e, size in zip(index, SHAPE[1:], strict=False)
            )
        entries.append(([source_of[t % rows] for t in targets], targets, index))
    return entries


def reference_patch(entries: list, x: torch.Tensor) -> torch.Tensor:
    """Every copy one at a time, each reading the input (what the layer must equal)."""
    out = x.clone()
    for sources, targets, index in entries:
        for source, target in zip(sources, targets, strict=True):
            out[(target, *(index or ()))] = x[(source, *(index or ()))]
    return out


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(entries=tables())
def test_patch_table_equals_one_copy_at_a_time(entries: list) -> None:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    layer = L.Patch.table([(s, t, None if i is None else ts.idx[i]) for s, t, i in entries])
    try:
        want = reference_patch(entries, x)
    except (IndexError, RuntimeError):  # lists PyTorch cannot broadcast: the layer refuses too
        with pytest.raises((IndexError, RuntimeError)):
            layer(x)
        return
    assert torch.equal(layer(x), want)
    assert torch.equal(layer(x), want)  # the second call runs from what the first kept
    spec = L.Patch.from_spec(json.loads(json.dumps(layer.config())), layer.tensors())
    assert spec.config() == layer.config()
    assert torch.equal(spec(x), want)


def test_patch_table_is_one_clone_and_one_assignment() -> None:
    x = x_of(20, 16, 8)
    positions = L.Patch.table([(0, [2 + p], ts.idx[p]) for p in range(16)])
    heads = L.Patch.table([(1, [2 + h], ts.idx[:, 2 * h : 2 * h + 2]) for h in range(4)])
    lists = L.Patch.table([(0, [3], ts.idx[[1, 2], [0, 7]]), (1, [4], ts.idx[[5, 6], [3, 3]])])
    for layer in (positions, heads, lists):
        layer(x)
        assert ops(lambda layer=layer: layer(x)) == ["clone", "index", "index_put_"]


def test_patch_refuses_a_target_row_with_two_sources() -> None:
    with pytest.raises(ValueError, match="target row 2 is given both row 0 and row 1"):
        L.Patch([0, 1], [2, 2])
    with pytest.raises(ValueError, match="target row 3 is given both"):
        L.Patch.table([(0, [3], ts.idx[0]), (1, [3], ts.idx[1])])
    late = L.Patch([0, 1], [2, -2])  # the same row, once the batch size is known
    with pytest.raises(ValueError, match="target row 2 is given both"):
        late(x_of(4, 3))
    same = reference_patch([([0, 0], [2, 2], ())], x_of(4, 3))
    assert torch.equal(L.Patch(0, [2, 2])(x_of(4, 3)), same)  # one source twice is fine


def test_patch_errors_still_name_the_row_and_the_dimension() -> None:
    with pytest.raises(IndexError, match="row 5 is out of range for a batch of 4"):
        L.Patch.table([(0, [1], None), (5, [2], None)])(x_of(4, 3))
    with pytest.raises(IndexError, match="dimension 0 has size 3, so 3 is out of range"):
        L.Patch(0, 1, ts.idx[3])(x_of(4, 3))
    with pytest.raises(TypeError, match="source_rows and target_rows"):
        L.Patch()
    with pytest.raises(TypeError, match="not both"):
        L.Patch(0, 1, table=[(0, 1, None)])


def test_patch_specs_single_unchanged_and_table_validated() -> None:
    single = L.Patch(0, [1, 2], ts.idx[-1])
    assert single.config() == {
        "source_rows": [0, 0],
        "target_rows": [1, 2],
        "on": None,
        "index": [-1],
    }
    table = L.Patch.table([(0, [2], ts.idx[1]), ([0, 1], [3, 4], None)], on=0)
    assert table.config() == {
        "table": [
            {"source_rows": [0], "target_rows": [2], "index": [1]},
            {"source_rows": [0, 1], "target_rows": [3, 4], "index": None},
        ],
        "on": 0,
    }
    assert "table=" in repr(table)
    good = table.config()["table"][0]
    bad_configs = [
        ({"table": []}, "non-empty"),
        ({"table": {"a": 1}}, "non-empty"),
        ({"table": [good], "index": None}, "unknown field"),
        ({"table": [{**good, "extra": 1}]}, "exactly the keys"),
        ({"table": [{"source_rows": [0], "target_rows": [1]}]}, "exactly the keys"),
        ({"table": [{**good, "source_rows": [0.5]}]}, "list of ints"),
        ({"table": [{**good, "index": [{"bogus": 1}]}]}, "index entry 0"),
        ({"table": [{**good, "target_rows": [1, 2], "source_rows": [0, 1, 2]}]}, "3 source"),
    ]
    for config, words in bad_configs:
        with pytest.raises((TypeError, ValueError), match=words):
            L.Patch.from_spec(config, {})


def test_combine_keeps_sequential_meaning() -> None:
    x = x_of(6, 5, 3)
    a, b = L.Patch(0, [2], ts.idx[1]), L.Patch(0, [3], ts.idx[2])
    (merged,) = L.Patch.combine([a, b])
    assert torch.equal(merged(x), b(a(x)))
    reads_written = L.Patch(2, [4])  # reads row 2, which ``a`` wrote: must see a's output
    assert len(L.Patch.combine([a, reads_written])) == 2
    other_source = L.Patch(1, [2], ts.idx[3])  # row 2 from another source
    assert len(L.Patch.combine([a, other_source])) == 2
    negative = L.Patch(0, [-1])
    assert len(L.Patch.combine([a, negative, b])) == 3
    other_tensor = L.Patch(0, [3], on=1)
    assert len(L.Patch.combine([a, other_tensor])) == 2
    layers = [a, b, reads_written, other_source, negative, other_tensor]
    run = x
    for layer in layers:
        run = layer(run) if layer.on is None else run
    combined = x
    for layer in L.Patch.combine(layers):
        combined = layer(combined) if layer.on is None else combined
    assert torch.equal(combined, run)


# --------------------------------------------------------------------------- batched methods


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    corrupted = clean.clone()
    corrupted[0, 4] = (clean[0, 4] + 1) % VOCAB
    return clean, corrupted


METRIC = methods.LogitDiff(correct=5, wrong=6)


def test_activation_patching_puts_one_patch_on_each_block_and_skips_equal_sites(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hf = make_gpt2()
    clean, corrupted = _prompts()
    calls: list[int] = []
    forward = L.Patch.forward

    def counting(self: L.Patch, x: torch.Tensor) -> torch.Tensor:
        calls.append(sum(len(targets) for _, targets, _ in self.entries))
        return forward(self, x)

    monkeypatch.setattr(L.Patch, "forward", counting)
    grid = methods.activation_patching(hf, clean, corrupted, METRIC)
    # 3 blocks, one Patch table each, patching only positions 4..6 (0..3 are equal in a
    # causal model): 3 target rows per block.
    assert calls == [3, 3, 3]

    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable[..., None]:
        return lambda module, args, output: kept.__setitem__(layer, output)

    def patch(layer: int, position: int) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            out[:, position] = kept[layer][:, position]
            return out

        return hook

    with torch.no_grad():
        with hooks(hf, post={f"transformer.h.{i}": keep(i) for i in range(3)}):
            hf(clean)
        base = METRIC(hf(corrupted).logits).mean()
        for layer in range(3):
            for position in range(7):
                with hooks(hf, post={f"transformer.h.{layer}": patch(layer, position)}):
                    want = METRIC(hf(corrupted).logits).mean() - base
                got = grid.values[layer, position]
                assert abs(float(got) - float(want)) <= 1e-5, (layer, position)
                if position < 4:
                    assert float(got) == 0.0  # skipped: exactly no effect
    assert grid.values[:, 4:].abs().max() > 1e-4


def test_insert_all_is_the_one_by_one_rewrite(gpt2_hf: nn.Module, token_ids: torch.Tensor) -> None:
    model = ts.wrap(gpt2_hf)
    edits = [
        ("transformer.h.0", "insert_after", L.Patch(0, [1], ts.idx[2])),
        ("transformer.h.1.mlp.c_proj", "insert_before", L.Zero(ts.idx[:, 1])),
        ("transformer.h.0", "insert_after", L.Patch(0, [2], ts.idx[3])),
        ("transformer.h.-1", "insert_after", L.Scale(0.5, index=ts.idx[3])),
        ("transformer.h.0", "insert_after", L.Add(torch.ones(64), 0.25)),
        ("transformer.h.2", "insert_after", L.Add(torch.ones(64), 0.25)),  # h.2 is h.-1
        ("transformer.h.-1", "insert_after", L.Scale(3.0)),
    ]
    one_by_one = model
    for path, side, layer in edits:
        one_by_one = rewrite_at(one_by_one, path, side, layer)
    at_once = insert_all(model, edits)
    with torch.no_grad():
        want, got = one_by_one(token_ids).logits, at_once(token_ids).logits
    assert torch.equal(got, want)
    site = at_once.get_submodule("transformer.h.0.ts_after")
    assert [type(m).__name__ for m in site] == ["Patch", "Add"]  # the two Patches are one
    last = at_once.get_submodule("transformer.h.2.ts_after")
    assert [type(m).__name__ for m in last] == ["Scale", "Add", "Scale"]  # in edit order
    recorded = plan(at_once)
    assert len(recorded.steps) == 6
    with torch.no_grad():
        assert torch.equal(apply(recorded, make_gpt2())(token_ids).logits, want)
    with pytest.raises(ts.PathError):
        insert_all(model, [("transformer.h.9", "insert_after", L.Zero())])
    assert insert_all(model, []) is model
    saves = [("transformer.h.0", "insert_after", L.Save("x"))] * 2
    with pytest.raises(ts.SelectionError):  # recorders go one by one: the selection's checks
        insert_all(model, saves)


# --------------------------------------------------------------------------- kept values


def test_index_for_tensor_is_checked_once_per_shape() -> None:
    index = ts.idx[:, -1, [0, 3]]
    x = x_of(2, 3, 4)
    first = index.for_tensor(x)
    assert index.for_tensor(x) is first
    assert first[:2] == (slice(None), -1) and first[2].dtype == torch.long
    assert torch.equal(x[first], x[:, -1, [0, 3]])
    with pytest.raises(IndexError, match="dimension 2 has size 2, so 3 is out of range"):
        index.for_tensor(x_of(2, 3, 2))
    for n in range(20):
        index.for_tensor(x_of(1, 1, 4 + n))
    assert len(index._for_shape) <= 8
    assert ts.idx[:, -1, [0, 3]] == index  # what it keeps is not part of its value


NEVER_AGAIN = {"mul", "randn", "normal_", "_to_copy", "lift_fresh"}
"""Work that does not depend on the input: ``scale * vector``, drawing, converting, indexing."""


@pytest.mark.parametrize(
    ("make", "skipped"),
    [
        (lambda: L.Add(torch.linspace(-1, 1, 8), 0.5), NEVER_AGAIN | {"clone"}),
        (lambda: L.Scale(torch.tensor(2.0, dtype=torch.float64)), {"_to_copy", "clone"}),
        (lambda: L.Noise(0.5, seed=3), NEVER_AGAIN | {"clone"}),
        (lambda: L.Noise(0.5, seed=3, index=ts.idx[1:, [0, 2]]), NEVER_AGAIN),
        (lambda: L.MeanAblate(torch.linspace(0, 1, 8)), NEVER_AGAIN | {"clone"}),
        (
            lambda: L.SetValues(None, torch.tensor(3.0, dtype=torch.float64)),
            NEVER_AGAIN | {"clone"},
        ),
    ],
    ids=["Add", "Scale-dtype", "Noise", "Noise-idx", "MeanAblate", "SetValues-dtype"],
)
def test_second_call_skips_the_input_independent_work(
    make: Callable[[], nn.Module], skipped: set[str]
) -> None:
    x = x_of(4, 7, 8)
    layer = make()
    first = layer(x)
    names = ops(lambda: layer(x))
    assert not skipped & set(names), names
    assert torch.equal(layer(x), first)
    assert torch.equal(x, x_of(4, 7, 8))  # the input is never written


def test_indexed_layers_build_no_index_tensor_after_the_first_call() -> None:
    x = x_of(4, 7, 8)
    for layer in (
        L.SetValues(ts.idx[:, -1, [0, 5]], 2.0),
        L.Zero(ts.idx[:, [1, 2]]),
        L.Add(torch.ones(2), 1.0, index=ts.idx[0, :, [3, 4]]),
        L.Patch(0, [2, 3], ts.idx[[1, 2]]),
    ):
        layer(x)
        assert "lift_fresh" not in ops(lambda layer=layer: layer(x)), type(layer).__name__


def _noise(shape: tuple[int, ...], std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return std * torch.randn(shape, generator=generator, dtype=dtype)


def test_noise_is_the_seeded_draw_for_every_shape_and_dtype() -> None:
    layer = L.Noise(0.5, seed=9)
    for shape, dtype in [((2, 3), torch.float32), ((4, 3), torch.float32), ((2, 3), torch.float64)]:
        x = torch.zeros(shape, dtype=dtype)
        for _ in range(2):
            assert torch.equal(layer(x), _noise(shape, 0.5, 9, dtype))
    assert torch.equal(L.Noise(0.5, seed=9)(torch.zeros(2, 3)), layer(torch.zeros(2, 3)))


def test_kept_values_follow_dtype_device_moves_and_swapped_tensors() -> None:
    vector, x = torch.linspace(-1, 1, 8), x_of(3, 8)
    layer = L.Add(vector, 0.5)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.float32):
        assert torch.equal(layer(x.to(dtype)), x.to(dtype) + (0.5 * vector).to(dtype))
    layer.to(torch.float64)  # (an unfrozen layer moves in place: new buffer objects)
    assert layer.vector.dtype == torch.float64
    assert torch.equal(layer(x), x + (0.5 * vector.double()).float())
    other = torch.full((8,), 2.0)
    swapped = torch.func.functional_call(layer, {"vector": other}, (x,))
    assert torch.equal(swapped, x + (0.5 * other.double()).float())
    assert torch.equal(layer(x), x + (0.5 * vector.double()).float())


def test_kept_values_see_in_place_writes_to_the_layers_tensors() -> None:
    """A steering vector edited in place (``zero_``, an optimizer's step) is read afresh."""
    x = x_of(3, 8)
    vector, scale = torch.linspace(-1, 1, 8), torch.tensor(0.5)
    add = L.Add(vector, scale)
    add(x)
    add.vector.zero_()
    assert torch.equal(add(x), x)
    add.scale.fill_(2.0)
    add.vector.copy_(vector)
    assert torch.equal(add(x), x + 2.0 * vector)
    mean = L.MeanAblate(torch.ones(8, dtype=torch.float64))  # kept converted to float32
    mean(x)
    with torch.inference_mode():  # a write inside inference mode counts too
        mean.mean.mul_(3)
    assert torch.equal(mean(x), torch.full((3, 8), 3.0))


def test_kept_values_and_autograd() -> None:
    vector = torch.linspace(-1, 1, 8).requires_grad_()
    layer = L.Add(vector, 2.0)
    for _ in range(2):  # nothing kept for a tensor that requires grad: each backward works
        (grad,) = torch.autograd.grad(layer(x_of(3, 8)).sum(), [vector])
        assert torch.equal(grad, torch.full((8,), 6.0))
    x = x_of(2, 5, 8, dtype=torch.float64)
    edits = [
        L.Scale(torch.tensor(3.0), index=ts.idx[:, [0, 2]]),
        L.SetValues(ts.idx[:, -1, [1, 4]], torch.tensor(1.0)),
        L.Patch(0, [1], ts.idx[[1, 3]]),
        L.Noise(0.1, seed=1, index=ts.idx[:, [0, 4]]),
        L.Add(torch.ones(8), 1.0, index=ts.idx[:, [2]]),
        L.Zero(ts.idx[:, [1, 2]]),
    ]
    for layer in edits:
        with torch.inference_mode():  # kept while in inference mode ...
            layer(x)
        leaf = x.clone().requires_grad_()
        out = layer(leaf)  # ... and still usable where autograd saves them for backward
        (grad,) = torch.autograd.grad((out * out).sum(), [leaf])
        assert grad.shape == x.shape, type(layer).__name__


def test_kept_values_under_vmap() -> None:
    xs = x_of(3, 4, 8)
    for layer in (
        L.Add(torch.linspace(-1, 1, 8), 0.5),
        L.Patch(0, [1, 2], ts.idx[[1, 3]]),
        L.SetValues(ts.idx[:, [0, 7]], 2.0),
    ):
        layer(xs[0])
        batched = torch.func.vmap(layer)(xs)
        assert torch.equal(batched, torch.stack([layer(x) for x in xs])), type(layer).__name__


def test_meta_tensors_check_shapes_only() -> None:
    x = torch.empty(4, 7, 8, device="meta")
    for layer in (
        L.Patch.table([(0, [1], ts.idx[2]), (0, [2], ts.idx[3])]),
        L.SetValues(ts.idx[:, [0, 3]], 1.0),
        L.Noise(1.0, index=ts.idx[:, 1:]),
    ):
        assert layer(x).shape == x.shape
    with pytest.raises(IndexError, match="out of range"):
        L.Patch(0, 9)(x)


@pytest.mark.slow
def test_compiled_patch_table_and_kept_values_compile_once(token_ids: torch.Tensor) -> None:
    hf = make_gpt2()
    model = ts.wrap(hf)
    table = L.Patch.table([(0, [1], ts.idx[2]), (0, [2], ts.idx[3]), (1, [3], ts.idx[:, 8:16])])
    model = ts.select(model).at("transformer.h.0").insert_after(table)
    model = ts.select(model).at("transformer.h.1").insert_after(L.Add(torch.ones(64), 0.5))
    model = (
        ts.select(model)
        .at("transformer.h.2.mlp.c_proj")
        .insert_before(L.SetValues(ts.idx[:, -1, [3, 5]], 2.0))
    )
    with torch.no_grad():
        eager = model(token_ids).logits
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        results = [compiled(token_ids).logits for _ in range(3)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for got in results:
        assert max_diff(got, eager) <= 1e-5
