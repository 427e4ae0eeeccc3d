"""Converted models under torchsurgeon's own surgery: selectors, intervention layers, compile.

The explicit sites are reached with ``ts.select(...).at(path)`` and edited with the
library's intervention layers; the result must match the same edit computed independently
(:mod:`reference_attention`), leave the base model untouched, apply at every generation
step, and survive ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_zoo import hf_logits, make_hf_model, max_diff_on_tokens
from reference_attention import HEAD, LAYER, knock_out, reference_attention
from torch import nn

import torchsurgeon as ts
import torchsurgeon.models as tsm


def test_zero_one_head_with_ts_layers(family: str, batch: tuple[torch.Tensor, ...]) -> None:
    ids, mask = batch
    hf = make_hf_model(family)
    model = tsm.convert(hf)
    probe = (
        ts.select(model)
        .at(f"blocks.{LAYER}.attn.pattern")
        .insert_after(ts.layers.Zero(index=ts.idx[:, HEAD]))
    )
    with torch.no_grad():
        edited = probe(ids, attention_mask=mask)
        untouched = model(ids, attention_mask=mask)
    with reference_attention(hf, knock_out):
        reference = hf_logits(hf, ids, mask)
    assert max_diff_on_tokens(edited, reference, mask) <= 1e-4
    assert max_diff_on_tokens(untouched, hf_logits(hf, ids, mask), mask) <= 1e-4
    # the rewrite shares every parameter's storage
    assert probe.embed.weight.data_ptr() == model.embed.weight.data_ptr()


def test_save_every_pattern_with_ts_run(
    hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, ...]
) -> None:
    ids, mask = batch
    model = tsm.convert(hf_models("llama"))
    probe = ts.select(model).at_instances_of("AttentionPattern").insert_after(ts.layers.Save())
    result = ts.run(probe, ids, attention_mask=mask)
    patterns = result.saved
    assert sorted(patterns) == [f"blocks.{i}.attn.pattern" for i in range(3)]
    pattern = patterns["blocks.0.attn.pattern"]
    assert pattern.shape == (3, 4, ids.shape[1], ids.shape[1])
    real = mask.bool()
    assert torch.allclose(pattern.sum(-1)[real[:, None, :].expand(-1, 4, -1)], torch.tensor(1.0))


def test_rewrite_applies_at_every_generation_step(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("gpt2"))
    probe = (
        ts.select(model)
        .at("blocks.1.mlp.hidden")
        .insert_after(ts.layers.Scale(0.0, index=ts.idx[..., :64]))
    )
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    edited = tsm.generate(probe, ids, 8)
    # Reference without a cache: the whole sequence recomputed by the rewritten model.
    reference = ids
    with torch.no_grad():
        for _ in range(8):
            reference = torch.cat((reference, probe(reference)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(edited, reference)
    assert not torch.equal(edited, tsm.generate(model, ids, 8))


def test_convert_accepts_a_wrapped_model(hf_models: Callable[[str], nn.Module]) -> None:
    hf = hf_models("gpt2")
    model = tsm.convert(ts.wrap(hf))
    assert model.embed.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


@pytest.mark.slow
def test_compiled_gpt2_matches_eager(batch: tuple[torch.Tensor, ...]) -> None:
    ids, mask = batch
    model = tsm.convert(make_hf_model("gpt2"))
    probe = (
        ts.select(model)
        .at(f"blocks.{LAYER}.attn.pattern")
        .insert_after(ts.layers.Zero(index=ts.idx[:, HEAD]))
    )
    compiled = torch.compile(probe, fullgraph=True)
    with torch.no_grad():
        eager = probe(ids, attention_mask=mask)
        got = compiled(ids, attention_mask=mask)
        base = model(ids, attention_mask=mask)
    assert max_diff_on_tokens(got, eager, mask) <= 1e-4
    assert max_diff_on_tokens(eager, base, mask) > 1e-3
