"""Hook points: identity modules that turn a tensor into something a selector can reach.

A researcher names tensors that a model computes but never stores under a name — the
residual stream between sublayers, the per-head attention output. Giving each of them an
identity module makes it a node of the tree: select ``blocks.3.resid_mid``, insert a layer
after it, and the layer sees (and may replace) exactly that tensor.

A hook point also receives ``positions``, the sequence index of each token of the call
(``0`` for the first prompt token, counting tokens already in the KV cache). It ignores
them; they are there for hooks. A forward hook on a hook point gets ``(x, positions)`` as
its ``args``, so it can restrict itself to the prompt (``positions < prompt_length``) or to
generated tokens, without any state kept on a module.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HookPoint"]


class HookPoint(nn.Module):
    """Return ``x`` unchanged; exists so that ``x`` has a path in the module tree."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pass ``x`` through. ``positions`` ([pos], sequence indices) is for hooks only."""
        return x
