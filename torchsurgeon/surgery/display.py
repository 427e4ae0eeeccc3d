"""How torchsurgeon's own objects draw themselves in treescope, without a global patch.

Frozen modules, intervention layers and selections define ``__treescope_repr__`` (the
extension method treescope looks for on any object, as Penzai's classes do), so
``treescope.show(tree)`` draws the torchsurgeon picture while every other treescope user in
the process keeps treescope's own handlers. The drawing code lives in
:mod:`torchsurgeon.viz`, above this package; it plugs itself in here with
:func:`set_treescope_renderer` when imported (``import torchsurgeon`` does), so nothing down
here imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TreescopeRepr", "set_treescope_renderer", "treescope_repr"]

_renderer: Callable[[Any, Any, Any], Any] | None = None


def set_treescope_renderer(renderer: Callable[[Any, Any, Any], Any]) -> None:
    """Use ``renderer(obj, path, subtree_renderer)`` for torchsurgeon's objects."""
    global _renderer
    _renderer = renderer


def treescope_repr(obj: Any, path: Any, subtree_renderer: Any) -> Any:
    """``obj``'s treescope rendering (``NotImplemented`` before a renderer is plugged in)."""
    return NotImplemented if _renderer is None else _renderer(obj, path, subtree_renderer)


class TreescopeRepr:
    """Mixin: draw instances through the plugged-in renderer."""

    def __treescope_repr__(self, path: Any, subtree_renderer: Any) -> Any:
        return treescope_repr(self, path, subtree_renderer)
