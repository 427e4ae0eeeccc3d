"""What a client takes from a host is data: no import, no class the host picks, no host paths.

A host could be hostile (or compromised). The client reads two things from it: a result
file (``decode_result``) and a model structure (``Structure.build``, behind
``Client.meta``). Neither may import a module the host names, build a class outside an
allow-list, or let a served config choose code to load. The other way round, a served
structure must not reveal where the host keeps its checkpoints.

"Nothing was imported" is checked on ``sys.modules``, with modules this test process never
imports otherwise (``reformer``, ``transformers.trainer``); each test asserts that first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from plan_cases import VOCAB, make_gpt2, make_llama, token_ids
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

import torchsurgeon as ts
from torchsurgeon.layers.results import Result
from torchsurgeon.plans import PlanFormatError, Structure, identity_of, plan, structure_of
from torchsurgeon.plans.wire import pack
from torchsurgeon.remote import Client, RemoteError
from torchsurgeon.remote.result_wire import RESULT_KEY, decode_result, encode_result

UNIMPORTED = "transformers.models.reformer.modeling_reformer"
TRAINER = "transformers.trainer"


@pytest.fixture
def untouched() -> list[str]:
    """Module names that must still be absent from ``sys.modules`` after the test."""
    names = [UNIMPORTED, TRAINER, "transformers.models.reformer"]
    assert not [n for n in names if n in sys.modules], "precondition: not imported yet"
    yield names
    assert not [n for n in names if n in sys.modules], "the host made the client import it"


def result_file(output: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    tensors = tensors if tensors is not None else {"r0": torch.arange(6.0).reshape(2, 3)}
    return pack({"version": 1, "output": output, "saved": {}}, tensors, key=RESULT_KEY)


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        f"{UNIMPORTED}.ReformerModelOutput",  # a real output class, in a module not loaded
        f"{TRAINER}.Trainer",  # would import a heavy module; not an output class either
        "transformers.pipelines.Pipeline",
        "transformers.modeling_outputs.torch",  # an attribute of the module, not a class of it
        "transformers.modeling_outputs.ModelOutput.__class__",
        "builtins.eval",
    ],
)
def test_a_result_naming_any_other_class_comes_back_a_plain_dict(
    name: str, untouched: list[str]
) -> None:
    result = decode_result(result_file({"mapping": name, "fields": {"logits": {"tensor": "r0"}}}))
    assert type(result.output) is dict
    assert torch.equal(result.output["logits"], torch.arange(6.0).reshape(2, 3))


def test_known_output_classes_are_rebuilt() -> None:
    logits = torch.randn(2, 3, VOCAB)
    data = encode_result(Result(CausalLMOutputWithCrossAttentions(logits=logits), {}))
    output = decode_result(data).output
    assert type(output) is CausalLMOutputWithCrossAttentions
    assert torch.equal(output.logits, logits)
    # a model-specific output class, from a modeling module this process has loaded already
    from transformers.models.gpt2.modeling_gpt2 import GPT2DoubleHeadsModelOutput

    data = encode_result(Result(GPT2DoubleHeadsModelOutput(logits=logits), {}))
    assert type(decode_result(data).output) is GPT2DoubleHeadsModelOutput


@pytest.mark.parametrize(
    ("output", "field"),
    [
        ({"tensor": "r7"}, "output"),
        ({"tensor": ["r0"]}, "output"),
        ({"topk": ["r0"]}, "output"),
        ({"mapping": None, "fields": [{"tensor": "r0"}]}, "output"),
        ({"mapping": None, "fields": {"a": {"exec": "print(1)"}}}, "output.a"),
        ({"sequence": "set", "items": []}, "output"),
        ({"sequence": "list", "items": [{"value": [1, 2]}]}, "output.0"),
        ({"float": "1e308"}, "output"),
        ({"value": {"nested": 1}}, "output"),
        ({"tensor": "r0", "value": 1}, "output"),
        ("r0", "output"),
    ],
)
def test_a_malformed_result_is_a_clear_error(output: Any, field: str) -> None:
    with pytest.raises(RemoteError, match="malformed result") as error:
        decode_result(result_file(output))
    assert error.value.code == "bad_result" and error.value.field == field


def test_a_result_that_is_not_a_result_file_is_a_clear_error() -> None:
    import pickle

    with pytest.raises(RemoteError, match="never unpickles") as error:
        decode_result(pickle.dumps({"output": 1}))
    assert error.value.code == "bad_result"
    wrong = pack({"version": 2, "output": {"value": 1}, "saved": {}}, {}, key=RESULT_KEY)
    with pytest.raises(RemoteError, match="version"):
        decode_result(wrong)


# --------------------------------------------------------------------------- structures


def gpt2_structure() -> dict[str, Any]:
    return structure_of(ts.wrap(make_gpt2())).to_json()


@pytest.mark.parametrize(
    "architecture",
    [
        "os.system",
        "ReformerModelWithLMHead",  # a transformers model, of another model_type: not imported
        "LlamaForCausalLM",  # of another model_type: its config class does not match
        "PreTrainedModel",
        "AutoModelForCausalLM",
        "Trainer",
        "GPT2Config",
        "GPT2Attention",  # defined next to the model classes, but not a PreTrainedModel
        "__builtins__",
    ],
)
def test_a_structure_naming_a_class_outside_the_allow_list_is_refused(
    architecture: str, untouched: list[str]
) -> None:
    served = {**gpt2_structure(), "architecture": architecture}
    with pytest.raises(PlanFormatError, match=r"not a transformers model class.*allowed: GPT2"):
        Structure.from_json(served).build()


def test_a_structure_with_an_unknown_model_type_is_refused(untouched: list[str]) -> None:
    served = gpt2_structure()
    served["config"] = {**served["config"], "model_type": "os"}
    with pytest.raises(PlanFormatError, match="unknown transformers model_type 'os'"):
        Structure.from_json(served).build()


def test_a_served_config_cannot_choose_code_to_load() -> None:
    served = gpt2_structure()
    served["config"] = {
        **served["config"],
        "attn_implementation": "kernels-community/flash-attn",
        "experts_implementation": "evil/experts",
        "auto_map": {"AutoModelForCausalLM": "evil.Model"},
        "_attn_implementation_internal": "kernels-community/flash-attn",
        "trust_remote_code": True,
    }
    built = Structure.from_json(served).build()
    assert built.config._attn_implementation in (None, "eager", "sdpa")
    assert not hasattr(built.config, "auto_map") and not hasattr(built.config, "trust_remote_code")
    assert identity_of(built) == Structure.from_json(served).identity


def test_a_class_in_the_same_modeling_module_is_allowed() -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2DoubleHeadsModel

    model = ts.wrap(GPT2DoubleHeadsModel(make_gpt2().config).eval())
    served = structure_of(model)
    assert served.kind == "transformers" and served.architecture == "GPT2DoubleHeadsModel"
    assert identity_of(Structure.from_json(served.to_json()).build()) == identity_of(model)


def test_tree_nodes_name_classes_but_never_import_them(untouched: list[str]) -> None:
    named = {
        "system": type("system", (nn.Linear,), {"__module__": "os", "__qualname__": "system"}),
        "Reformer": type(
            "ReformerModel",
            (nn.Module,),
            {"__module__": UNIMPORTED, "__qualname__": "ReformerModel"},
        ),
    }
    host_model = nn.Sequential(named["system"](4, 4), named["Reformer"]())
    served = structure_of(host_model).to_json()
    built = Structure.from_json(served).build()  # stand-ins named like the host's classes
    assert type(built[0]).__module__ == "os" and type(built[0]).__qualname__ == "system"
    assert not isinstance(built[0], nn.Linear) and built[0].in_features == 4
    with pytest.raises(TypeError, match="stand-in"):
        built[0](torch.zeros(1, 4))
    assert identity_of(built) == identity_of(host_model)  # pinned to the host's model
    served["nodes"][1] = {**served["nodes"][1], "qualname": "system; import antigravity"}
    with pytest.raises(PlanFormatError, match="not a dotted Python name"):
        Structure.from_json(served).build()


# --------------------------------------------------------------------------- host paths


def test_the_served_structure_reveals_no_host_paths(tmp_path: Path) -> None:
    directory = tmp_path / "secret-checkpoints" / "llama"
    make_llama().save_pretrained(directory)
    model = ts.wrap(AutoModelForCausalLM.from_pretrained(directory).eval())
    assert model.config._name_or_path == str(directory)  # transformers records it
    served = structure_of(model)
    text = json.dumps(served.to_json())
    assert "secret-checkpoints" not in text and str(tmp_path) not in text
    assert "_name_or_path" not in served.config
    built = Structure.from_json(json.loads(text)).build()  # still builds, pinned
    assert identity_of(built) == identity_of(model)

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cache_dir = str(directory)
            self.url = "file:///srv/models"
            self.home = "~/models"
            self.name = "llama"
            self.proj = nn.Linear(2, 2)

    tree = json.dumps(structure_of(Cached()).to_json())
    assert "secret-checkpoints" not in tree and "/srv/models" not in tree and "~/" not in tree
    assert '"name": "llama"' in tree  # other strings still travel


# --------------------------------------------------------------------------- end to end


def test_a_hostile_host_cannot_make_the_client_import_or_build(untouched: list[str]) -> None:
    gpt2 = ts.wrap(make_gpt2())
    hostile_structure = {**structure_of(gpt2).to_json(), "architecture": "ReformerModel"}
    hostile_result = result_file(
        {"mapping": f"{UNIMPORTED}.ReformerModelOutput", "fields": {"logits": {"tensor": "r0"}}}
    )

    def respond(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models/gpt2/structure":
            return httpx.Response(200, json=hostile_structure)
        if path == "/v1/models/gpt2/jobs":
            return httpx.Response(202, json={"id": "j1", "state": "queued"})
        if path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "state": "done", "version": 2})
        if path == "/v1/jobs/j1/result":
            return httpx.Response(200, content=hostile_result)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    with Client("http://hostile.invalid", model="gpt2", progress=False) as client:
        client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(respond))
        with pytest.raises(PlanFormatError, match="not a transformers model class"):
            client.meta("gpt2")
        result = client.run(plan(gpt2), token_ids())
    assert type(result.output) is dict
