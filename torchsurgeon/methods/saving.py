"""Run a model saving every block's residual stream, or every named site: ``ts.run_saving``.

TransformerLens users know this as ``run_with_cache``. Here it is one rewrite — a ``Save``
after each site, keyed by the site's path — and one ``ts.run``, so the result is exactly
what the hand-written plan gives::

    ts.run(ts.select(model).at("model.layers.*").insert_after(ts.layers.Save()), ids)

The sites are the blocks (their outputs: the residual stream leaving each block) of a
``transformers`` model, found in the family table, and every named site of an explicit model
from ``ts.load`` / ``ts.convert`` (``blocks.3.resid_pre``, ``blocks.3.attn.pattern``, ...;
see docs/models.md, "Site names"). ("Cache" in torchsurgeon means the KV cache of
``ts.generate``; what a run keeps is *saved*.)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Result, run
from torchsurgeon.layers.transformer import Transformer
from torchsurgeon.layers.transformer.rotary import Rotary
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers
from torchsurgeon.selectors.predicates import path as path_field
from torchsurgeon.selectors.selection import select
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import SITE_LISTS, iter_nodes, split

__all__ = ["run_saving", "saving_sites"]

Names = str | Callable[[str], bool] | None


def saving_sites(model: nn.Module, layout: ModelLayout | None = None) -> list[str]:
    """The paths :func:`run_saving` saves by default, in tree order.

    Args:
        model: a ``transformers`` model (plain or wrapped) or an explicit model.
        layout: where the blocks are, for a model outside the family table.
    """
    if issubclass(original_class(model), Transformer):
        return [p for p, node in iter_nodes(model) if p and _is_site(p, node)]
    layout = layout_of(model, layout)
    return [f"{layout.blocks}.{i}" for i in range(n_layers(model, layout))]


def _is_site(path: str, node: nn.Module) -> bool:
    """A named site of an explicit model: a module with no children of its own (inserted
    layers aside) whose output is a tensor (not the rotary ``(cos, sin)`` pair)."""
    if any(part in SITE_LISTS for part in split(path)):
        return False
    if isinstance(node, Rotary):
        return False
    return all(name in SITE_LISTS for name in node._modules)


def _matcher(names: Names) -> Callable[[str], bool]:
    if names is None:
        return lambda _: True
    if isinstance(names, str):
        return re.compile(fnmatch.translate(names)).fullmatch  # type: ignore[return-value]
    if callable(names):
        return names
    raise ArgumentTypeError(f"names= is a glob string or a function of the path, got {names!r}")


def run_saving(
    model: nn.Module,
    *args: Any,
    names: Names = None,
    layout: ModelLayout | None = None,
    **kwargs: Any,
) -> Result:
    """``ts.run(model, *args, **kwargs)`` with a ``Save`` after every site ``names`` keeps.

    Args:
        model: a ``transformers`` model (its blocks are the sites) or an explicit model from
            ``ts.load`` / ``ts.convert`` (every named site); plain or already rewritten.
        args: the model's inputs (token ids).
        names: which sites: a glob over the path (``"*.mlp.out"``; ``*`` crosses dots, as
            in ``ts.path.matches``) or a function ``path -> bool``; default every site.
        layout: where the blocks are, for a model outside the family table.
        kwargs: the rest of the call (``attention_mask=``), and ``ts.run``'s ``backend=``.

    Returns the :class:`~torchsurgeon.Result`: the output, and ``saved[path]`` for each
    site. Raises ``ValueError`` when ``names`` keeps no site.
    """
    keep = _matcher(names)
    sites = saving_sites(model, layout)
    chosen = [p for p in sites if keep(p)]
    if not chosen:
        raise ArgumentError(
            f"names={names!r} keeps none of the {len(sites)} sites of this "
            f"{original_class(model).__name__} (first: {', '.join(sites[:3])})"
        )
    probe = select(model).at_subtrees_where(path_field.isin(chosen)).insert_after(Save())
    return run(probe, *args, **kwargs)
