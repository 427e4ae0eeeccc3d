"""A run's state lives beside the model, never on it; a mode switch never reaches the base.

Trees made from one base share their recording layers. Two threads running two such trees
at once, and a ``ts.run`` nested inside another, must each get exactly their own records
(counters, gradient sites and run values included), and no layer may carry run state in
its ``__dict__`` during or after a run. ``.eval()`` / ``.train()`` on a rewrite give a tree
in that mode and leave every module of the base as it was.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import torchsurgeon as ts
from torchsurgeon.surgery.frozen import DiscardedMoveWarning

WIDTH = 16
RUN_KEYS = ("_ts_store", "_ts_run", "_ts_calls", "_ts_grad_sites")
BACKWARD = ts.out("output").sum()


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    parts: list[nn.Module] = []
    for _ in range(3):
        parts += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*parts, nn.Dropout(dropout), nn.Linear(WIDTH, WIDTH))


def _shared() -> nn.Module:
    """A base with recording layers at every Linear (plus a counted one and a gradient
    site) that the rewrites below share."""
    model = ts.select(_net().eval()).at_instances_of("Linear")
    model = model.insert_after(ts.layers.Save("h{n}"))
    model = ts.select(model).at("0").insert_before(ts.layers.Save("first", steps=0))
    return ts.select(model).at("2").insert_after(ts.layers.SaveGrad("g2"))


def _rewrites() -> tuple[nn.Module, nn.Module, nn.Module]:
    shared = _shared()
    vector = torch.linspace(-1.0, 1.0, WIDTH)
    reads = ts.layers.Compute(ts.here + ts.saved("h0").mean())  # reads its run's values
    a = ts.select(shared).at("4").insert_before(reads)
    b = ts.select(shared).at("7").insert_before(ts.layers.Add(vector, 2.0))
    return shared, a, b


def _layers(model: nn.Module) -> dict[int, nn.Module]:
    return {id(m): m for m in model.modules() if isinstance(m, ts.layers.InterventionLayer)}


def _assert_same(got: dict[str, list[torch.Tensor]], want: dict[str, list[torch.Tensor]]) -> None:
    assert sorted(got) == sorted(want)
    for key, values in want.items():
        assert len(got[key]) == len(values), key
        for a, b in zip(got[key], values, strict=True):
            assert torch.equal(a, b), key


def _run_state_keys(model: nn.Module) -> list[str]:
    return [f"{type(m).__name__}.{k}" for m in model.modules() for k in m.__dict__ if k in RUN_KEYS]


def test_two_threads_over_trees_sharing_layers_get_their_own_records() -> None:
    shared, a, b = _rewrites()
    common = set(_layers(a)) & set(_layers(b))
    assert set(_layers(shared)) <= common  # the recording layers are the same objects
    inputs = {"a": torch.randn(3, WIDTH), "b": torch.randn(5, WIDTH)}
    models = {"a": a, "b": b}
    want = {k: ts.run(models[k], inputs[k], backward=BACKWARD) for k in models}
    assert not torch.equal(want["a"].saved["h3"][:3], want["b"].saved["h3"][:3])
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    runs = {"a": 0, "b": 0}

    def work(name: str) -> None:
        try:
            start.wait()
            for _ in range(150):
                got = ts.run(models[name], inputs[name], backward=BACKWARD)
                _assert_same(got.records, want[name].records)
                assert torch.equal(got.output, want[name].output)
                runs[name] += 1
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in models]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shared weights' dropped .grad (shown once)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert runs == {"a": 150, "b": 150}
    print(f"2 threads x 150 runs, {len(common)} shared layers: every run got its own records")
    assert _run_state_keys(a) == _run_state_keys(b) == []


class _Nesting(nn.Module):
    """Runs ``outer`` twice and, between the calls, ``ts.run`` of ``inner`` (which shares
    layers with ``outer``); checks no layer holds run state while the outer run is on."""

    def __init__(self, outer: nn.Module, inner: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.outer = outer
        self.hidden = [inner, x]  # not a submodule: the outer run does not hold it
        self.inner_results: list[ts.Result] = []
        self.keys_during: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.outer(x)
        inner, y = self.hidden
        self.keys_during += _run_state_keys(self.outer) + _run_state_keys(inner)
        self.inner_results.append(ts.run(inner, y))
        return first + self.outer(x)


def test_a_nested_run_over_a_tree_sharing_layers_gets_its_own_records() -> None:
    shared, a, _ = _rewrites()
    x, y = torch.randn(2, WIDTH), torch.randn(4, WIDTH)
    alone_outer = ts.run(shared, x)
    alone_inner = ts.run(a, y)
    nesting = _Nesting(shared, a, y)
    got = ts.run(nesting, x)
    assert nesting.keys_during == []
    _assert_same(nesting.inner_results[0].records, alone_inner.records)
    # the outer run kept recording after the inner one: two calls, its own counter
    assert len(got.records["first"]) == 1  # steps=0: the outer's first call only
    for key in ("h0", "h1", "h2", "h3"):
        assert len(got.records[key]) == 2, key
        for value in got.records[key]:
            assert torch.equal(value, alone_outer.saved[key]), key
    assert torch.equal(got.output, 2 * alone_outer.output)
    assert _run_state_keys(nesting) == _run_state_keys(a) == []
    print("nested ts.run: inner records equal a run alone; outer records intact")


def test_no_layer_holds_run_state_after_a_run_or_a_failed_run() -> None:
    shared, a, b = _rewrites()
    ts.run(a, torch.randn(2, WIDTH))
    with pytest.raises(RuntimeError), torch.no_grad():  # SaveGrad wants a grad
        ts.run(b, torch.randn(2, WIDTH))
    for model in (shared, a, b):
        assert _run_state_keys(model) == []
    with pytest.raises(RuntimeError, match="counts the calls"):  # no run: no counter
        a(torch.randn(2, WIDTH))


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_and_train_on_a_rewrite_leave_the_base_as_it_was() -> None:
    base = ts.wrap(_net(dropout=0.5).train())
    probe = ts.select(base).at_instances_of("Linear").insert_after(ts.layers.Save("h{n}"))
    before = _flags(base)
    assert all(before)
    x = torch.randn(4, WIDTH)

    evaluated = probe.eval()
    assert _flags(base) == before and all(_flags(probe))
    assert not any(_flags(evaluated))
    once, twice = ts.run(evaluated, x), ts.run(evaluated, x)
    assert torch.equal(once.output, twice.output)  # no dropout
    assert sorted(once.saved) == ["h0", "h1", "h2", "h3"]
    assert not torch.equal(probe(x), probe(x))  # the rewrite it came from still drops
    assert evaluated[0].weight.data_ptr() == base[0].weight.data_ptr()
    assert len(ts.plan(evaluated).steps) == len(ts.plan(probe).steps)
    assert evaluated.eval() is evaluated  # nothing to change: the same tree

    trained = evaluated.train()
    assert all(_flags(trained)) and not any(_flags(evaluated))
    assert not torch.equal(trained(x), trained(x))
    assert _flags(base) == before

    with pytest.warns(DiscardedMoveWarning, match=r"model = model\.eval\(\)"):
        probe.eval()  # a bare call: a new tree, dropped
    assert _flags(base) == before and all(_flags(probe))
    with pytest.raises(ts.FrozenModuleError, match=r"model\.eval\(\)"):
        probe[6].training = False  # the Dropout, shared with the base
    assert _flags(base) == before
    print(f"eval/train on a rewrite: base flags {before} unchanged")
