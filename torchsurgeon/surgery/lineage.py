"""Lineage: the record of how a rewritten tree was made from its base.

Every rewrite leaves on its new root the base it started from and the ordered steps that
led from there (which selection, which operation, what was inserted). That record is what
turns a model built interactively into a *plan* — data that replays the same rewrite on
another copy of the base, locally or on a remote host. Surgery only keeps the record; it
does not interpret the steps (selectors and layers know what they mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Lineage", "RewriteStep", "lineage_of", "with_lineage"]

_LINEAGE_ATTR = "_ts_lineage"


@dataclass(frozen=True)
class RewriteStep:
    """One rewrite: the selector expression, the operation, and its payload.

    ``selection`` is the tuple of selector steps that produced the selection; ``payload`` is
    what the operation received (a layer, a module, a function, or None).
    """

    selection: tuple[Any, ...]
    operation: str
    payload: Any


@dataclass(frozen=True)
class Lineage:
    """The base a tree was rewritten from, and the steps taken since."""

    base: nn.Module
    steps: tuple[RewriteStep, ...]


def lineage_of(model: nn.Module) -> Lineage:
    """The lineage of ``model``: its recorded base and steps, or itself with no steps."""
    found = model.__dict__.get(_LINEAGE_ATTR)
    return found if found is not None else Lineage(base=model, steps=())


def with_lineage(model: nn.Module, lineage: Lineage) -> nn.Module:
    """Record ``lineage`` on a freshly made root (never on a tree someone else holds)."""
    model.__dict__[_LINEAGE_ATTR] = lineage
    return model
