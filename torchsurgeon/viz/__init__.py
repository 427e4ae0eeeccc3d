"""Pictures of module trees, selections and rewrites, drawn with treescope.

``show(x)`` draws a model, a ``Selection`` or a ``(base, rewritten)`` pair in a notebook
(text elsewhere); ``save_html(x, path)`` writes the same picture as a standalone HTML
page and ``to_html(x)`` returns it as a string;
``diff=True`` (or ``show_diff``) marks what a rewrite added, changed and removed relative
to its base. Selected nodes are outlined, inserted intervention layers drawn in violet with
their spec, and repeated blocks folded after the first.

torchsurgeon's own objects draw themselves in treescope through ``__treescope_repr__``, so
``treescope.show(selection)`` and ``treescope.render_to_html(model)`` draw the same pictures,
and importing torchsurgeon changes nothing for other treescope users (see
:mod:`torchsurgeon.viz.handlers`). :func:`install_tensor_support` is the opt-in repair of
treescope 0.1.10's rendering of plain torch tensors on torch 2.13.
"""

from torchsurgeon.viz import styles
from torchsurgeon.viz.diff import Change, TreeDiff, diff_trees
from torchsurgeon.viz.handlers import install, install_tensor_support
from torchsurgeon.viz.html import save_html, to_html
from torchsurgeon.viz.show import show, show_diff, summary, to_text
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
    "install_tensor_support",
    "save_html",
    "show",
    "show_diff",
    "styles",
    "summary",
    "to_html",
    "to_text",
]
