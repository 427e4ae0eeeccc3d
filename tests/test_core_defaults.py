"""Correct by default: the core's answers in the cases that used to be silently wrong.

Each test pins one behaviour against an independent reference (the plain ``transformers``
model with hand-written hooks, autograd on the plain model, object identity):

- layers at one site run in insertion order, so a ``Save`` after a ``SetValues`` records
  the value the module receives;
- ``Save`` name templates know ``{layer}`` (the block index) as well as ``{n}`` and
  ``{path}``, parse without ``str.format``, and duplicate keys are refused when inserted;
- gradients never land on the user's model or on another tree; every write to a frozen
  node is refused (allow-list), buffers and plain attributes included;
- frozen trees pickle (and ``torch.save`` / ``deepcopy``) as frozen trees;
- each ``ts.run`` owns its records: nested runs and threads do not interfere;
- wildcards do not multiply over layers inserted by earlier steps; a rewritten tree is
  garbage once dropped (no cache keeps it, or its tensors, alive).
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading
import time
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
from hook_reference import VOCAB, hooks, logits_of, max_diff, replace_input, same_storage
from torch import nn

import torchsurgeon as ts
from torchsurgeon.surgery.frozen import SharedWeightGradientWarning

TOL = 1e-6


def _ids(batch: int = 3, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- order at a site


def test_save_after_set_values_records_the_set_value(llama_hf: nn.Module) -> None:
    site = "model.layers.1.mlp.down_proj"
    ids = _ids()
    probe = (
        ts.select(ts.wrap(llama_hf))
        .at(site)
        .insert_before(ts.layers.SetValues(ts.idx[:, -1, [0, 3]], 5.0))
    )
    probe = ts.select(probe).at(site).insert_before(ts.layers.Save("down_in"))
    seen: list[torch.Tensor] = []

    def force(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1, [0, 3]] = 5.0
        seen.append(x)
        return x

    with torch.no_grad():
        with hooks(llama_hf, pre={site: replace_input(force)}):
            want = logits_of(llama_hf(ids))
        result = ts.run(probe, ids)
    assert max_diff(result.output.logits, want) <= TOL
    saved = result.saved["down_in"]
    assert torch.equal(saved[:, -1, [0, 3]], torch.full((3, 2), 5.0))
    assert max_diff(saved, seen[0]) <= TOL
    names = [type(m).__name__ for m in probe.get_submodule(site + ".ts_before")]
    assert names == ["SetValues", "Save"]  # the tree (and ts.show) lists them in run order
    assert "SetValues" in ts.viz.to_text(probe).split("Save")[0]


# --------------------------------------------------------------------- names and keys


def test_layer_template_is_the_block_index_not_the_position(gpt2_hf: nn.Module) -> None:
    model = ts.wrap(gpt2_hf)
    late = ts.select(model).at("transformer.h.*").where(ts.layer_index >= 1)
    probe = late.insert_after(ts.layers.Save("block{layer}"))
    probe = ts.select(probe).at("transformer.h.*.mlp").insert_after(ts.layers.Save("m{n}:{path}"))
    keys = set(ts.run(probe, _ids()).saved)
    assert {"block1", "block2"} <= keys and "block0" not in keys
    assert "m0:transformer.h.0.mlp" in keys and "m2:transformer.h.2.mlp" in keys
    assert ts.layers.Save("{{literal}}{n}").for_site("a.3", 0).key == "{literal}0"


@pytest.mark.parametrize(
    "name",
    [
        "{n.__class__.__base__.__subclasses__}",
        "{n:>100000000}",
        "{path.nope}",
        "{0}",
        "{}",
        "{layer!r}",
        "open{",
        "close}",
        "x" * 257,
    ],
)
def test_bad_name_templates_are_refused_when_the_layer_is_made(name: str) -> None:
    with pytest.raises(ValueError, match=r"Save: name"):
        ts.layers.Save(name)


def test_layer_field_without_a_layer_index_names_the_site(gpt2_hf: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"'lm_head'.*no layer index"):
        ts.select(ts.wrap(gpt2_hf)).at("lm_head").insert_after(ts.layers.Save("x{layer}"))


def test_duplicate_keys_are_refused_before_the_model_changes(gpt2_hf: nn.Module) -> None:
    model = ts.wrap(gpt2_hf)
    probe = ts.select(model).at("transformer.h.0").insert_after(ts.layers.Save("x"))
    before = [p for p, _ in probe.named_modules()]
    with pytest.raises(ts.SelectionError, match=r"'x'.*'transformer\.h\.0'"):
        ts.select(probe).at("transformer.h.2").insert_after(ts.layers.Save("x"))
    assert [p for p, _ in probe.named_modules()] == before


# --------------------------------------------------------------------- gradients, writes


def test_gradients_never_reach_the_users_model_or_other_trees(gpt2_hf: nn.Module) -> None:
    ids = _ids()
    flags = {n: p.requires_grad for n, p in gpt2_hf.named_parameters()}
    model = ts.wrap(gpt2_hf)
    other = ts.select(model).at("transformer.h.1").insert_after(ts.layers.Scale(2.0))
    probe = ts.select(model).at("transformer.h.1").insert_after(ts.layers.SaveGrad("g"))
    for mine, theirs in zip(model.parameters(), gpt2_hf.parameters(), strict=True):
        assert mine is not theirs and same_storage(mine, theirs)  # own objects, same bytes

    result = ts.run(probe, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result.output.logits[:, -1].sum().backward()
    assert all(p.grad is None for p in gpt2_hf.parameters())
    assert all(p.grad is None for tree in (model, other, probe) for p in tree.parameters())
    assert {n: p.requires_grad for n, p in gpt2_hf.named_parameters()} == flags
    assert any(issubclass(w.category, SharedWeightGradientWarning) for w in caught) or (
        ts.surgery.frozen._warned_about_grads  # shown once per process, maybe already
    )

    # the activation gradient is the one plain autograd gives on the plain model
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        captured.append(hidden)

    handle = gpt2_hf.transformer.h[1].register_forward_hook(keep)
    try:
        gpt2_hf(ids).logits[:, -1].sum().backward()
    finally:
        handle.remove()
        gpt2_hf.zero_grad(set_to_none=True)
    assert max_diff(result.saved["g"], captured[0].grad) <= TOL

    # weight gradients are values: torch.autograd.grad accumulates nothing
    weight = probe.lm_head.weight
    (grad,) = torch.autograd.grad(probe(ids).logits.sum(), [weight])
    assert grad.shape == weight.shape and weight.grad is None


@pytest.mark.parametrize(
    "write",
    [
        lambda m: setattr(m.transformer.ln_f, "eps", 1.0),
        lambda m: setattr(m.transformer.h[0].attn, "bias", torch.zeros(1)),
        lambda m: m.transformer.ln_f.register_buffer("extra", torch.zeros(1)),
        lambda m: delattr(m.transformer.ln_f, "eps"),
        lambda m: setattr(m.transformer, "new_attribute", 3),
        lambda m: setattr(m.transformer.h[0], "forward", lambda *a, **k: None),
    ],
    ids=["float", "buffer", "register_buffer", "delete", "new", "forward"],
)
def test_every_write_to_a_frozen_node_is_refused(gpt2_hf: nn.Module, write: Callable) -> None:
    model = ts.wrap(gpt2_hf)
    eps = gpt2_hf.transformer.ln_f.eps
    with pytest.raises(ts.FrozenModuleError, match="frozen"):
        write(model)
    assert model.transformer.ln_f.eps == eps == gpt2_hf.transformer.ln_f.eps
    trained = model.train()  # the training flag too: switched as a new tree
    assert trained.training and not model.training


def test_a_modules_own_code_may_update_its_caches() -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    )
    torch.manual_seed(0)
    plain = Phi3ForCausalLM(config).eval()
    tree = ts.wrap(plain)
    ids = _ids(batch=1, length=20)  # past the original context: longrope writes its cache
    with torch.no_grad():
        assert max_diff(tree(ids).logits, plain(ids).logits) == 0
    with pytest.raises(ts.FrozenModuleError, match="long_inv_freq"):
        tree.model.rotary_emb.long_inv_freq = None  # the same write from outside: refused


# --------------------------------------------------------------------- pickling


def test_frozen_trees_pickle_as_frozen_trees(gpt2_hf: nn.Module) -> None:
    ids = _ids()
    vec = torch.randn(64, generator=torch.Generator().manual_seed(3))
    probe = ts.select(ts.wrap(gpt2_hf)).at("transformer.h.0").insert_after(ts.layers.Add(vec))
    probe = ts.select(probe).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
    with torch.no_grad():
        want = ts.run(probe, ids)
    buffer = io.BytesIO()
    torch.save(probe, buffer)
    buffer.seek(0)
    copies = {
        "pickle": pickle.loads(pickle.dumps(probe)),
        "deepcopy": copy.deepcopy(probe),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    for how, again in copies.items():
        assert ts.is_frozen(again) and ts.is_frozen(again.transformer.h[1].ts_after[0]), how
        assert type(again).__name__ == "GPT2LMHeadModel", how
        assert again.transformer.wte.weight is again.lm_head.weight, how  # ties survive
        with torch.no_grad():
            got = ts.run(again, ids)
        assert max_diff(got.output.logits, want.output.logits) == 0, how
        assert max_diff(got.saved["h1"], want.saved["h1"]) == 0, how
        with pytest.raises(ts.FrozenModuleError):
            again.transformer.ln_f.eps = 2.0
        loss = again(ids).logits.sum()
        loss.backward()
        assert all(p.grad is None for p in again.parameters()), how


# --------------------------------------------------------------------- runs own records


def test_a_nested_run_does_not_clear_the_outer_one(gpt2_hf: nn.Module) -> None:
    ids, other_ids = _ids(seed=1), _ids(seed=2)
    probe = ts.select(ts.wrap(gpt2_hf)).at("transformer.h.*").insert_after(ts.layers.Save())
    inner: list[ts.Result] = []
    started: list[bool] = []

    def nested(module: nn.Module, args: tuple, output: tuple) -> None:
        if not started:  # once: the inner run's own copy of this node has the hook too
            started.append(True)
            inner.append(ts.run(probe, other_ids))

    handle = probe.transformer.h[0].register_forward_hook(nested)  # a private copy's hooks
    try:
        with torch.no_grad():
            outer = ts.run(probe, ids)
    finally:
        handle.remove()
    with torch.no_grad():
        alone, other_alone = ts.run(probe, ids), ts.run(probe, other_ids)
    for key in ("transformer.h.0", "transformer.h.1", "transformer.h.2"):
        assert max_diff(outer.saved[key], alone.saved[key]) == 0, key
        assert max_diff(inner[0].saved[key], other_alone.saved[key]) == 0, key


def test_threads_running_one_model_record_their_own_rows(gpt2_hf: nn.Module) -> None:
    probe = ts.select(ts.wrap(gpt2_hf)).at("transformer.h.2").insert_after(ts.layers.Save("h"))
    inputs = [_ids(batch=1, seed=s) for s in range(8)]
    with torch.no_grad():
        want = [ts.run(probe, x).saved["h"] for x in inputs]
    got: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(5):
                    result = ts.run(probe, inputs[i])
                    got.setdefault(i, []).append(result.records["h"])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for i, runs in got.items():
        assert len(runs) == 5
        for records in runs:
            assert len(records) == 1 and max_diff(records[0], want[i]) == 0, i


def test_a_layer_aimed_at_a_none_argument_names_it(gpt2_hf: nn.Module) -> None:
    probe = (
        ts.select(ts.wrap(gpt2_hf))
        .at("transformer")
        .insert_before(ts.layers.Zero(on="attention_mask"))
    )
    with pytest.raises(ValueError, match=r"found no input tensor.*'attention_mask' = None"):
        probe(_ids(), attention_mask=None)


# --------------------------------------------------------------------- growth and leaks


def test_wildcards_do_not_multiply_over_inserted_layers(gpt2_hf: nn.Module) -> None:
    model = ts.wrap(gpt2_hf)
    nodes = ts.select(model).at("**").count()
    modules = ts.select(model).at("**").where(~ts.instance_of("ModuleList")).count()
    probe = model
    started = time.monotonic()
    for _ in range(8):  # every module but the containers (which refuse layers)
        every = ts.select(probe).at("**").where(~ts.instance_of("ModuleList"))
        probe = every.insert_after(ts.layers.Scale(1.0))
    assert time.monotonic() - started < 20
    assert ts.select(probe).at("**").count() == nodes  # globs skip ts_before / ts_after
    inserted = ts.select(probe).at("**.ts_after.*").count()
    assert inserted == 8 * modules  # one per matched node (the root too) per step: linear
    assert ts.select(probe).at("transformer.h.0.ts_after.7").count() == 1  # named: reachable


def test_a_dropped_rewrite_is_garbage(gpt2_hf: nn.Module) -> None:
    model = ts.wrap(gpt2_hf)
    big = torch.zeros(64)
    probe = ts.select(model).at("transformer.h.*").insert_after(ts.layers.Add(big))
    probe = ts.select(probe).at("transformer.h.1").at_children().count()  # fill the caches
    probe = ts.select(model).at("transformer.h.*").insert_after(ts.layers.Add(big))
    ts.select(probe).at("**.mlp").where(ts.layer_index >= 1).paths  # noqa: B018
    with torch.no_grad():
        ts.run(probe, _ids())
    dead = weakref.ref(probe)
    del probe
    gc.collect()
    assert dead() is None


# --------------------------------------------------------------------- one error family


def test_every_public_error_is_a_surgery_error() -> None:
    import importlib
    import pkgutil

    import torchsurgeon

    internal = {"ApiError", "JobTimeout"}  # the host's, never raised to a user
    found = []
    for info in pkgutil.walk_packages(torchsurgeon.__path__, "torchsurgeon."):
        if info.name.endswith(("__main__", ".serve", ".cli")):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == module.__name__
                and value.__name__ not in internal
                and not value.__name__.startswith("_")
            ):
                found.append(value)
    assert found
    assert [e.__name__ for e in found if not issubclass(e, ts.SurgeryError)] == []
