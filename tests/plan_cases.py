"""Shared material of the plan and remote tests: small models, layer cases, malformed plans.

``test_plans.py`` checks these locally and ``test_remote.py`` sends the same cases to a
host, so both read one list: every registered layer type with a site and an instance, and
every way a plan file can be wrong with the words its error must contain.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts
from torchsurgeon import plans
from torchsurgeon.plans import Plan, PlanLimits
from torchsurgeon.plans.wire import METADATA_KEY, pack

HIDDEN = 32
VOCAB = 96
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}

TEST_LIMITS = PlanLimits(max_tensor_bytes=1 << 20, max_steps=64)
"""Limits small enough that the oversize cases stay small."""


def make_gpt2(seed: int = 0, n_layer: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=HIDDEN,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def make_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


MAKERS: dict[str, Callable[..., nn.Module]] = {"gpt2": make_gpt2, "llama": make_llama}


def token_ids(seed: int = 0, batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_digest(model: nn.Module) -> str:
    """SHA-256 of every byte of every parameter and buffer (a test's full check)."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- layer cases

LayerCase = tuple[str, str, nn.Module]  # (path below the blocks, operation, layer)


def layer_cases(seed: int = 0) -> dict[str, LayerCase]:
    """One site and instance per registered layer type (SaveGrad apart: it needs backward;
    Stop apart: it ends the run, tested on its own)."""
    g = torch.Generator().manual_seed(seed)
    L = ts.layers
    return {
        "Save": ("1", "insert_after", L.Save("block1")),
        "SetValues": ("1.mlp", "insert_before", L.SetValues(ts.idx[:, -1, [1, 2]], 3.0)),
        "Add": ("0", "insert_after", L.Add(torch.randn(HIDDEN, generator=g), 0.5)),
        "Scale": ("0.mlp", "insert_after", L.Scale(2.0, index=ts.idx[..., :4])),
        "Zero": ("1.mlp", "insert_after", L.Zero(ts.idx[:, 0])),
        "MeanAblate": ("0.mlp", "insert_after", L.MeanAblate(torch.randn(HIDDEN, generator=g))),
        "Noise": ("0", "insert_after", L.Noise(0.1, seed=3)),
        "StopGradient": ("0", "insert_after", L.StopGradient()),
        "Patch": ("1", "insert_after", L.Patch(0, 1, index=ts.idx[-1])),
        "Compute": (  # reads a value saved at an earlier block, and a constant
            "1",
            "insert_after",
            L.Compute(
                ts.ops.where(ts.here > 0, ts.here, 0.1 * ts.here)
                + ts.saved("out0").mean(-1, keepdim=True) * torch.randn(HIDDEN, generator=g)
            ),
        ),
        "LowRankAdapter": (
            "0.mlp",
            "insert_after",
            L.LowRankAdapter(
                torch.randn(4, HIDDEN, generator=g), torch.randn(HIDDEN, 4, generator=g), 0.5
            ),
        ),
    }


def rewrite_with(model: nn.Module, family: str, type_name: str) -> nn.Module:
    """``model`` with the case of ``type_name`` and a ``Save`` after every block."""
    where, operation, layer = layer_cases()[type_name]
    blocks = BLOCKS[family]
    probe = getattr(ts.select(model).at(f"{blocks}.{where}"), operation)(layer)
    return ts.select(probe).at(f"{blocks}.*").insert_after(ts.layers.Save("out{n}"))


def good_plan(model: nn.Module) -> Plan:
    """A plan with a predicate, tensors, an index and a Save (what the bad cases corrupt)."""
    probe = (
        ts.select(model)
        .at("transformer.h.*")
        .where(ts.layer_index.isin([0, 1]))
        .insert_after(ts.layers.Add(torch.linspace(-1, 1, HIDDEN), 0.5))
    )
    probe = (
        ts.select(probe)
        .at("transformer.h.1.mlp")
        .insert_before(ts.layers.SetValues(ts.idx[:, -1, [1, 2]], 3.0))
    )
    probe = ts.select(probe).at("transformer.h.2").insert_after(ts.layers.Save("h2"))
    return plans.plan(probe)


# --------------------------------------------------------------------------- malformed plans


def _edited(
    change: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
) -> Callable[[Plan], bytes]:
    def build(plan: Plan) -> bytes:
        manifest, tensors = plan.manifest()
        manifest, tensors = copy.deepcopy(manifest), dict(tensors)
        change(manifest, tensors)
        return pack(manifest, tensors)

    return build


def _set(path: str, value: Any) -> Callable[[dict[str, Any], dict[str, torch.Tensor]], None]:
    def change(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _nested_not(depth: int) -> dict[str, Any]:
    predicate: dict[str, Any] = {"op": "==", "field": {"kind": "layer_index"}, "value": 0}
    for _ in range(depth):
        predicate = {"op": "not", "args": [predicate]}
    return predicate


def _torch_save_bytes(plan: Plan) -> bytes:
    buffer = io.BytesIO()
    torch.save({"vector": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def _raw_metadata(text: str) -> Callable[[Plan], bytes]:
    return lambda plan: save_safetensors({}, metadata={METADATA_KEY: text})


def _oversize(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    tensors["t0"] = torch.zeros((1 << 18) + 1)
    manifest["tensors"]["t0"]["shape"] = [(1 << 18) + 1]


def _float8(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    tensors["t0"] = tensors["t0"].to(torch.float8_e4m3fn)


def _nan(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    tensors["t0"] = torch.full_like(tensors["t0"], float("nan"))


def _unlisted(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    tensors["t9"] = torch.zeros(1)


def _many_steps(manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    manifest["steps"] = manifest["steps"] * 22  # 66 steps, over TEST_LIMITS.max_steps


MALFORMED: list[tuple[str, Callable[[Plan], bytes], str]] = [
    ("empty", lambda p: b"", "truncated"),
    ("truncated-header", lambda p: p.to_bytes()[:40], "truncated"),
    ("truncated-data", lambda p: p.to_bytes()[:-7], "truncated"),
    ("pickle", lambda p: pickle.dumps({"steps": [], "base": None}), "pickle"),
    ("torch-save-zip", _torch_save_bytes, "zip archive"),
    ("not-json", _raw_metadata("{not json"), "not valid JSON"),
    ("nan-constant", _raw_metadata('{"format": NaN}'), "non-JSON constant NaN"),
    ("wrong-format", _edited(_set("format", "pickle.plan")), "format"),
    ("schema-version", _edited(_set("schema_version", 2)), "unsupported schema version 2"),
    ("extra-field", _edited(_set("run_this", "import os")), "run_this"),
    ("bad-identity", _edited(_set("base.structure_hash", "abc")), "base.structure_hash"),
    ("unknown-layer", _edited(_set("steps.0.layer.type", "PythonExec")), "'PythonExec'"),
    ("apply-operation", _edited(_set("steps.0.operation", "apply")), "steps.0.operation"),
    ("bad-selector-op", _edited(_set("steps.0.selection.0.op", "eval")), "steps.0.selection.0"),
    ("bad-path", _edited(_set("steps.1.selection.0.arg", "transformer..h")), "bad path"),
    (
        "bad-predicate",
        _edited(_set("steps.0.selection.1.arg", {"op": "lambda", "code": "x"})),
        "unknown predicate op 'lambda'",
    ),
    (
        "bad-index",
        _edited(_set("steps.1.layer.config.index", [{"slice": [1, "a", None]}])),
        "steps.1.layer",
    ),
    ("unknown-config-field", _edited(_set("steps.1.layer.config.code", "1")), "unknown field"),
    ("missing-tensor", _edited(_set("steps.0.layer.tensors.vector", "t99")), "'t99'"),
    ("bad-tensor-ref", _edited(_set("steps.0.layer.tensors.vector", "../etc")), "vector"),
    ("unlisted-tensor", _edited(_unlisted), "does not list"),
    ("manifest-dtype", _edited(_set("tensors.t0.dtype", "int64")), "dtype int64"),
    ("disallowed-dtype", _edited(_float8), "F8_E4M3"),
    ("manifest-shape", _edited(_set("tensors.t0.shape", [3])), "shape [3]"),
    ("nan-values", _edited(_nan), "NaN"),
    ("oversize-tensor", _edited(_oversize), "per-tensor limit"),
    ("too-many-steps", _edited(_many_steps), "66 steps"),
    ("deep-nesting", _edited(_set("steps.0.selection.1.arg", _nested_not(60))), "nests"),
    (
        "remove-with-layer",
        _edited(_set("steps.0.operation", "remove_from_parent")),
        "takes no layer",
    ),
    ("bad-topk", _edited(_set("returning.reductions", {"logits": {"topk": 0}})), "topk"),
]
"""``(case id, build(good_plan) -> bytes, words the error must contain)``."""


def manifest_json(plan: Plan) -> str:
    return json.dumps(plan.manifest()[0], sort_keys=True)


TEXTS = ["the cat sat on the mat", "hello world", "a dog"]
"""Texts that :func:`save_tokenizer`'s vocabulary covers."""


def save_tokenizer(directory: Any, extra: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer built from local data (no download), saved beside the model
    (``extra``: words after the usual ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", *extra]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(directory)
