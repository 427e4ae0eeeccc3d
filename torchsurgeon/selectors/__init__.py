"""Selector expressions: choose nodes of a frozen tree, then rewrite them functionally."""

from torchsurgeon.selectors.expression import SelectorStep
from torchsurgeon.selectors.predicates import (
    Predicate,
    attr,
    instance_of,
    layer_index,
    path,
)
from torchsurgeon.selectors.selection import Selection, replay, select

__all__ = [
    "Predicate",
    "Selection",
    "SelectorStep",
    "attr",
    "instance_of",
    "layer_index",
    "path",
    "replay",
    "select",
]
