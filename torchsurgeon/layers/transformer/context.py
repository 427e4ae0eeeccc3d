"""What one forward call hands its layers besides the residual stream.

Attention needs more than its input: the padding and causal masks, the rotary angles, the
KV cache, and hook points want the tokens' positions. The model computes these once per
call and passes a :class:`ForwardContext` down through every block (the explicit model has
no hidden state, so this is the only way call-specific data reaches a layer). A forward hook
on a block sees it as the block's second argument.

``attention_masks`` builds the boolean masks: ``True`` where a query may attend to a key.
Queries and keys are indexed by their place in the whole sequence (cached tokens first);
a causal mask allows keys at or before the query, a sliding window of ``w`` also requires
``query - key < w`` (as in Mistral, Qwen2, Gemma 2 and Phi-3), and the padding mask removes
padded keys. A padded *query* keeps its (meaningless) row; only real tokens' outputs count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from torchsurgeon.layers.transformer.cache import KVCache

__all__ = ["ForwardContext", "attention_masks"]


@dataclass(frozen=True)
class ForwardContext:
    """Per-call inputs of every block; built by the model's forward, read by its layers."""

    positions: torch.Tensor
    """``[pos]``: sequence index of each token of this call (cached tokens counted)."""
    position_ids: torch.Tensor
    """``[batch, pos]``: position of each token as position embeddings see it (padding skipped)."""
    masks: dict[int | None, torch.Tensor]
    """``[batch, 1, query, key]`` boolean masks by sliding window (``None``: no window)."""
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(cos, sin)`` for rotary families, else ``None``."""
    cache: KVCache | None = None
    """The KV cache this call appends to, if any."""


def attention_masks(
    key_mask: torch.Tensor,
    n_queries: int,
    *,
    causal: bool,
    windows: Iterable[int | None],
) -> dict[int | None, torch.Tensor]:
    """Boolean attention masks ``[batch, 1, query, key]`` for each window in ``windows``.

    ``key_mask`` is ``[batch, key]`` (``True``: a real token); the queries are the last
    ``n_queries`` keys.
    """
    n_keys = key_mask.shape[1]
    device = key_mask.device
    padding = key_mask[:, None, None, :].bool()
    if not causal:
        return {window: padding for window in set(windows)}
    query_index = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    key_index = torch.arange(n_keys, device=device)[None, :]
    before = key_index <= query_index
    masks: dict[int | None, torch.Tensor] = {}
    for window in set(windows):
        allowed = before if window is None else before & (query_index - key_index < window)
        masks[window] = padding & allowed
    return masks
