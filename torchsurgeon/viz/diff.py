"""What a rewrite changed: every node of the new tree compared with the base, by place.

A rewrite shares every untouched subtree with its base (copy-on-write), so most of the
answer is an identity check: the node at a path *is* the base's node there — shared,
unchanged, nothing below it needs a look. A node that is a new object is either a copy
made on the way to an edit below it (same class, same tensors, same settings) or a
genuine change; a path the base does not have was added; a base child missing from the new
tree was removed. Tensors are compared by identity and storage, never by value, so the
comparison costs no tensor reads and works on meta models.

The same comparison works when the base is the plain model that ``ts.wrap`` copied: the
copy shares every tensor, so each node reads as a copy and only real edits show.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import child_path

__all__ = ["Change", "TreeDiff", "diff_trees"]


class Change(str, enum.Enum):
    """How the node at one path of the new tree relates to the base's node there."""

    SHARED = "shared"
    """The very object of the base: it and everything below it are unchanged."""
    COPIED = "copied"
    """A new object equal to the base's node (a copy on the way to an edit below)."""
    CHANGED = "changed"
    """A different class, different tensors or different settings than the base's node."""
    ADDED = "added"
    """The base has no node at this path."""


@dataclass(frozen=True)
class TreeDiff:
    """The comparison of a new tree with its base.

    ``changes`` maps each visited path of the new tree to its :class:`Change`; paths below
    a ``SHARED`` or ``ADDED`` node are not listed (they inherit it). ``removed`` maps a
    parent path to the ``(name, class name)`` of base children the new tree lacks.
    """

    changes: dict[str, Change] = field(default_factory=dict)
    removed: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many nodes were added, changed, removed (the tops of added subtrees count)."""
        values = list(self.changes.values())
        return {
            "added": values.count(Change.ADDED),
            "changed": values.count(Change.CHANGED),
            "removed": sum(len(children) for children in self.removed.values()),
        }

    def is_empty(self) -> bool:
        """Whether the new tree equals the base."""
        counts = self.counts()
        return not any(counts.values())


def diff_trees(base: nn.Module, new: nn.Module) -> TreeDiff:
    """Compare ``new`` with ``base`` node by node (see the module docstring)."""
    diff = TreeDiff()
    _visit(diff, base, new, "")
    return diff


def _visit(diff: TreeDiff, base: nn.Module | None, new: nn.Module, path: str) -> None:
    if base is None:
        diff.changes[path] = Change.ADDED
        return
    if base is new:
        diff.changes[path] = Change.SHARED
        return
    diff.changes[path] = Change.COPIED if _same_node(base, new) else Change.CHANGED
    base_children = {k: v for k, v in base._modules.items() if v is not None}
    for name, child in new._modules.items():
        if child is not None:
            _visit(diff, base_children.get(name), child, child_path(path, name))
    gone = tuple(
        (name, original_class(child).__name__)
        for name, child in base_children.items()
        if new._modules.get(name) is None
    )
    if gone:
        diff.removed[path] = gone


def _same_node(base: nn.Module, new: nn.Module) -> bool:
    """Same class, same own tensors (by storage) and the same settings (``extra_repr``)."""
    if original_class(base) is not original_class(new):
        return False
    for mine, theirs in (
        (base._parameters, new._parameters),
        (base._buffers, new._buffers),
    ):
        if mine.keys() != theirs.keys():
            return False
        if not all(_same_tensor(mine[k], theirs[k]) for k in mine):
            return False
    try:
        return base.extra_repr() == new.extra_repr()
    except Exception:  # a third-party extra_repr that fails says nothing about a change
        return True


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.device.type != "meta"  # meta tensors share no storage to compare
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )
