"""Pictures of module trees, selections and rewrites, drawn with treescope.

``show(x)`` draws a model, a ``Selection`` or a ``(base, rewritten)`` pair in a notebook
(text elsewhere); ``to_html(x, path)`` writes the same picture as a standalone HTML page;
``diff=True`` (or ``show_diff``) marks what a rewrite added, changed and removed relative
to its base. Selected nodes are outlined, inserted intervention layers drawn in violet with
their spec, and repeated blocks folded after the first.

Importing this package registers torchsurgeon's treescope handlers (see
:mod:`torchsurgeon.viz.handlers`), which also repairs treescope 0.1.10's rendering of torch
tensors on torch 2.13; after that ``treescope.show(selection)`` and
``treescope.render_to_html(model)`` draw the same pictures.
"""

from torchsurgeon.viz import styles
from torchsurgeon.viz.diff import Change, TreeDiff, diff_trees
from torchsurgeon.viz.handlers import install
from torchsurgeon.viz.html import render_html, to_html
from torchsurgeon.viz.show import show, show_diff, to_text
from torchsurgeon.viz.tensors import describe_tensor
from torchsurgeon.viz.view import View, as_view

install()

__all__ = [
    "Change",
    "TreeDiff",
    "View",
    "as_view",
    "describe_tensor",
    "diff_trees",
    "install",
    "render_html",
    "show",
    "show_diff",
    "styles",
    "to_html",
    "to_text",
]
