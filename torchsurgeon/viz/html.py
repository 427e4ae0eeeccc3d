"""A picture you can send: a standalone HTML file of a model, a selection or a rewrite.

:func:`save_html` writes one self-contained page — treescope's interactive tree (its
scripts and styles inline, uncompressed) under a short legend of the highlight colours —
that any browser opens from disk, with no server and no network. :func:`to_html`
returns the same page as a string.
"""

from __future__ import annotations

import html
import warnings
from os import PathLike
from pathlib import Path
from typing import Any

import treescope

from torchsurgeon.viz import styles
from torchsurgeon.viz.tree import default_layout
from torchsurgeon.viz.view import as_view

__all__ = ["save_html", "to_html"]

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
.ts-legend {{ font-size: 0.85em; color: #495057; margin-bottom: 1em; line-height: 2em; }}
.ts-legend span.ts-swatch {{ padding: 0 0.5em; margin-right: 0.4em; }}
.ts-legend li {{ list-style: none; display: inline-block; margin-right: 1.5em; }}
.ts-legend ul {{ padding: 0; margin: 0.3em 0; }}
</style>
</head>
<body>
<h3>{title}</h3>
<div class="ts-legend">
<ul>{legend}</ul>
Click a line to fold or unfold it; the button at the end of a node's line copies its
path for <code>.at(...)</code>.
</div>
{tree}
</body>
</html>
"""


def _page(
    obj: Any, *, diff: bool = False, title: str | None = None, fold_repeats: bool = True
) -> str:
    """The standalone page for ``obj`` (a model, a ``Selection`` or a ``(base, new)`` pair)."""
    view = as_view(obj, diff=diff, fold_repeats=fold_repeats)
    with default_layout():
        tree = treescope.render_to_html(view, compressed=False)
    legend = "".join(
        f'<li><span class="ts-swatch" style="{html.escape(style.box_css())}">'
        f"{html.escape(style.marker.removeprefix('ts-'))}</span>{html.escape(style.meaning)}</li>"
        for style in styles.LEGEND
    )
    caption = title or f"torchsurgeon: {view.caption()}"
    return _PAGE.format(title=html.escape(caption), legend=legend, tree=tree)


def save_html(
    obj: Any,
    path: str | PathLike[str],
    *,
    diff: bool = False,
    title: str | None = None,
    fold_repeats: bool = True,
) -> Path:
    """Write the standalone page for ``obj`` to ``path`` (folders made as needed)."""
    target = Path(path)
    page = _page(obj, diff=diff, title=title, fold_repeats=fold_repeats)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def to_html(
    obj: Any,
    path: str | PathLike[str] | None = None,
    *,
    diff: bool = False,
    title: str | None = None,
    fold_repeats: bool = True,
) -> str | Path:
    """The standalone page for ``obj`` as a string, like every ``to_*`` (``to_text``,
    ``Plan.to_bytes``); write a file with :func:`save_html`.

    Passing ``path`` still writes the file and returns its path, with a
    ``DeprecationWarning`` (the old meaning of ``to_html``).
    """
    if path is not None:
        warnings.warn(
            "ts.to_html(x, path) is deprecated: use ts.save_html(x, path) to write a file; "
            "ts.to_html(x) returns the page as a string",
            DeprecationWarning,
            stacklevel=2,
        )
        return save_html(obj, path, diff=diff, title=title, fold_repeats=fold_repeats)
    return _page(obj, diff=diff, title=title, fold_repeats=fold_repeats)
