"""Activation functions as modules, so an MLP's hidden activations are a site.

``Activation`` applies one named nonlinearity; in a plain MLP it is the ``mlp.hidden`` site
(TransformerLens' ``mlp.hook_post``). ``GatedActivation`` is the gated MLPs' ``act(gate) *
up`` (SwiGLU, GeGLU); its output is the ``mlp.hidden`` site of those families.

The names are the ones ``transformers`` configs use (``hidden_act``,
``activation_function``), so a conversion passes them through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from torchsurgeon.surgery.errors import ArgumentError, closest

__all__ = ["ACTIVATIONS", "Activation", "GatedActivation"]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
"""Every activation name this library knows, by its ``transformers`` config spelling."""


def _function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    found = ACTIVATIONS.get(name)
    if found is None:
        near = closest(str(name), ACTIVATIONS, n=1)
        raise ArgumentError(
            f"activation: unknown name {name!r}; did you mean {near[0]!r}? Known: "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    return found


class Activation(nn.Module):
    """Apply the activation called ``name`` (e.g. ``"gelu_new"``, ``"silu"``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = _function(name)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(x)``."""
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class GatedActivation(nn.Module):
    """``act(gate) * up``: the hidden activations of a gated MLP."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = _function(name)
        self.name = name

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Gate ``up`` by ``act(gate)``."""
        return self.fn(gate) * up

    def extra_repr(self) -> str:
        return self.name
