"""Identities cached on frozen trees: equal to a fresh one, never stale, no leak, thread-safe.

``identity_of`` remembers a frozen tree's structure hash and fingerprint while every node
and tensor it read is unchanged (same objects, version counters, data pointers, shapes,
strides, dtypes, devices). These tests check what that promises — a cached identity is the
one computed afresh; an in-place write (``p.add_(1)`` under ``torch.no_grad``), a
``p.data = ...`` swap or a buffer a module re-registers is seen on the next call, so
``apply(match="exact")`` refuses the changed base; the cache keeps no dropped model alive;
threads reading while another writes never keep a stale identity — and where it does not
reach (inference tensors, plain models: computed every time). Timing is not asserted here:
``benchmarks/plan_apply.py`` measures it.

The ``DTensor`` tests shard small models over a one-rank gloo group in this process (no
spawn) and over two spawned ranks (``slow``; ``ts.distributed.launch`` stops every rank
however it ends).
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts
from torchsurgeon.plans import IdentityMismatchError, apply, identity_of, plan
from torchsurgeon.plans import identity as identity_module

BLOCKS = "transformer.h.*"


def make_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def make_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, bos_token_id=1,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def probe_of(base: nn.Module) -> nn.Module:
    return ts.select(base).at(BLOCKS).insert_after(ts.layers.Save("block{n}"))


# --------------------------------------------------------------------------- equal, and used


def test_a_cached_identity_is_the_fresh_one() -> None:
    model = make_gpt2()
    base = ts.wrap(model)
    first = identity_of(base)
    assert identity_of(base) == first
    assert identity_of(base, cache=False) == first
    assert identity_of(model) == first  # the plain model: computed, never cached
    assert identity_of(ts.wrap(model)) == first  # another tree of it: its own first call
    assert plan(probe_of(base)).base == first


def test_an_unchanged_tree_hashes_nothing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ts.wrap(make_gpt2())
    want = identity_of(base)
    recorded = plan(probe_of(base))
    monkeypatch.setattr(identity_module, "structure_hash", _refuse)
    monkeypatch.setattr(identity_module, "fingerprint", _refuse)
    assert identity_of(base) == want
    assert plan(probe_of(base)) == recorded
    assert plan(apply(recorded, base)) == recorded
    ts.select(base).at("transformer.h.0").get()  # selecting and reading changes nothing
    assert identity_of(base) == want


def _refuse(model: nn.Module) -> None:
    raise AssertionError("computed afresh: the cache was not used")


# --------------------------------------------------------------------------- never stale


def test_an_in_place_write_changes_the_identity_and_exact_apply_refuses() -> None:
    base = ts.wrap(make_gpt2())
    before = identity_of(base)
    recorded = plan(probe_of(base))
    weight = base.transformer.h[0].mlp.c_fc.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1)
    after = identity_of(base)
    assert after.fingerprint != before.fingerprint
    assert after.structure_hash == before.structure_hash
    assert (after.architecture, after.config_hash) == (before.architecture, before.config_hash)
    assert after == identity_of(base, cache=False)
    with pytest.raises(IdentityMismatchError, match="fingerprint") as error:
        apply(recorded, base)
    assert "structure:" not in str(error.value)
    apply(recorded, base, match="structure")  # same paths, classes and shapes
    assert plan(probe_of(base)).base == after  # a new plan records the changed weights
    with torch.no_grad():
        weight.copy_(kept)
    assert identity_of(base) == before  # the same values again: the same fingerprint
    assert apply(recorded, base) is not None


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.copy_(torch.randn_like(p)),
        lambda p: p.mul_(2),
        lambda p: p.zero_(),
        lambda p: p[0].fill_(3.0),  # through a view: the view shares the counter
        lambda p: p.detach().add_(1),  # detach shares it too
    ],
    ids=["copy_", "mul_", "zero_", "view", "detach"],
)
def test_every_in_place_write_is_seen(write: Any) -> None:
    base = ts.wrap(make_gpt2())
    before = identity_of(base)
    with torch.no_grad():
        write(base.lm_head.weight)  # tied to wte: one tensor, two places
    assert identity_of(base).fingerprint != before.fingerprint
    assert identity_of(base) == identity_of(base, cache=False)


def test_buffer_writes_through_the_plain_model_and_data_swaps_are_seen() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    base = ts.wrap(model)
    before = identity_of(base)
    model[1].running_mean.add_(1)  # buffers are the very same tensors in the tree
    assert identity_of(base).fingerprint != before.fingerprint
    swapped = identity_of(base)
    base[0].weight.data = torch.randn(4, 4)  # a new storage, no version bump
    assert identity_of(base).fingerprint != swapped.fingerprint
    transposed = identity_of(base)
    base[0].weight.data = base[0].weight.data.t()  # same storage and shape, other strides
    assert identity_of(base).fingerprint != transposed.fingerprint
    assert identity_of(base) == identity_of(base, cache=False)


class Cache(nn.Module):
    """Keeps a buffer its own forward replaces (as rotary embeddings recompute frequencies)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.register_buffer("table", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.register_buffer("table", torch.arange(float(x.shape[0])))
        return self.proj(x)


def test_a_buffer_the_module_replaces_itself_is_seen() -> None:
    base = ts.wrap(Cache())
    before = identity_of(base)
    base(torch.zeros(5, 3))  # a frozen node lets its own code replace its cache
    after = identity_of(base)
    assert after.structure_hash != before.structure_hash  # the table is 5 long now
    assert after == identity_of(base, cache=False)


def test_a_write_through_the_plain_models_parameter_is_seen() -> None:
    model = make_gpt2()
    base = ts.wrap(model)
    before = identity_of(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1)
    assert identity_of(base, cache=False).fingerprint != before.fingerprint  # the escape hatch
    assert identity_of(base).fingerprint != before.fingerprint


def test_threads_reading_while_one_writes_never_keep_a_stale_identity() -> None:
    base = ts.wrap(make_gpt2())
    weight = base.transformer.h[1].attn.c_attn.weight
    seen: list[ts.plans.BaseIdentity] = []
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def read() -> None:
        try:
            start.wait()
            for _ in range(40):
                seen.append(identity_of(base))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    def write() -> None:
        start.wait()
        for _ in range(40):
            with torch.no_grad():
                weight.add_(0.5)

    threads = [threading.Thread(target=read) for _ in range(4)]
    threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert len(seen) == 160
    assert {s.structure_hash for s in seen} == {identity_of(base).structure_hash}
    assert identity_of(base) == identity_of(base, cache=False)  # the last write is seen


# --------------------------------------------------------------------------- where it stops


def test_the_cache_keeps_no_model_alive() -> None:
    base = ts.wrap(make_gpt2())
    identity_of(base)
    assert base in identity_module._CACHE
    tree, weight = weakref.ref(base), weakref.ref(base.transformer.wte.weight)
    del base
    gc.collect()
    assert tree() is None and weight() is None


def test_a_tree_of_inference_tensors_is_computed_every_time() -> None:
    with torch.inference_mode():  # wrapped there too: ts.wrap outside refuses them today
        base = ts.wrap(make_gpt2())
    want = identity_of(make_gpt2())
    assert identity_of(base) == want
    assert base not in identity_module._CACHE
    with torch.inference_mode():
        base.transformer.wte.weight.add_(1)  # no version counter to see this
    assert identity_of(base) != want


def test_a_plain_model_is_computed_every_time() -> None:
    model = make_gpt2()
    before = identity_of(model)
    assert model not in identity_module._CACHE
    model.transformer.h[0].mlp.c_fc.weight.data.add_(1)  # a write no counter sees
    assert identity_of(model).fingerprint != before.fingerprint


def test_a_pinned_structure_only_model_keeps_its_pinned_identity() -> None:
    model = make_gpt2()
    structure_only = ts.plans.meta(model)
    assert identity_of(structure_only) == identity_of(structure_only) == identity_of(model)
    assert identity_of(structure_only, cache=False) == identity_of(model)


# --------------------------------------------------------------------------- DTensor


@pytest.fixture(scope="module")
def mesh1() -> Iterator[Any]:
    """A one-rank gloo group in this process (no spawn), torn down after this module."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.fail("a process group is already initialised in the test process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_has_a_fingerprint_and_ts_plan_works(mesh1: Any) -> None:
    import torchsurgeon.distributed as tsd

    unsharded = identity_of(ts.wrap(make_llama()))
    tree = tsd.parallelize(make_llama(), mesh1, "auto")
    probe = ts.select(tree).at("model.layers.*").insert_after(ts.layers.Save("layer{n}"))
    recorded = ts.plan(probe)  # crashed in the fingerprint before
    found = recorded.base
    assert found == identity_of(tree) == identity_of(tree, cache=False)
    assert tree not in identity_module._CACHE  # DTensors are never cached
    assert found.structure_hash == unsharded.structure_hash  # global shapes
    assert found.fingerprint is not None and found.fingerprint != unsharded.fingerprint
    assert apply(recorded, tree) is not None
    assert tsd.plan(probe).base == unsharded  # the plan that travels to every rank
    other = tsd.parallelize(make_llama(seed=1), mesh1, "auto")
    assert identity_of(other).fingerprint != found.fingerprint


def _identities_on_each_rank() -> list[dict[str, Any]]:
    """On every rank: ``ts.plan`` of the sharded tree, without any collective in it."""
    from torch.distributed.device_mesh import init_device_mesh

    import torchsurgeon.distributed as tsd

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tree = tsd.parallelize(make_llama(), mesh, "auto")
    probe = ts.select(tree).at("model.layers.*").insert_after(ts.layers.Save("layer{n}"))
    mine: dict[str, Any] = {}
    if dist.get_rank() == 1:  # alone: a collective in the fingerprint would hang here
        mine = ts.plan(probe).base.to_json()
        mine["again"] = identity_of(tree) == ts.plan(probe).base
    dist.barrier()
    if dist.get_rank() == 0:
        mine = ts.plan(probe).base.to_json()
        mine["again"] = identity_of(tree) == ts.plan(probe).base
    mine["travelling"] = tsd.plan(probe).base.to_json()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


@pytest.mark.slow
def test_each_rank_fingerprints_its_own_shards_without_communicating() -> None:
    import torchsurgeon.distributed as tsd

    ranks = tsd.launch(_identities_on_each_rank, world_size=2, timeout=240)
    unsharded = identity_of(ts.wrap(make_llama())).to_json()
    assert [r.pop("again") for r in ranks] == [True, True]
    assert [r.pop("travelling") for r in ranks] == [unsharded, unsharded]
    assert ranks[0]["structure_hash"] == ranks[1]["structure_hash"] == unsharded["structure_hash"]
    assert ranks[0]["config_hash"] == unsharded["config_hash"]
    fingerprints = {r["fingerprint"] for r in ranks} | {unsharded["fingerprint"]}
    assert len(fingerprints) == 3  # each rank's shards differ, and differ from the whole
