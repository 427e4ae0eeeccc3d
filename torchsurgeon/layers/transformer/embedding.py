"""Embeddings: token ids (and learned positions) into the residual stream.

``TokenEmbedding`` looks token ids up in a ``[vocab, d_model]`` table; its output is the
``embed`` site (TransformerLens' ``hook_embed``). Gemma multiplies embeddings by
``sqrt(d_model)``, rounded to the weights' dtype as its reference implementation does; that
factor is ``scale`` here and is part of the ``embed`` output.

``PositionEmbedding`` is a learned table indexed by position ids (GPT-2, BERT); its output
is the ``pos_embed`` site. BERT's token-type table is a ``TokenEmbedding`` indexed by
token-type ids. Rotary position embeddings act inside attention instead; see
:mod:`torchsurgeon.layers.transformer.rotary`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from torchsurgeon.layers.transformer.projection import as_parameter
from torchsurgeon.surgery.errors import ArgumentError, OutOfRangeError

__all__ = ["PositionEmbedding", "TokenEmbedding"]


def _checkable(ids: torch.Tensor) -> bool:
    # Range checks cost a device sync on an accelerator and a graph break under
    # torch.compile, so they run eagerly on CPU only (where they are free).
    return ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling()


class TokenEmbedding(nn.Module):
    """``weight[ids] * scale`` for a ``[vocab, d_model]`` table ``weight``."""

    def __init__(self, weight: torch.Tensor, scale: float | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ArgumentError(
                f"TokenEmbedding weight: the table must be [vocab, d_model], got "
                f"{tuple(weight.shape)}"
            )
        self.weight = as_parameter(weight)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``ids`` ([batch, pos]) as [batch, pos, d_model]."""
        vocab = self.weight.shape[0]
        if _checkable(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise OutOfRangeError(
                f"input_ids: token ids must lie in [0, {vocab}) (the vocabulary); got values "
                f"from {int(ids.min())} to {int(ids.max())}"
            )
        out = F.embedding(ids, self.weight)
        if self.scale is not None:
            out = out * torch.tensor(self.scale, dtype=out.dtype)
        return out

    def extra_repr(self) -> str:
        vocab, d_model = self.weight.shape
        scale = f", scale={self.scale:.4g}" if self.scale is not None else ""
        return f"vocab={vocab}, d_model={d_model}{scale}"


class PositionEmbedding(nn.Module):
    """A learned ``[max_positions, d_model]`` table indexed by position ids."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ArgumentError(
                "PositionEmbedding weight: the position table must be [max_positions, d_model], "
                f"got {tuple(weight.shape)}"
            )
        self.weight = as_parameter(weight)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``position_ids`` ([batch, pos]) as [batch, pos, d_model]."""
        limit = self.weight.shape[0]
        if _checkable(position_ids) and position_ids.max() >= limit:
            raise OutOfRangeError(
                f"position_ids: position {int(position_ids.max())} is past the {limit} learned "
                "positions of this model; shorten the input"
            )
        return F.embedding(position_ids, self.weight)

    def extra_repr(self) -> str:
        limit, d_model = self.weight.shape
        return f"max_positions={limit}, d_model={d_model}"
