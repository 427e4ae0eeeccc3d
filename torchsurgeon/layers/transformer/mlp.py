"""Feed-forward sublayers with their hidden activations as a site.

Two shapes cover the supported families, and both expose the same sites:

- :class:`MLP` (GPT-2, GPT-NeoX, BERT): ``up`` then ``hidden`` (the activation) then
  ``out``.
- :class:`GatedMLP` (Llama, Mistral, Qwen2, Gemma, Phi-3): ``gate`` and ``up`` in parallel,
  ``hidden = act(gate) * up``, then ``out``.

``mlp.hidden`` is always the input of ``mlp.out`` (TransformerLens ``mlp.hook_post``), so a
neuron is ``hidden[..., i]`` in every family; ``mlp.out`` is the sublayer's output
(``hook_mlp_out``). Phi-3's fused ``gate_up_proj`` becomes two views of its one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.layers.transformer.activation import Activation, GatedActivation
from torchsurgeon.layers.transformer.projection import Projection

__all__ = ["MLP", "GatedMLP"]


class MLP(nn.Module):
    """``out(act(up(x)))``."""

    def __init__(self, up: Projection, out: Projection, activation: str) -> None:
        super().__init__()
        self.up = up
        self.hidden = Activation(activation)
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension of ``x``."""
        return self.out(self.hidden(self.up(x)))


class GatedMLP(nn.Module):
    """``out(act(gate(x)) * up(x))``."""

    def __init__(self, gate: Projection, up: Projection, out: Projection, activation: str) -> None:
        super().__init__()
        self.gate = gate
        self.up = up
        self.hidden = GatedActivation(activation)
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to the last dimension of ``x``."""
        return self.out(self.hidden(self.gate(x), self.up(x)))
