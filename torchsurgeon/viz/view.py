"""A view: one model plus what the picture of it should point at.

Everything torchsurgeon draws is a :class:`View` — the model, the paths of a selection to
outline, and optionally a base to compare with. ``ts.show`` and ``to_html`` accept the
things a researcher has in hand (a model, a ``Selection``, a ``(base, rewritten)`` pair)
and turn them into a view with :func:`as_view`; treescope renders views through the handler
that :mod:`torchsurgeon.viz.handlers` registers, so a view can also be passed to
``treescope.show`` or placed inside any other structure treescope draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchsurgeon.selectors.selection import Selection
from torchsurgeon.surgery.display import TreescopeRepr
from torchsurgeon.surgery.errors import ArgumentTypeError
from torchsurgeon.surgery.lineage import lineage_of

__all__ = ["View", "as_view"]


@dataclass(frozen=True)
class View(TreescopeRepr):
    """What to draw: ``model``, the ``selected`` paths, and the ``base`` to diff against.

    ``selected`` is None when the picture shows no selection; an empty tuple is a selection
    that matched nothing (everything is drawn faded).

    ``fold_repeats`` folds every block after the first in a run of same-class siblings
    (``h.1`` ... ``h.31`` of a 32-block model) unless something highlighted sits inside.
    ``title`` is the comment on the root's first line (a selection's is its selector
    expression) and the heading of an HTML page.
    """

    model: nn.Module
    selected: tuple[str, ...] | None = None
    base: nn.Module | None = None
    fold_repeats: bool = True
    title: str = ""

    def caption(self) -> str:
        """The title, or the model's class name when there is none."""
        return self.title or type(self.model).__name__


def as_view(obj: Any, *, diff: bool = False, fold_repeats: bool = True) -> View:
    """The view of a model, a ``Selection``, a ``(base, rewritten)`` pair, or a view.

    With ``diff=True`` a model (or a selection's model) is compared with the base its
    lineage records (``lineage_of(model).base``); a pair always shows its diff.
    """
    if isinstance(obj, View):
        if diff and obj.base is None:
            return dataclasses.replace(obj, base=lineage_of(obj.model).base)
        return obj
    if isinstance(obj, Selection):
        return View(
            model=obj.model,
            selected=obj.paths,
            base=lineage_of(obj.model).base if diff else None,
            fold_repeats=fold_repeats,
            title=f"select({type(obj.model).__name__})" + "".join(f".{step}" for step in obj.steps),
        )
    if isinstance(obj, nn.Module):
        return View(
            model=obj,
            base=lineage_of(obj).base if diff else None,
            fold_repeats=fold_repeats,
        )
    if isinstance(obj, Sequence) and len(obj) == 2 and all(isinstance(m, nn.Module) for m in obj):
        base, rewritten = obj
        return View(model=rewritten, base=base, fold_repeats=fold_repeats)
    raise ArgumentTypeError(
        "torchsurgeon.viz draws an nn.Module, a Selection, a (base, rewritten) pair of modules "
        f"or a View; got {type(obj).__name__}"
    )
