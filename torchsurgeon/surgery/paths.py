"""Dotted paths: how torchsurgeon names a node of a module tree.

A path is the dotted attribute chain from the root, exactly as ``named_modules`` spells it
(``model.layers.12.mlp.down_proj``); the root itself is the empty path ``""``. Paths are
plain strings so that they travel in plans unchanged. This module walks trees by path,
lists every path (shared submodules appear once per place they sit, unlike
``named_modules``), and builds the "did you mean" part of error messages.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from torchsurgeon.surgery.errors import PathError, closest

__all__ = [
    "SITE_LISTS",
    "child_path",
    "describe",
    "get_at",
    "iter_nodes",
    "join",
    "layer_index_of",
    "nearest_paths",
    "split",
]

SITE_LISTS = ("ts_before", "ts_after")
"""The child lists that hold intervention layers inserted at a node (see ``sites``)."""


def split(path: str) -> list[str]:
    """``"a.b.0"`` -> ``["a", "b", "0"]``; the root path ``""`` -> ``[]``."""
    return path.split(".") if path else []


def join(*parts: str | int) -> str:
    """Join path segments, skipping empty ones: ``join("", "a", 0) == "a.0"``."""
    return ".".join(str(p) for p in parts if str(p) != "")


def layer_index_of(path: str) -> int | None:
    """The index of the block a path sits in: its last integer segment (``12`` in
    ``model.layers.12.mlp``), not counting positions inside intervention-layer lists."""
    segments = split(path)
    for i in range(len(segments) - 1, -1, -1):
        if segments[i].lstrip("-").isdigit() and (i == 0 or segments[i - 1] not in SITE_LISTS):
            return int(segments[i])
    return None


def child_path(parent: str, name: str) -> str:
    """The path of child ``name`` of the node at ``parent``."""
    return f"{parent}.{name}" if parent else name


def describe(path: str) -> str:
    """A path as it reads in a message: ``'a.b'`` or ``<root>``."""
    return repr(path) if path else "<root>"


def iter_nodes(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every ``(path, module)`` below and including ``root``, in pre-order.

    A module shared at two places is yielded at both: a rewrite addresses places, not objects.
    """
    yield prefix, root
    for name, child in root._modules.items():
        if child is not None:
            yield from iter_nodes(child, child_path(prefix, name))


def nearest_paths(root: nn.Module, wanted: str, n: int = 3) -> list[str]:
    """The ``n`` paths of ``root``'s tree that look most like ``wanted``."""
    return closest(wanted, (p for p, _ in iter_nodes(root) if p), n=n)


def resolve_segment(node: nn.Module, segment: str) -> str | None:
    """The child name that ``segment`` means in ``node``, or None.

    Integer segments index sequences (``-1`` is the last layer of a ``ModuleList``).
    """
    if segment in node._modules and node._modules[segment] is not None:
        return segment
    if isinstance(node, (nn.ModuleList, nn.Sequential)):
        try:
            position = int(segment)
        except ValueError:
            return None
        names = list(node._modules)
        if -len(names) <= position < len(names):
            return names[position]
    return None


def get_at(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path``; a :class:`PathError` naming the nearest valid paths if none."""
    node, walked = root, ""
    for segment in split(path):
        name = resolve_segment(node, segment)
        if name is None:
            children = ", ".join(node._modules) or "(none)"
            guesses = nearest_paths(root, path)
            raise PathError(
                f"no module at path {path!r}: {describe(walked)} ({type(node).__name__}) has no "
                f"child {segment!r}. Its children: {children}. Nearest valid paths: "
                + ", ".join(repr(g) for g in guesses)
            )
        node, walked = node._modules[name], child_path(walked, name)
    return node
