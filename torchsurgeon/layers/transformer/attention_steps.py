"""The steps of attention after the projections, one small module each.

Splitting attention into modules makes every intermediate a researcher names a site whose
*output* is that tensor (shapes for ``h`` query heads, ``g`` key/value heads):

===================  ==============================================  =========================
site (``attn.``)      module and output                               TransformerLens
===================  ==============================================  =========================
``scores``           :class:`AttentionScores`: scaled (and, for      (none)
                     Gemma 2, soft-capped) ``q . k``,
                     ``[batch, h, query, key]``
``mask``             :class:`MaskScores`: scores with disallowed     ``attn.hook_attn_scores``
                     keys set to the dtype's minimum
``pattern``          :class:`AttentionPattern`: softmax over keys,   ``attn.hook_pattern``
                     ``[batch, h, query, key]``
``mix``              :class:`MixValues`: ``pattern @ v`` per head,   (``attn.hook_z``)
                     ``[batch, query, h, d_head]``
===================  ==============================================  =========================

Grouped-query and multi-query attention (``g < h``) share each key/value head among
``h // g`` consecutive query heads; the steps expand keys and values to ``h`` heads
themselves, so ``pattern`` always has one map per *query* head.
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.surgery.errors import SiteError

__all__ = ["AttentionPattern", "AttentionScores", "MaskScores", "MixValues", "expand_heads"]


def expand_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat each of the ``g`` heads of ``x`` (``[batch, pos, g, d]``) to make ``n_heads``."""
    n_groups = x.shape[2]
    if n_groups == n_heads:
        return x
    if n_heads % n_groups:
        raise SiteError(
            f"attention: {n_heads} query heads cannot share {n_groups} key/value heads evenly; "
            f"an edit at q or k must keep a head count that divides {n_heads}"
        )
    return x.repeat_interleave(n_heads // n_groups, dim=2)


class AttentionScores(nn.Module):
    """``scale * q . k`` for every head, query and key; optionally ``cap * tanh(s / cap)``."""

    def __init__(self, scale: float, softcap: float | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scores ``[batch, h, query, key]`` from ``q`` ``[batch, query, h, d]`` and ``k``
        ``[batch, key, g, d]``."""
        k = expand_heads(k, q.shape[2])
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores

    def extra_repr(self) -> str:
        softcap = f", softcap={self.softcap}" if self.softcap is not None else ""
        return f"scale={self.scale:.6g}{softcap}"


class MaskScores(nn.Module):
    """Set the scores of keys a query may not see to the dtype's minimum."""

    def forward(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` is a boolean mask broadcastable to ``scores``."""
        if allowed.shape[-1] != scores.shape[-1]:
            raise SiteError(
                f"attention mask_scores: the mask covers {allowed.shape[-1]} keys but the scores "
                f"have {scores.shape[-1]}"
            )
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


class AttentionPattern(nn.Module):
    """Softmax over keys (computed in float32, returned in the scores' dtype)."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """``[batch, h, query, key]`` scores to attention weights that sum to one per query."""
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


class MixValues(nn.Module):
    """Each head's weighted sum of values: ``pattern @ v``."""

    def forward(self, pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``[batch, query, h, d]`` from ``pattern`` ``[batch, h, query, key]``
        and ``v`` ``[batch, key, g, d]``."""
        v = expand_heads(v, pattern.shape[1])
        return torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)
