"""A plan that does not fit its base says where and what, also read from a file or on a host.

- a plan read back from bytes names the first differing module path, config key or tensor
  (its identity carries a bounded summary); a plan written before the summary still loads;
- a plan sent to a host that does not hold its base names what the plan was built against
  and what each hosted model is, and suggests ``model_name=`` only for a model that fits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from plan_cases import make_gpt2, make_llama, token_ids

import torchsurgeon as ts
from torchsurgeon.plans import IdentityMismatchError, Plan, PlanFormatError, differences
from torchsurgeon.plans.replay import apply
from torchsurgeon.plans.wire import pack
from torchsurgeon.remote import Client, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.client_request import hosted_model_for


def _plan_on(model: torch.nn.Module) -> Plan:
    return ts.plan(ts.select(model).at("transformer.h.0").insert_after(ts.layers.Scale(2.0)))


def _read_back(plan: Plan, tmp_path: Path) -> Plan:
    return Plan.load(plan.save(tmp_path / "scale.tsplan"))


def test_a_plan_read_from_a_file_names_the_first_difference(tmp_path: Path) -> None:
    loaded = _read_back(_plan_on(ts.wrap(make_gpt2(n_layer=3))), tmp_path)
    assert loaded.base.source is None  # nothing alive to compare with: only the file's data
    with pytest.raises(IdentityMismatchError) as raised:
        apply(loaded, make_gpt2(seed=1))
    message = str(raised.value)
    print(message)
    assert "first difference: tensor 'transformer.wte.weight': values differ" in message
    assert "built against a GPT2LMHeadModel (model_type='gpt2', n_layer=3, n_embd=32" in message
    with pytest.raises(IdentityMismatchError) as raised:
        apply(loaded, make_gpt2(n_layer=2))
    message = str(raised.value)
    assert "first difference: 'transformer.h.2' (GPT2Block) is missing from this base" in message
    assert "config key 'n_layer': 3 in the plan's base, 2 in this base" in message
    with pytest.raises(
        IdentityMismatchError, match=r"'transformer\.wte\.weight' is torch\.float32"
    ):
        apply(loaded, ts.wrap(make_gpt2()).to(torch.float64))
    assert torch.equal(  # and it still replays where it fits
        ts.run(apply(loaded, make_gpt2()), token_ids()).output.logits,
        ts.run(apply(_plan_on(ts.wrap(make_gpt2())), make_gpt2()), token_ids()).output.logits,
    )


def test_a_plan_written_before_the_summary_still_loads() -> None:
    plan = _plan_on(ts.wrap(make_gpt2()))
    manifest, tensors = plan.manifest()
    assert set(manifest["base"]["summary"]) == {"config", "modules", "tensors"}
    del manifest["base"]["summary"]
    old = Plan.from_bytes(pack(manifest, tensors))
    assert old == plan and old.base.summary is None
    ts.run(apply(old, make_gpt2()), token_ids())
    with pytest.raises(IdentityMismatchError, match="fingerprint") as raised:
        apply(old, make_gpt2(seed=1))
    assert "first difference" not in str(raised.value)  # an old file cannot say where


def test_the_summary_is_bounded_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan_on(ts.wrap(make_gpt2()))
    manifest, tensors = plan.manifest()
    manifest["base"]["summary"]["modules"] = ["x" * 5000]
    with pytest.raises(PlanFormatError, match=r"base\.summary\.modules"):
        Plan.from_bytes(pack(manifest, tensors))
    monkeypatch.setattr(differences, "MAX_ENTRIES", 5)  # a model with more modules than that
    big = _plan_on(ts.wrap(make_gpt2(seed=3)))
    summary = big.manifest()[0]["base"]["summary"]
    assert summary["modules"] is None and summary["tensors"] is None
    assert summary["config"]["n_layer"] == "3"
    assert Plan.from_bytes(big.to_bytes()) == big
    print(f"plan bytes with summary: {len(plan.to_bytes())}, without lists: {len(big.to_bytes())}")


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    app = create_app({"gpt2": make_gpt2(seed=0), "llama": make_llama()}, workers=1)
    with serve_in_thread(app) as server:
        yield server.url


def test_a_host_without_the_plans_base_names_the_plan_and_each_hosted_model(host: str) -> None:
    elsewhere = _plan_on(ts.wrap(make_gpt2(seed=1)))  # another checkpoint of the same shape
    with Client(host, progress=False) as client:
        with pytest.raises(RemoteError) as raised:
            client.run(elsewhere, token_ids())
        message = raised.value.message
        print(message)
        assert raised.value.status == 404
        assert "built against a GPT2LMHeadModel (model_type='gpt2', n_layer=3" in message
        assert elsewhere.base.fingerprint[:12] in message
        assert "'gpt2' is a GPT2LMHeadModel (model_type='gpt2'" in message
        assert "tensor 'transformer.wte.weight': values differ" in message
        assert "'llama' is a LlamaForCausalLM (model_type='llama', num_hidden_layers=3" in message
        assert "model_name=" not in message  # no hosted model would take it
        with pytest.raises(RemoteError) as raised:  # named anyway: the host says the same
            client.run(elsewhere, token_ids(), model_name="gpt2")
        assert raised.value.code == "identity_mismatch"
        assert "built against a GPT2LMHeadModel" in raised.value.message
        assert "first difference: tensor 'transformer.wte.weight'" in raised.value.message
        fits = _plan_on(ts.wrap(make_gpt2(seed=0)))
        assert torch.equal(  # the model that fits is found without model_name=
            client.run(fits, token_ids()).output.logits,
            ts.run(apply(fits, make_gpt2(seed=0)), token_ids()).output.logits,
        )


def test_a_hostile_model_list_is_named_unreadable_not_raised() -> None:
    plan = _plan_on(ts.wrap(make_gpt2()))
    good = {"name": "gpt2", "identity": plan.base.to_json()}
    odd = {**plan.base.to_json(), "structure_hash": "0" * 64, "summary": "not a summary"}
    hosted = [{"name": "x", "identity": {"architecture": 3}}, {"name": "y", "identity": odd}]
    name, refusal = hosted_model_for(plan, hosted)
    assert name is None and "'x' has no readable identity" in refusal
    assert "'y' is a GPT2LMHeadModel (fingerprint" in refusal
    assert hosted_model_for(plan, [*hosted, good]) == ("gpt2", "")
