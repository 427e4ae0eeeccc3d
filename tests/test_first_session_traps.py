"""Traps a first session falls into, each refused or named instead of silently wrong.

- a structure-only (meta) model run locally on real inputs: refused, naming ``backend=``;
- ``model.to(torch.bfloat16)`` on a frozen tree with the result dropped: a new tree is
  returned (the original untouched) and the bare statement warns;
- an answer token id outside the vocabulary: refused by the metric, naming the argument and
  the vocabulary size (and checkable before any forward pass with ``check_answers``);
- a plan applied to another model: the mismatch names the first differing module path,
  config key or tensor.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from plan_cases import VOCAB, make_gpt2, token_ids
from transformers import LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts
from torchsurgeon import methods as M
from torchsurgeon.methods.metrics import AnswerTokenError, check_answers, vocab_size
from torchsurgeon.plans import IdentityMismatchError
from torchsurgeon.plans.replay import apply
from torchsurgeon.surgery.frozen import DiscardedMoveWarning

# ------------------------------------------------------------------ 1. meta models


def _meta_llama() -> torch.nn.Module:
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    with torch.device("meta"):
        return ts.wrap(LlamaForCausalLM(config).eval())


@pytest.mark.parametrize("build", ["device-context", "to-meta"])
def test_running_a_meta_model_on_real_inputs_names_backend(build: str) -> None:
    model = _meta_llama() if build == "device-context" else ts.wrap(make_gpt2().to("meta"))
    assert all(p.is_meta for p in model.parameters())
    probe = ts.select(model).at("**.mlp").insert_after(ts.layers.Save("mlp{layer}"))
    for target in (model, probe):
        with pytest.raises(ts.SurgeryError, match=r"no weights here.*backend=client"):
            ts.run(target, token_ids())
        with pytest.raises(ts.SurgeryError, match=r"backend="):
            ts.run(target, input_ids=token_ids())
    with pytest.raises(ts.SurgeryError, match=r"backend="):
        ts.run(model.generate, token_ids(), max_new_tokens=2)


def test_a_meta_model_on_meta_inputs_still_checks_shapes() -> None:
    result = ts.run(_meta_llama(), token_ids().to("meta"))
    assert result.output.logits.is_meta and result.output.logits.shape == (3, 7, VOCAB)


def test_a_real_model_runs_as_before() -> None:
    result = ts.run(ts.wrap(make_gpt2()), token_ids())
    assert result.output.logits.device.type == "cpu"


# ------------------------------------------------------------------ 2. dtype moves


def test_a_dtype_move_returns_a_new_tree_and_a_dropped_one_warns() -> None:
    model = ts.wrap(make_gpt2())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscardedMoveWarning)
        moved = model.to(torch.bfloat16)  # kept: no warning
        kept = [model.half()]
    assert {p.dtype for p in moved.parameters()} == {torch.bfloat16}
    assert kept[0].lm_head.weight.dtype == torch.float16
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original: untouched
    with pytest.warns(DiscardedMoveWarning, match=r"model = model\.to\(\.\.\.\)"):
        model.to(torch.bfloat16)
    with pytest.warns(DiscardedMoveWarning, match=r"model\.bfloat16"):
        model.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscardedMoveWarning)
        model.float()  # already float32: the same tree, nothing lost
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "model = model.to(torch.bfloat16)" in " ".join((ts.wrap.__doc__ or "").split())


# ------------------------------------------------------------------ 3. answer token ids


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: M.LogitDiff(correct=-1, wrong=3), r"LogitDiff\(correct=\.\.\.\).*negative"),
        (lambda: M.LogitDiff(correct=3, wrong=" Paris"), r"LogitDiff\(wrong=\.\.\.\).*ints"),
        (lambda: M.LogitDiff(correct=[3, 2.5], wrong=4), r"correct=.*2\.5"),
        (lambda: M.LogitDiff(correct=True, wrong=4), r"correct=.*True"),
        (lambda: M.LogitDiff(torch.tensor([1.0]), 4), r"correct=.*float32 tensor"),
        (lambda: M.AnswerProbability([]), r"AnswerProbability\(answer=\.\.\.\)"),
    ],
)
def test_answer_ids_that_are_not_token_ids_are_refused_at_once(make, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AnswerTokenError, match=words):
        make()


def test_an_answer_outside_the_vocabulary_names_the_argument_and_the_size() -> None:
    model = ts.wrap(make_gpt2())
    assert vocab_size(model) == VOCAB
    metric = M.LogitDiff(correct=[5, VOCAB], wrong=[7, 8])
    with pytest.raises(AnswerTokenError, match=rf"correct=.*{VOCAB}.*vocabulary of {VOCAB}"):
        check_answers(metric, vocab_size(model))  # before any forward pass
    with pytest.raises(AnswerTokenError, match=rf"answer=.*vocabulary of {VOCAB}"):
        check_answers(M.on_real_tokens(M.AnswerProbability(10**6), None), VOCAB)
    check_answers(M.LogitDiff(correct=VOCAB - 1, wrong=0), VOCAB)  # the edges are fine
    logits = torch.randn(2, 3, VOCAB)
    with pytest.raises(AnswerTokenError, match=rf"wrong=.*id {VOCAB + 3}.*{VOCAB} tokens"):
        M.LogitDiff(correct=1, wrong=VOCAB + 3)(logits)
    ids = token_ids(batch=2, length=5)
    calls: list[str] = []
    counting = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__)
    )
    try:
        with pytest.raises(AnswerTokenError, match="vocabulary"):
            M.activation_patching(model, ids, ids.flip(0), metric)
    finally:
        counting.remove()
    assert calls == []  # refused before a single forward pass


def test_valid_answers_still_measure_the_same() -> None:
    logits = torch.randn(2, 3, VOCAB)
    got = M.LogitDiff(correct=[5, 9], wrong=torch.tensor([7, 3]))(logits)
    want = logits[[0, 1], -1, [5, 9]] - logits[[0, 1], -1, [7, 3]]
    assert torch.equal(got, want)


# ------------------------------------------------------------------ 4. plan mismatches


def _plan_on(model: torch.nn.Module) -> ts.plans.Plan:
    return ts.plan(ts.select(model).at("transformer.h.0").insert_after(ts.layers.Scale(2.0)))


def test_a_mismatch_names_the_first_differing_tensor() -> None:
    base = ts.wrap(make_gpt2(seed=0))  # alive here: its identity can name places
    recorded = _plan_on(base)
    with pytest.raises(
        IdentityMismatchError, match=r"first difference: tensor 'transformer\.wte\.weight': values"
    ):
        apply(recorded, make_gpt2(seed=1))
    with pytest.raises(
        IdentityMismatchError, match=r"'transformer\.wte\.weight' is torch\.float32"
    ):
        apply(recorded, ts.wrap(make_gpt2(seed=0)).to(torch.float64))


def test_a_mismatch_names_the_first_differing_module_and_config_key() -> None:
    base = ts.wrap(make_gpt2(n_layer=3))  # alive here: its identity can name places
    recorded = _plan_on(base)
    with pytest.raises(IdentityMismatchError) as raised:
        apply(recorded, make_gpt2(n_layer=2))
    message = str(raised.value)
    assert "'transformer.h.2' (GPT2Block) is missing from this base" in message
    assert "config key 'n_layer': 3 in the plan's base, 2 in this base" in message


def test_an_identity_travels_without_its_source() -> None:
    base = ts.wrap(make_gpt2())
    recorded = _plan_on(base)
    loaded = pickle.loads(pickle.dumps(recorded))
    assert loaded.base == recorded.base and loaded.base.source is None
    assert set(recorded.base.to_json()) == {
        "architecture",
        "structure_hash",
        "config_hash",
        "fingerprint",
        "summary",
    }
    with pytest.raises(IdentityMismatchError, match="fingerprint") as raised:
        apply(loaded, make_gpt2(seed=1))
    # no model here to compare with, but the identity's summary still says where
    assert "first difference: tensor 'transformer.wte.weight'" in str(raised.value)
