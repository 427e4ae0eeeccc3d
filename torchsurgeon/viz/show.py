"""Looking at a model where you are: a notebook cell, or a terminal.

``ts.show(x)`` draws ``x`` — a model, a ``Selection``, or a ``(base, rewritten)`` pair —
as an interactive treescope tree in a Jupyter/IPython notebook, and as indented text (the
same tree, folded the same way) anywhere else. ``show(rewritten, diff=True)`` or
``show_diff(base, rewritten)`` marks what a rewrite added, changed and removed.
"""

from __future__ import annotations

import sys
from typing import Any

import treescope
from torch import nn

from torchsurgeon.viz.tree import default_layout
from torchsurgeon.viz.view import as_view

__all__ = ["show", "show_diff", "to_text"]


def show(obj: Any, *, diff: bool = False, fold_repeats: bool = True) -> None:
    """Draw a model, a ``Selection`` or a ``(base, rewritten)`` pair.

    In a notebook the picture is interactive (click a line to fold or unfold it; the copy
    button beside a node copies its path for ``.at(...)``); elsewhere it prints as text.
    ``diff=True`` compares a model with the base its lineage records; ``fold_repeats``
    folds every block after the first in a run of same-class siblings.
    """
    view = as_view(obj, diff=diff, fold_repeats=fold_repeats)
    if _in_notebook():
        with default_layout():
            treescope.display(view)
    else:
        print(to_text(view), file=sys.stdout)


def show_diff(base: nn.Module, rewritten: nn.Module | None = None) -> None:
    """Draw ``rewritten`` marked against ``base`` (one argument: against its lineage base)."""
    show(base if rewritten is None else (base, rewritten), diff=True)


def to_text(obj: Any, *, diff: bool = False, fold_repeats: bool = True) -> str:
    """The picture as plain text (folded nodes on one line, highlights as ``◆n``/``+``/``~``)."""
    view = as_view(obj, diff=diff, fold_repeats=fold_repeats)
    with default_layout():
        return treescope.render_to_text(view)


def _in_notebook() -> bool:
    """Whether a Jupyter kernel (which can display HTML) runs this code."""
    shell_module = sys.modules.get("IPython")
    if shell_module is None:
        return False
    shell = shell_module.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
