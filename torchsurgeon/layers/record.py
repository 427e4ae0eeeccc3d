"""Layers that read: ``Save`` keeps an activation, ``SaveGrad`` keeps its gradient.

Both pass their tensor through unchanged. Inside ``ts.run`` they append what they see to
the run's results under their key (every call in order, so a ``generate`` returns one entry
per step); outside a run they keep nothing, so a rewritten model called in a loop holds no
memory. ``Save`` does not detach or copy: the saved tensor is the activation itself, with
its autograd graph, exactly what the next module received.
"""

from __future__ import annotations

import torch

from torchsurgeon.layers.base import Recorder, register_layer
from torchsurgeon.layers.run_state import run_state
from torchsurgeon.surgery.errors import SiteError

__all__ = ["Save", "SaveGrad"]


@register_layer
class Save(Recorder):
    """Record the target tensor under ``name`` (default: the site's path)."""

    type_name = "Save"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = run_state(self)
        if state is not None:
            state.store.append(x)
        return x


@register_layer
class SaveGrad(Recorder):
    """Record the gradient that flows back into the target tensor, once ``backward`` runs."""

    type_name = "SaveGrad"
    grad_site = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = run_state(self)
        if state is not None:
            if x.is_meta and not torch.is_grad_enabled():
                return x  # a structure-only check of a forward-only run
            if not x.requires_grad:
                raise SiteError(
                    f"{self._where()}the tensor does not require grad, so no gradient will "
                    "reach it. Run with gradients enabled (not under torch.no_grad) on a model "
                    "whose parameters or inputs require grad."
                )
            x.register_hook(state.store.append)
            state.sites.append(x)
        return x
