"""Converted and loaded models compute what ``transformers`` computes.

For every family: logits on a padded batch (left and right padding) match the
``transformers`` model on every real token, for ``convert(hf_model)`` and for
``load(saved_checkpoint)``; greedy generation of 20 tokens matches ``generate`` token for
token; and the things that make each family special (sliding windows, rotary scaling past
the original context) are really exercised by the inputs, not silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_zoo import hf_logits, max_diff_on_tokens
from torch import nn

import torchsurgeon.models as tsm

TOLERANCE = 1e-4


def test_convert_logits_match(
    family: str, hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    hf = hf_models(family)
    model = tsm.convert(hf)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (*ids.shape, hf.config.vocab_size)
    assert max_diff_on_tokens(logits, hf_logits(hf, ids, mask), mask) <= TOLERANCE


def test_load_logits_match(
    family: str,
    hf_models: Callable[[str], nn.Module],
    checkpoints: Callable[[str], Path],
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    ids, mask = batch
    model = tsm.load(checkpoints(family))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    assert max_diff_on_tokens(logits, hf_logits(hf_models(family), ids, mask), mask) <= TOLERANCE


def test_padding_does_not_change_real_tokens(
    family: str, hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # Each padded row gives the same logits as the same tokens run alone, unpadded.
    # Phi-3's longrope picks its frequencies from the call's longest sequence (as
    # transformers does), so only rows longer than original_max_position_embeddings (8 in
    # the zoo) use the batch's long factors when run alone; the 8-token row does not.
    min_length = 9 if family == "phi3" else 1
    ids, mask = batch
    model = tsm.convert(hf_models(family))
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        rows = [row for row in range(ids.shape[0]) if int(mask[row].sum()) >= min_length]
        assert len(rows) >= 2  # the unpadded row and the left-padded one, at least
        for row in rows:
            keep = mask[row].bool()
            alone = model(ids[row, keep][None])
            assert (padded[row, keep] - alone[0]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("source", ["convert", "load"])
def test_greedy_generation_matches(
    source: str,
    causal_family: str,
    hf_models: Callable[[str], nn.Module],
    checkpoints: Callable[[str], Path],
    prompts: tuple[torch.Tensor, torch.Tensor],
) -> None:
    ids, mask = prompts
    hf = hf_models(causal_family)
    model = tsm.convert(hf) if source == "convert" else tsm.load(checkpoints(causal_family))
    with torch.no_grad():
        expected = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    generated = tsm.generate(model, ids, 20, attention_mask=mask)
    assert generated.shape == (2, 30)
    assert torch.equal(generated, expected)
    assert len(set(generated[:, 10:].flatten().tolist())) > 2  # not a degenerate repeat


@pytest.mark.parametrize("family_name", ["mistral", "qwen2", "gemma2", "phi3"])
def test_sliding_window_is_exercised(
    family_name: str,
    hf_models: Callable[[str], nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # The test sequences are longer than the windows: dropping the window changes logits.
    ids, mask = batch
    model = tsm.convert(hf_models(family_name))
    assert any(window is not None for window in model.config.sliding_windows)
    unwindowed = tsm.convert(hf_models(family_name))
    unwindowed.config = replace(model.config, sliding_windows=(None,) * model.config.n_layers)
    for block in unwindowed.blocks:
        block.attn.window = None
    with torch.no_grad():
        diff = max_diff_on_tokens(
            model(ids, attention_mask=mask), unwindowed(ids, attention_mask=mask), mask
        )
    assert diff > 1e-3


def test_longrope_switches_to_long_factors(hf_models: Callable[[str], nn.Module]) -> None:
    # Phi-3's test config has an original context of 8: longer inputs use the long factors.
    model = tsm.convert(hf_models("phi3"))
    assert model.rotary is not None
    short_cos, _ = model.rotary(torch.arange(8)[None])
    long_cos, _ = model.rotary(torch.arange(12)[None])
    assert not torch.allclose(short_cos[0, :8], long_cos[0, :8])


def test_sites_are_the_same_in_every_family(
    family: str, hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    model = tsm.convert(hf_models(family))
    config = model.config
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: torch.Tensor) -> None:
            shapes[name] = tuple(output.shape)

        return hook

    names = [
        "embed",
        "blocks.1.resid_pre",
        "blocks.1.ln1",
        "blocks.1.attn.q",
        "blocks.1.attn.k",
        "blocks.1.attn.v",
        "blocks.1.attn.scores",
        "blocks.1.attn.mask",
        "blocks.1.attn.pattern",
        "blocks.1.attn.mix",
        "blocks.1.attn.head_out",
        "blocks.1.attn.out",
        "blocks.1.resid_mid",
        "blocks.1.ln2",
        "blocks.1.mlp.up",
        "blocks.1.mlp.hidden",
        "blocks.1.mlp.out",
        "blocks.1.resid_post",
        "final_norm",
        "unembed",
    ]
    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    b, p, d, h, g, dh = (
        3,
        ids.shape[1],
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.d_head,
    )
    assert shapes["blocks.1.attn.q"] == (b, p, h, dh)
    assert shapes["blocks.1.attn.k"] == shapes["blocks.1.attn.v"] == (b, p, g, dh)
    assert shapes["blocks.1.attn.pattern"] == (b, h, p, p)
    assert shapes["blocks.1.attn.head_out"] == (b, p, h, dh)
    assert shapes["blocks.1.mlp.hidden"] == (b, p, config.d_mlp)
    for name in ("embed", "blocks.1.resid_pre", "blocks.1.resid_mid", "blocks.1.resid_post"):
        assert shapes[name] == (b, p, d)
    assert shapes["unembed"] == (b, p, config.vocab_size)
