"""Plugging torchsurgeon into treescope: the handlers it registers, and when.

treescope looks a value's type up (along its MRO) in public registries before falling back
to its generic handlers. :func:`install` — run when :mod:`torchsurgeon.viz` is imported —
puts these entries there:

- ``torch.Tensor`` (and so ``nn.Parameter``): :func:`~torchsurgeon.viz.tensors.render_tensor`
  and :class:`~torchsurgeon.viz.tensors.TensorAdapter`, replacing treescope 0.1.10's torch
  support, which fails on torch 2.13 (it reads ``Tensor.names``);
- ``Selection``: the selection's tree with its nodes outlined, so ``selection.show()``,
  ``treescope.show(selection)`` and ``treescope.render_to_html(selection)`` all draw it;
- frozen modules and intervention layers (torchsurgeon's own classes): the torchsurgeon
  tree, so a rewritten model shows its inserted layers however it is displayed;
- :class:`~torchsurgeon.viz.view.View`: any view, as built by ``as_view``.

Plain ``nn.Module`` trees keep treescope's own module handler (which works once tensors
do). treescope sets up its torch support lazily, on the first render after ``torch`` is
imported; :func:`install` runs that setup first, so it cannot later overwrite our entries.
"""

from __future__ import annotations

from types import NotImplementedType
from typing import Any

import torch
from torch import nn
from treescope import renderers, rendering_parts, type_registries

from torchsurgeon.layers.base import InterventionLayer
from torchsurgeon.selectors.selection import Selection
from torchsurgeon.surgery.frozen import FrozenModule
from torchsurgeon.viz.tensors import TensorAdapter, render_tensor
from torchsurgeon.viz.tree import render_view
from torchsurgeon.viz.view import View, as_view

__all__ = ["install"]

Result = rendering_parts.RenderableAndLineAnnotations


def install() -> None:
    """Register torchsurgeon's treescope handlers (idempotent; see the module docstring)."""
    type_registries.update_registries_for_imports()  # run treescope's lazy torch setup now
    handlers = type_registries.TREESCOPE_HANDLER_REGISTRY
    handlers[torch.Tensor] = render_tensor
    type_registries.NDARRAY_ADAPTER_REGISTRY[torch.Tensor] = TensorAdapter()
    handlers[FrozenModule] = _render_module
    handlers[InterventionLayer] = _render_module
    handlers[Selection] = _render_selection
    handlers[View] = _render_view


def _render_module(
    node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> Result | NotImplementedType:
    if not isinstance(node, nn.Module):
        return NotImplemented
    return render_view(as_view(node), path, subtree_renderer)


def _render_selection(
    node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> Result | NotImplementedType:
    if not isinstance(node, Selection):
        return NotImplemented
    return render_view(as_view(node), path, subtree_renderer)


def _render_view(
    node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> Result | NotImplementedType:
    if not isinstance(node, View):
        return NotImplemented
    return render_view(node, path, subtree_renderer)
