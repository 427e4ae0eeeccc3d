"""Models whose ``forward`` is replaced on the instance: handled, or refused — never bypassed.

accelerate's dispatch (``cpu_offload``, ``disk_offload``, ``dispatch_model`` with a
``device_map``, which ``from_pretrained(device_map=...)`` uses whenever it offloads) sets
``module.forward = partial(new_forward, module)`` on every module it manages. A tree's copy
of such a module must run *its own* children, or every rewrite below it is silently skipped;
``ts.wrap`` re-binds those partials to the copy. Each layer type on a dispatched model must
equal the plain model with a hand-written hook; a model whose forward was replaced by
something torchsurgeon cannot re-bind (nnsight, a closure) is refused with a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hook_reference import hooks, max_diff, replace_input, replace_output
from requirements import require
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts

accelerate = require("accelerate")

SITE = "model.layers.1.mlp.down_proj"
WIDTH = 48  # the MLP hidden width: down_proj's input
OUT = 32


@pytest.fixture(scope="module")
def reference() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=OUT,
        intermediate_size=WIDTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(4))


def _dispatched(kind: str, model: nn.Module, tmp: Path) -> nn.Module:
    model = copy.deepcopy(model)
    if kind == "cpu_offload":
        accelerate.cpu_offload(model, execution_device="cpu")
    elif kind == "disk_offload":
        accelerate.disk_offload(model, offload_dir=str(tmp), execution_device="cpu")
    else:  # a device_map spanning "cpu" and "disk"
        device_map = {
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.layers.2": "disk",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
        accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp))
    return model


VEC = torch.randn(WIDTH, generator=torch.Generator().manual_seed(1))
MEAN = torch.randn(WIDTH, generator=torch.Generator().manual_seed(2))
LORA = ts.layers.LowRankAdapter(
    torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3)),
    torch.randn(OUT, 2, generator=torch.Generator().manual_seed(5)),
    0.5,
)


def _set(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, -1, [3, 7]] = 5.0
    return x


def _patch(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[2, -1] = x[0, -1]
    return x


def _lora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + 0.5 * (args[0] @ LORA.a.T @ LORA.b.T)


# name -> (side, layer, reference: a pre-hook / forward-hook function on the plain model)
CASES: dict[str, tuple[str, nn.Module, Callable]] = {
    "SetValues": ("before", ts.layers.SetValues(ts.idx[:, -1, [3, 7]], 5.0), replace_input(_set)),
    "Add": ("before", ts.layers.Add(VEC, 2.0), replace_input(lambda x: x + 2.0 * VEC)),
    "Scale": ("before", ts.layers.Scale(0.5), replace_input(lambda x: x * 0.5)),
    "Zero": ("before", ts.layers.Zero(ts.idx[..., :8]), replace_input(lambda x: _zero8(x))),
    "MeanAblate": (
        "before",
        ts.layers.MeanAblate(MEAN, index=ts.idx[:, 1]),
        replace_input(lambda x: _mean_at_1(x)),
    ),
    "Patch": ("before", ts.layers.Patch(0, 2, ts.idx[-1]), replace_input(_patch)),
    "StopGradient": ("before", ts.layers.StopGradient(), replace_input(lambda x: x.detach())),
    "LowRankAdapter": ("after", LORA, _lora_hook),
    "Save": ("after", ts.layers.Save("x"), replace_output(lambda x: x)),
}


def _zero8(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., :8] = 0
    return x


def _mean_at_1(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, 1] = MEAN
    return x


@pytest.mark.parametrize("kind", ["cpu_offload", "disk_offload", "cpu+disk"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_layer_on_a_dispatched_model_equals_the_hook_reference(
    kind: str, case: str, reference: nn.Module, ids: torch.Tensor, tmp_path: Path
) -> None:
    side, layer, hook = CASES[case]
    model = _dispatched(kind, reference, tmp_path)
    select = ts.select(ts.wrap(model)).at(SITE)
    probe = select.insert_before(layer) if side == "before" else select.insert_after(layer)
    probe = ts.select(probe).at(SITE).insert_after(ts.layers.Save("out"))
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        place = {"pre": {SITE: hook}} if side == "before" else {"post": {SITE: hook}}
        with hooks(reference, **place):
            want = reference(ids).logits
        record = hooks(reference, post={SITE: lambda m, a, out: seen.append(out)})
        with hooks(reference, **place), record:  # the edit first, then the record of what follows
            reference(ids)
        clean = reference(ids).logits
        result = ts.run(probe, ids)
        again = model(ids).logits  # the dispatched original, after the run
    assert max_diff(result.output.logits, want) <= 1e-6
    assert max_diff(result.saved["out"], seen[0]) <= 1e-6
    if case not in ("Save", "StopGradient"):
        assert max_diff(result.output.logits, clean) > 1e-3  # the edit is really there
    assert max_diff(again, clean) <= 1e-6  # the dispatched model itself is unchanged


def test_noise_on_a_dispatched_model_equals_the_undispatched_tree(
    reference: nn.Module, ids: torch.Tensor, tmp_path: Path
) -> None:
    layer = ts.layers.Noise(0.3, seed=7, index=ts.idx[:, -1])
    plain = ts.select(ts.wrap(reference)).at(SITE).insert_before(layer)
    dispatched = ts.select(ts.wrap(_dispatched("cpu+disk", reference, tmp_path))).at(SITE)
    with torch.no_grad():
        want = plain(ids).logits
        got = dispatched.insert_before(layer)(ids).logits
    assert max_diff(got, want) <= 1e-6 and max_diff(got, reference(ids).logits) > 1e-3


def test_an_nnsight_wrapped_model_is_refused_naming_the_cause(reference: nn.Module) -> None:
    nnsight = require("nnsight")
    model = copy.deepcopy(reference)
    nnsight.NNsight(model)  # replaces forward on the instance of every module
    with pytest.raises(ts.FrozenModuleError, match=r"'forward' is replaced on the instance"):
        ts.wrap(model)


def test_a_monkey_patched_forward_is_refused(reference: nn.Module) -> None:
    model = copy.deepcopy(reference)
    block = model.model.layers[1]
    original = block.forward
    block.forward = lambda *args, **kwargs: original(*args, **kwargs)
    with pytest.raises(ts.FrozenModuleError, match=r"'model\.layers\.1'.*bypass"):
        ts.wrap(model)
