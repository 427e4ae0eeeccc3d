"""An independent reference for attention-pattern edits, built on ``transformers`` alone.

:func:`reference_attention` runs a ``transformers`` model with a custom attention function
(registered through ``transformers``' ``AttentionInterface``) that recomputes eager
attention from the queries, keys, values and mask ``transformers`` hands it, and applies an
edit to one head's softmax output in one layer. Nothing here uses torchsurgeon, so a
torchsurgeon edit of ``blocks.{LAYER}.attn.pattern`` can be checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import transformers
from torch import nn
from transformers.masking_utils import eager_mask

LAYER, HEAD = 1, 2
REFERENCE = "ts_reference_attention"
PatternEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def knock_out(pattern: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Zero head ``HEAD``'s attention weights."""
    out = pattern.clone()
    out[:, HEAD] = 0
    return out


def uniform(pattern: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head ``HEAD`` attends equally to every key it is allowed to see."""
    out = pattern.clone()
    weights = allowed[:, HEAD].to(pattern.dtype)
    out[:, HEAD] = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return out


def _reference_attention(target: nn.Module, edit: PatternEdit) -> Callable[..., object]:
    """Eager attention as ``transformers`` defines it, with ``edit`` on ``target``'s pattern."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        softcap: float | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        pattern = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        if module is target:
            allowed = (
                attention_mask[..., : key.shape[-2]] == 0
                if attention_mask is not None
                else torch.ones_like(pattern, dtype=torch.bool)
            )
            pattern = edit(pattern, allowed.expand_as(pattern))
        out = torch.matmul(pattern, value)
        return out.transpose(1, 2).contiguous(), pattern

    return attention


def _attention_module(hf_model: nn.Module, layer: int) -> nn.Module:
    """The ``transformers`` module that calls the attention function in block ``layer``."""
    found = [
        m
        for name, m in hf_model.named_modules()
        if getattr(m, "layer_idx", None) == layer
        and hasattr(m, "scaling")
        and "crossattention" not in name
    ]
    assert len(found) == 1, [type(m).__name__ for m in found]
    return found[0]


@contextmanager
def reference_attention(hf_model: nn.Module, edit: PatternEdit) -> Iterator[None]:
    """Run ``hf_model`` with the reference attention function (and its eager masks)."""
    attention = _reference_attention(_attention_module(hf_model, LAYER), edit)
    transformers.AttentionInterface.register(REFERENCE, attention)
    transformers.AttentionMaskInterface.register(REFERENCE, eager_mask)
    hf_model.set_attn_implementation(REFERENCE)
    try:
        yield
    finally:
        hf_model.set_attn_implementation("eager")


def pattern_hook(edit: PatternEdit) -> Callable[..., torch.Tensor]:
    def hook(
        module: nn.Module, args: tuple[torch.Tensor, ...], pattern: torch.Tensor
    ) -> torch.Tensor:
        # args[0] is the masked scores; a key was allowed where its score is not the minimum.
        scores = args[0]
        allowed = scores > torch.finfo(scores.dtype).min
        return edit(pattern, allowed)

    return hook
