"""Normalisations: LayerNorm and RMSNorm (with Gemma's ``1 + weight`` scale).

Norms sit at the sites ``blocks.{i}.ln1`` / ``ln2`` (and Gemma 2's ``ln1_post`` /
``ln2_post``), ``final_norm`` and BERT's ``embed_norm``; their output is the normalised
tensor (TransformerLens' ``ln*.hook_normalized`` followed by the learned scale).

``RMSNorm`` normalises in float32 whatever the input dtype. With ``offset=0`` (Llama and
most families) it casts back and then scales by ``weight``; with ``offset=1`` (Gemma) it
scales by ``1 + weight`` in float32 and casts last — the two orders the reference
implementations use, which differ in half precision.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from torchsurgeon.layers.transformer.projection import as_parameter

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(nn.Module):
    """Subtract the mean, divide by the standard deviation, then ``* weight + bias``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
        super().__init__()
        self.weight = as_parameter(weight)
        self.bias = as_parameter(bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x``."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[0]}, eps={self.eps}"


class RMSNorm(nn.Module):
    """Divide by the root mean square, then scale by ``offset + weight``."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = as_parameter(weight)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x`` (in float32)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"d_model={self.weight.shape[0]}, eps={self.eps}{offset}"
