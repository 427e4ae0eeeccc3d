"""Copy-on-write rewrites with structural sharing: the one primitive every rewrite uses.

:func:`rewrite` takes a frozen tree and a set of edits keyed by path. It shallow-copies the
edited nodes and their ancestors (and nothing else), hands each edited node to its edit
function, and returns the new root. Every subtree off those paths, and every parameter
tensor, is shared with the input tree, so rewriting a 70B model costs O(depth) small objects
and zero parameter bytes — which is what lets one base model serve many requests, each with
its own rewritten view.

Nested edits compose bottom-up: an edit at ``a`` sees ``a`` with its descendants' edits
already applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from torchsurgeon.surgery.errors import KeyNotFoundError, nearest_note
from torchsurgeon.surgery.frozen import frozen_at, shallow_copy, tree_parameter, wrap
from torchsurgeon.surgery.paths import child_path, iter_nodes, split

__all__ = ["Edit", "in_mode", "map_tensors", "rewrite", "set_tensors", "setting"]

Edit = Callable[[nn.Module, str], nn.Module]
"""An edit receives a private copy of the node and its path, and returns the new node."""


def rewrite(root: nn.Module, edits: Mapping[str, Edit]) -> nn.Module:
    """A new tree with each edit applied at its (exact, already resolved) path."""
    root = wrap(root)
    on_route: set[str] = set()
    for path in edits:
        parts = split(path)
        on_route.update(".".join(parts[:i]) for i in range(len(parts) + 1))

    def rebuild(node: nn.Module, path: str) -> nn.Module:
        copy = shallow_copy(node, path)
        for name, child in copy._modules.items():
            sub = child_path(path, name)
            if child is not None and sub in on_route:
                copy._modules[name] = rebuild(child, sub)
        edit = edits.get(path)
        if edit is None:
            return copy
        result = edit(copy, path)
        return frozen_at(result, path)

    return rebuild(root, "") if edits else root


def set_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Replace a *private copy*'s own parameters/buffers by name (used inside edits).

    A new value for a parameter becomes a ``Parameter`` with the old one's ``requires_grad``.
    """
    for name, value in tensors.items():
        if name in module._parameters:
            old = module._parameters[name]
            if not isinstance(value, nn.Parameter):
                value = tree_parameter(value, old.requires_grad if old is not None else False)
            module._parameters[name] = value
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            own = [*module._parameters, *module._buffers]
            raise KeyNotFoundError(
                f"{type(module).__name__} has no parameter or buffer {name!r}"
                + (nearest_note(name, own) or "; it holds none of its own")
            )


def map_tensors(
    root: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    recurse: bool = True,
) -> nn.Module:
    """A new tree with ``fn`` applied to every parameter and buffer (shared ones once).

    Modules whose tensors all come back identical (``fn(t) is t``) stay shared.
    """
    results: dict[int, torch.Tensor] = {}
    edits: dict[str, Edit] = {}
    nodes = iter_nodes(root) if recurse else iter([("", root)])
    for path, node in nodes:
        changed: dict[str, torch.Tensor] = {}
        for name, tensor in [*node._parameters.items(), *node._buffers.items()]:
            if tensor is None:
                continue
            if id(tensor) not in results:
                results[id(tensor)] = _apply_keeping_kind(fn, tensor)
            if results[id(tensor)] is not tensor:
                changed[name] = results[id(tensor)]
        if changed:
            edits[path] = setting(changed)
    return rewrite(root, edits)


def _apply_keeping_kind(
    fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        out = fn(tensor)
    if out is tensor:
        return tensor
    if isinstance(tensor, nn.Parameter):
        return tree_parameter(out, tensor.requires_grad)
    return out


def setting(changed: Mapping[str, torch.Tensor]) -> Edit:
    """An edit that sets the node's own tensors named in ``changed``."""

    def edit(node: nn.Module, path: str) -> nn.Module:
        set_tensors(node, changed)
        return node

    return edit


def in_mode(root: nn.Module, mode: bool) -> nn.Module:
    """A tree whose every module has ``training == mode`` (``.train()`` / ``.eval()``).

    Copy-on-write like :func:`rewrite`: a module whose flag differs, or below which one
    does, is shallow-copied (path, hooks and tensors kept); every other subtree is shared.
    ``root`` and every module it shares with other trees keep their flags. ``root`` itself
    comes back when nothing changes.
    """
    copies: dict[int, nn.Module] = {}

    def visit(node: nn.Module) -> nn.Module:
        found = copies.get(id(node))
        if found is not None:
            return found
        children = {n: visit(c) for n, c in node._modules.items() if c is not None}
        result = node
        if node.training != mode or any(c is not node._modules[n] for n, c in children.items()):
            result = shallow_copy(node)
            result._modules.update(children)
            result.__dict__["training"] = mode
        copies[id(node)] = result
        return result

    return visit(root)
