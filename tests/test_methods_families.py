"""Every method runs on a wrapped ``transformers`` model and on its conversion alike.

``ts.convert(model)`` computes what the ``transformers`` model computes (``tests/models``),
and the methods read both through the one family table (the ``transformers`` layout for
one, the converted model's own for the other), so every method's result must agree on the
two to float rounding. GPT-2 (``Conv1D`` projections) and Llama (grouped-query attention),
unpadded and padded. Also: ``train_lora`` adapts any module mapping the last dimension — a
``Conv1D``, a converted ``Projection``, a whole MLP — checked against hand-written hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hook_reference import VOCAB, hooks, max_diff
from torch import nn

import torchsurgeon as ts
from torchsurgeon import methods as M

TOL = 1e-5
FAMILY = pytest.mark.parametrize("family", ["gpt2", "llama"])
METRIC = M.LogitDiff([5, 6], [7, 8])


@pytest.fixture(scope="module")
def pair(gpt2_hf: nn.Module, llama_hf: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``family -> (wrapped transformers model, its conversion)``."""
    return {
        name: (ts.wrap(hf), ts.convert(hf)) for name, hf in (("gpt2", gpt2_hf), ("llama", llama_hf))
    }


def prompts(seed: int = 0, n: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, VOCAB, (n, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(2, VOCAB, (n,), generator=g)
    return clean, corrupted


def padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def test_methods_find_the_layout_of_loaded_and_converted_models(
    gpt2_hf: nn.Module, tmp_path: Any
) -> None:
    gpt2_hf.save_pretrained(tmp_path)
    for model in (ts.load(tmp_path), ts.convert(gpt2_hf)):
        layout = M.layout_of(model)
        assert (layout.blocks, layout.attn_out, layout.mlp_down) == (
            "blocks",
            "attn.out",
            "mlp.out",
        )
        assert layout.family == "gpt2" and layout.n_heads == 4


@FAMILY
def test_lens_steering_and_probes_agree(
    family: str, pair: dict[str, tuple[nn.Module, nn.Module]]
) -> None:
    hf, converted = pair[family]
    clean, corrupted = prompts()
    a, b = M.logit_lens(hf, clean[0]), M.logit_lens(converted, clean[0])
    assert max_diff(a.log_probs, b.log_probs) <= TOL and a.top_labels == b.top_labels
    vectors = [M.steering_vector(m, clean, corrupted, layer=1) for m in (hf, converted)]
    assert max_diff(*vectors) <= TOL
    ids, mask = padded()
    masks = {"positive_mask": mask, "negative_mask": mask.flip(0)}
    vectors = [M.steering_vector(m, ids, ids.flip(0), layer=1, **masks) for m in (hf, converted)]
    assert max_diff(*vectors) <= TOL
    ids, mask = padded()
    features = [
        M.residual_features(m, ids, position=None, attention_mask=mask) for m in (hf, converted)
    ]
    assert max_diff(*features) <= TOL
    labels = (ids % 2).long()
    probes = [
        M.train_probe(m, ids.repeat(4, 1), labels.repeat(4, 1), position=None, steps=30)
        for m in (hf, converted)
    ]
    assert probes[0].probes[1].test_accuracy == probes[1].probes[1].test_accuracy
    assert max_diff(probes[0].probes[1].weight, probes[1].probes[1].weight) <= 1e-4


@FAMILY
def test_steer_agrees(family: str, pair: dict[str, tuple[nn.Module, nn.Module]]) -> None:
    hf, converted = pair[family]
    ids = prompts(n=2, length=5)[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    for positions in ("all", "prompt", "generated", [1, 3]):
        results = [
            M.steer(
                m, ids, vector, layers=[1], scale=4.0, positions=positions, max_new_tokens=5,
                do_sample=False,
            )
            for m in (hf, converted)
        ]  # fmt: skip
        assert torch.equal(results[0].sequences, results[1].sequences), positions
    with pytest.raises(TypeError, match="do_sample, temperature, top_k and seed"):
        M.steer(converted, ids, vector, layers=[1], eos_token_id=2)


@FAMILY
def test_patching_tracing_and_knockout_agree(
    family: str, pair: dict[str, tuple[nn.Module, nn.Module]]
) -> None:
    hf, converted = pair[family]
    clean, corrupted = prompts(seed=1)
    for over in ("resid", "heads"):
        grids = [
            M.activation_patching(m, clean, corrupted, METRIC, over=over) for m in (hf, converted)
        ]
        assert max_diff(grids[0].values, grids[1].values) <= TOL
        assert grids[0].values.abs().max() > 1e-3
        grids = [
            M.attribution_patching(m, clean, corrupted, METRIC, over=over) for m in (hf, converted)
        ]
        assert max_diff(grids[0].values, grids[1].values) <= TOL
    for over in ("resid", "mlp", "attn"):
        grids = [
            M.causal_tracing(m, clean[0], [1, 2], answer=9, over=over, std=0.5, samples=2)
            for m in (hf, converted)
        ]
        assert max_diff(grids[0].values, grids[1].values) <= TOL
        assert grids[0].values.abs().max() > 1e-6
    ids, mask = padded()
    metric = M.LogitDiff([5, 6, 7], [8, 9, 10])
    for mode in ("zero", "mean"):
        grids = [
            M.head_knockout(m, ids, metric, mode=mode, attention_mask=mask) for m in (hf, converted)
        ]
        assert max_diff(grids[0].values, grids[1].values) <= TOL
        knocked = [
            M.knockout_heads(m, [(1, 2)], mode=mode, reference_ids=ids, reference_mask=mask)
            for m in (hf, converted)
        ]
        with torch.no_grad():
            assert max_diff(logits(knocked[0](ids)), logits(knocked[1](ids))) <= TOL
    means = [M.head_means(m, ids, reference_mask=mask) for m in (hf, converted)]
    assert max_diff(*means) <= TOL


@FAMILY
def test_force_neurons_agrees(family: str, pair: dict[str, tuple[nn.Module, nn.Module]]) -> None:
    hf, converted = pair[family]
    ids, mask = padded()
    results = [
        M.force_neurons(m, ids, {1: [3, 7], 2: [5]}, 5.0, rows=slice(1, None), attention_mask=mask)
        for m in (hf, converted)
    ]
    real = mask.bool()  # padded positions' outputs are undefined (no real query there)
    assert max_diff(results[0].logits[real], results[1].logits[real]) <= TOL
    assert max_diff(results[0].shift, results[1].shift) <= TOL
    assert torch.equal(results[0].top_ids, results[1].top_ids)
    assert results[1].shift.abs().max() > 1e-3


@FAMILY
def test_train_lora_agrees(family: str, pair: dict[str, tuple[nn.Module, nn.Module]]) -> None:
    hf, converted = pair[family]
    ids = torch.randint(2, VOCAB, (6, 8), generator=torch.Generator().manual_seed(11))
    results = [M.train_lora(m, ids, rank=2, steps=10, lr=2e-2) for m in (hf, converted)]
    assert abs(results[0].initial_loss - results[1].initial_loss) <= TOL
    assert max_diff(results[0].losses, results[1].losses) <= 1e-4
    with torch.no_grad():
        assert max_diff(logits(results[0].model(ids)), logits(results[1].model(ids))) <= 1e-4


@pytest.mark.parametrize(
    ("which", "targets"),
    [
        ("hf", "transformer.h.*.mlp"),  # GPT2MLP: measured widths
        ("hf", "transformer.h.*.mlp.c_fc"),  # Conv1D
        ("converted", "blocks.*.mlp"),  # a converted MLP
        ("converted", "blocks.*.attn.out"),  # Projection
    ],
)
def test_train_lora_adapts_any_module_mapping_the_last_dimension(
    which: str, targets: str, gpt2_hf: nn.Module
) -> None:
    model = gpt2_hf if which == "hf" else ts.convert(gpt2_hf)
    ids = torch.randint(2, VOCAB, (6, 8), generator=torch.Generator().manual_seed(12))
    result = M.train_lora(model, ids, targets=targets, rank=2, steps=10, lr=2e-2)
    assert result.final_loss < result.initial_loss
    assert len(result.adapters) == 3

    def add_low_rank(path: str) -> Callable[..., torch.Tensor]:
        adapter = result.adapters[path]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + args[0] @ adapter.a.T @ adapter.b.T * adapter.scale

        return hook

    with hooks(model, post={p: add_low_rank(p) for p in result.adapters}), torch.no_grad():
        expected = logits(model(ids))
    with torch.no_grad():
        assert max_diff(logits(result.model(ids)), expected) <= TOL
        assert max_diff(logits(model(ids)), expected) > 1e-4


def test_methods_on_a_base_model(gpt2_hf: nn.Module) -> None:
    base = gpt2_hf.transformer  # GPT2Model: no unembedding
    clean, corrupted = prompts()
    vectors = [M.steering_vector(m, clean, corrupted, layer=1) for m in (base, ts.convert(base))]
    assert max_diff(*vectors) <= TOL
    assert max_diff(vectors[0], M.steering_vector(gpt2_hf, clean, corrupted, layer=1)) <= TOL
    with pytest.raises(ValueError, match="base model without a language-model head"):
        M.logit_lens(ts.convert(base), clean[0])
