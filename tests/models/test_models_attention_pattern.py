"""Editing one head's attention pattern, checked against an independent reference.

The edit is a plain ``register_forward_hook`` on ``blocks.1.attn.pattern`` of the
converted model. The reference never touches torchsurgeon (see :mod:`reference_attention`):
it runs the ``transformers`` model with a custom attention function that applies the same
edit to the same head's softmax output in the same layer. Two edits are tested: zeroing a
head (knock-out) and replacing its pattern by uniform attention over the keys it may see.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_zoo import hf_logits, make_hf_model, max_diff_on_tokens
from reference_attention import (
    HEAD,
    LAYER,
    PatternEdit,
    knock_out,
    pattern_hook,
    reference_attention,
    uniform,
)
from torch import nn

import torchsurgeon.models as tsm


@pytest.mark.parametrize("edit", [knock_out, uniform], ids=["knock_out", "uniform"])
def test_pattern_edit_matches_reference(
    family: str, edit: PatternEdit, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    hf = make_hf_model(family)  # a private copy: the reference switches its attention function
    model = tsm.convert(hf)
    handle = model.get_submodule(f"blocks.{LAYER}.attn.pattern").register_forward_hook(
        pattern_hook(edit)
    )
    try:
        with torch.no_grad():
            edited = model(ids, attention_mask=mask)
    finally:
        handle.remove()
    with reference_attention(hf, edit):
        reference = hf_logits(hf, ids, mask)
    unedited = hf_logits(hf, ids, mask)
    assert max_diff_on_tokens(edited, reference, mask) <= 1e-4
    assert max_diff_on_tokens(edited, unedited, mask) > 1e-3  # the edit did something


def test_reference_without_edit_is_transformers(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    # The reference attention function itself reproduces transformers' eager attention.
    ids, mask = batch
    hf = make_hf_model("gemma2")
    with reference_attention(hf, lambda pattern, allowed: pattern):
        reference = hf_logits(hf, ids, mask)
    assert max_diff_on_tokens(reference, hf_logits(hf, ids, mask), mask) <= 1e-5


def test_zero_pattern_equals_zero_head_out(
    family: str, hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # Two ways to knock out a head — its pattern or its output — give the same logits.
    ids, mask = batch
    model = tsm.convert(hf_models(family))

    def zero_head(
        module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        out = out.clone()
        out[:, :, HEAD] = 0
        return out

    outputs = []
    for site, hook in [("pattern", pattern_hook(knock_out)), ("head_out", zero_head)]:
        handle = model.get_submodule(f"blocks.{LAYER}.attn.{site}").register_forward_hook(hook)
        with torch.no_grad():
            outputs.append(model(ids, attention_mask=mask))
        handle.remove()
    assert max_diff_on_tokens(outputs[0], outputs[1], mask) <= 1e-5
