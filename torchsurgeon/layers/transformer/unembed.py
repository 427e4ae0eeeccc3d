"""From the final residual stream to logits: unembedding, soft-capping, BERT's MLM head.

:class:`Unembedding` is the ``unembed`` site; its output is the model's logits (the model
returns them as they are). Gemma 2 soft-caps final logits, ``cap * tanh(logits / cap)``;
that is part of ``unembed``. For tied families (GPT-2, Gemma, BERT, ...) the weight is the
embedding table itself — the same parameter object as ``embed.weight``.

BERT's masked-language-model head first applies a dense layer and an activation
(:class:`HeadTransform`, the ``head`` site) and a LayerNorm (``final_norm``) before the
tied, biased unembedding. A BERT base model (``BertModel``) has no such head; its
:class:`Pooler` (``tanh(dense(x[:, 0]))``, the ``pooler`` site) reads the first token's
final state instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from torchsurgeon.layers.transformer.activation import Activation
from torchsurgeon.layers.transformer.projection import Projection, as_parameter

__all__ = ["HeadTransform", "Pooler", "Unembedding"]


class Unembedding(nn.Module):
    """``x @ weight.T + bias`` with ``weight`` ``[vocab, d_model]``, optionally soft-capped."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.weight = as_parameter(weight)
        self.bias = as_parameter(bias)
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` for the residual stream ``x``."""
        logits = F.linear(x, self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def extra_repr(self) -> str:
        vocab, d_model = self.weight.shape
        softcap = f", softcap={self.softcap}" if self.softcap is not None else ""
        return f"d_model={d_model}, vocab={vocab}, bias={self.bias is not None}{softcap}"


class HeadTransform(nn.Module):
    """``act(proj(x))``: the dense layer of BERT's prediction head."""

    def __init__(self, proj: Projection, activation: str) -> None:
        super().__init__()
        self.proj = proj
        self.act = Activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the final residual stream before the last norm."""
        return self.act(self.proj(x))


class Pooler(nn.Module):
    """``tanh(proj(x[:, 0]))``: BERT's pooler, a dense layer on the first token's state."""

    def __init__(self, proj: Projection) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, d_model]`` from the final residual stream ``[batch, pos, d_model]``."""
        return torch.tanh(self.proj(x[:, 0]))
