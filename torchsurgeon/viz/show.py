"""Looking at a model where you are: a notebook cell, or a terminal.

``ts.show(x)`` draws ``x`` — a model, a ``Selection``, or a ``(base, rewritten)`` pair —
as an interactive treescope tree in a Jupyter/IPython notebook, and as indented text (the
same tree, folded the same way) anywhere else. ``show(rewritten, diff=True)`` or
``show_diff(base, rewritten)`` marks what a rewrite added, changed and removed. A one-line
:func:`summary` (parameters, bytes, dtypes, devices, inserted layers) comes first, so the
size and placement of a model are read before its tree.
"""

from __future__ import annotations

import sys
from typing import Any

import treescope
from torch import nn

from torchsurgeon.surgery.paths import SITE_LISTS, iter_nodes, split
from torchsurgeon.viz.tree import default_layout
from torchsurgeon.viz.view import as_view

__all__ = ["show", "show_diff", "summary", "to_text"]


def show(obj: Any, *, diff: bool = False, fold_repeats: bool = True) -> None:
    """Draw a model, a ``Selection`` or a ``(base, rewritten)`` pair.

    In a notebook the picture is interactive (click a line to fold or unfold it; the copy
    button beside a node copies its path for ``.at(...)``); elsewhere it prints as text.
    ``diff=True`` compares a model with the base its lineage records; ``fold_repeats``
    folds every block after the first in a run of same-class siblings.
    """
    view = as_view(obj, diff=diff, fold_repeats=fold_repeats)
    print(summary(view), file=sys.stdout)
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


def summary(obj: Any) -> str:
    """One line about the model ``obj`` draws: class, parameters, bytes, dtypes, devices and
    inserted layers (``Sequential: 23 parameters (92 B), float32, cpu, 2 inserted layers``).

    A parameter reached at two places (tied weights) counts once.
    """
    model = as_view(obj).model
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    dtypes = _distinct(str(p.dtype).removeprefix("torch.") for p in params)
    devices = _distinct(str(p.device) for p in params)
    inserted = sum(1 for path, _ in iter_nodes(model) if _is_inserted(path))
    parts = [
        f"{type(model).__name__}: {_number(count)} parameter{'s' if count != 1 else ''} "
        f"({_bytes(size)})",
        "/".join(dtypes) or "no dtype",
        "/".join(devices) or "no device",
        f"{inserted} inserted layer{'s' if inserted != 1 else ''}",
    ]
    return ", ".join(parts)


def _distinct(values: Any) -> list[str]:
    return list(dict.fromkeys(values))


def _is_inserted(path: str) -> bool:
    parts = split(path)
    return len(parts) >= 2 and parts[-2] in SITE_LISTS


def _number(n: int) -> str:
    """``950``, ``12.3k``, ``124M``, ``7.24B``: three significant digits."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _bytes(n: int) -> str:
    """``92 B``, ``1.5 KiB``, ``249 MiB``, ``13.5 GiB``."""
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.3g} {suffix}"
    return f"{n} B"


def _in_notebook() -> bool:
    """Whether a Jupyter kernel (which can display HTML) runs this code."""
    shell_module = sys.modules.get("IPython")
    if shell_module is None:
        return False
    shell = shell_module.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
