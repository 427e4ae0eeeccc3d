"""Learned linear maps, built around tensors that already exist.

Conversions from a checkpoint hand over weights that live elsewhere — memory-mapped from a
safetensors file, or the parameters of an in-memory ``transformers`` model. These modules
take those tensors in their constructor and wrap them as parameters *without copying*
(``nn.Linear`` would first allocate a random weight of its own, doubling peak memory while
a large checkpoint loads).

``Projection`` is an ordinary linear map (``weight`` is ``[out, in]``, as in ``nn.Linear``).
``HeadProjection`` is the query, key or value map of attention: its weight is
``[head, d_head, d_model]``, so ``weight[h]`` is head ``h``'s map and its output is already
split into heads, ``[batch, pos, head, d_head]`` — the same layout in every family, whatever
the checkpoint fused (GPT-2's ``c_attn``, GPT-NeoX's interleaved ``query_key_value``,
Phi-3's ``qkv_proj`` are all cut into views of their one tensor).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from torchsurgeon.surgery.errors import ArgumentError

__all__ = ["HeadProjection", "Projection", "as_parameter"]


def as_parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """``tensor`` as a parameter sharing its storage (the same object if it is one already)."""
    if tensor is None or isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


class Projection(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` ``[out, in]`` given, not allocated."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ArgumentError(f"Projection weight must be [out, in], got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ArgumentError(
                f"Projection bias must be [{weight.shape[0]}], got {tuple(bias.shape)}"
            )
        self.weight = as_parameter(weight)
        self.bias = as_parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the map to the last dimension of ``x``."""
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, bias={self.bias is not None}"


class HeadProjection(nn.Module):
    """Per-head linear map: ``[batch, pos, d_model]`` to ``[batch, pos, head, d_head]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 3:
            raise ArgumentError(
                f"HeadProjection weight must be [head, d_head, d_model], got {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ArgumentError(
                f"HeadProjection bias must be {list(weight.shape[:2])}, got {list(bias.shape)}"
            )
        self.weight = as_parameter(weight)
        self.bias = as_parameter(bias)

    @property
    def n_heads(self) -> int:
        """How many heads this map produces."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` and split the result into heads."""
        n_heads, d_head, _ = self.weight.shape
        # A view whenever the checkpoint's layout allows it (every family but GPT-NeoX, whose
        # interleaved heads make this one small copy per call).
        weight = self.weight.flatten(0, 1)
        bias = self.bias.flatten() if self.bias is not None else None
        return F.linear(x, weight, bias).unflatten(-1, (n_heads, d_head))

    def extra_repr(self) -> str:
        n_heads, d_head, d_model = self.weight.shape
        return f"d_model={d_model}, heads={n_heads}, d_head={d_head}, bias={self.bias is not None}"
