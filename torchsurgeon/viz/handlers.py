"""Plugging torchsurgeon into treescope, and the one opt-in global change.

torchsurgeon's own classes — frozen modules, intervention layers, selections and views —
define ``__treescope_repr__`` (see :mod:`torchsurgeon.surgery.display`); :func:`install`,
run when :mod:`torchsurgeon.viz` is imported, plugs the drawing code of this package into
that method. Nothing in treescope's global registries changes, so every other treescope
user in the process keeps treescope's own handlers; ``treescope.show(tree)``,
``treescope.show(selection)`` and ``treescope.render_to_html(model)`` still draw the
torchsurgeon pictures. Inside those pictures tensors are drawn by torchsurgeon's own tensor
renderer (:mod:`torchsurgeon.viz.tensors`), whatever treescope would do with them.

treescope 0.1.10's torch support fails on torch 2.13 for *plain* tensors and modules (it
reads ``Tensor.names``). :func:`install_tensor_support` is the opt-in repair: it registers
torchsurgeon's tensor handler and array adapter for ``torch.Tensor`` in treescope's global
registries, for every treescope user in the process.
"""

from __future__ import annotations

from types import NotImplementedType
from typing import Any

import torch
from torch import nn
from treescope import renderers, rendering_parts, type_registries

from torchsurgeon.selectors.selection import Selection
from torchsurgeon.surgery.display import set_treescope_renderer
from torchsurgeon.viz.tensors import TensorAdapter, render_tensor
from torchsurgeon.viz.tree import render_view
from torchsurgeon.viz.view import View, as_view

__all__ = ["install", "install_tensor_support"]

Result = rendering_parts.RenderableAndLineAnnotations


def install() -> None:
    """Draw torchsurgeon's objects with this package (idempotent; no global registry change)."""
    set_treescope_renderer(_render)


def install_tensor_support() -> None:
    """Opt in: render every ``torch.Tensor`` in treescope with torchsurgeon's handler.

    A global change for the whole process (treescope's registry), which repairs treescope
    0.1.10 on torch 2.13 for plain tensors and plain ``nn.Module`` trees.
    """
    type_registries.update_registries_for_imports()  # treescope's lazy torch setup first
    type_registries.TREESCOPE_HANDLER_REGISTRY[torch.Tensor] = render_tensor
    type_registries.NDARRAY_ADAPTER_REGISTRY[torch.Tensor] = TensorAdapter()


def _render(
    node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> Result | NotImplementedType:
    if isinstance(node, View):
        return render_view(node, path, subtree_renderer)
    if isinstance(node, (nn.Module, Selection)):
        return render_view(as_view(node), path, subtree_renderer)
    return NotImplemented
