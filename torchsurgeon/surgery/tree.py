"""The pytree view of a model: its tensors as leaves, its structure as the tree definition.

``flatten`` lists a model's parameters and buffers (a tensor tied at two places — GPT-2's
embedding and unembedding — is one leaf); ``unflatten`` puts new leaves back, building a
new tree by copy-on-write; ``map`` is the two together, e.g. a dtype cast that returns a new
model and leaves the original in fp32. ``functional`` gives the pure-function view on top of
``torch.func.functional_call``, so ``torch.func.grad`` and ``vmap`` run over any tensor of
the model — intervention parameters included (steering strengths, patch values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import freeze_tree, tree_parameter, wrap
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.rewrite import map_tensors, rewrite, setting

__all__ = ["TreeDef", "flatten", "functional", "map", "unflatten"]


@dataclass(frozen=True)
class TreeDef:
    """Where each leaf of a flattened model lives: ``slots[i]`` lists ``(module path, name)``."""

    model: nn.Module
    slots: tuple[tuple[tuple[str, str], ...], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """One dotted name per leaf (its first place), as ``named_parameters`` spells it."""
        return tuple(f"{p}.{n}" if p else n for (p, n), *_ in self.slots)


def flatten(model: nn.Module) -> tuple[list[torch.Tensor], TreeDef]:
    """``(leaves, treedef)``: every distinct parameter and buffer, then where each one sits."""
    model = wrap(model)
    leaves: list[torch.Tensor] = []
    slots: dict[int, list[tuple[str, str]]] = {}
    for path, node in iter_nodes(model):
        for name, tensor in [*node._parameters.items(), *node._buffers.items()]:
            if tensor is None:
                continue
            if id(tensor) not in slots:
                slots[id(tensor)] = []
                leaves.append(tensor)
            slots[id(tensor)].append((path, name))
    return leaves, TreeDef(model, tuple(tuple(slots[id(t)]) for t in leaves))


def unflatten(treedef: TreeDef, leaves: list[torch.Tensor]) -> nn.Module:
    """A new model with ``leaves`` in the places ``treedef`` records (shape-checked)."""
    if len(leaves) != len(treedef.slots):
        raise ArgumentError(f"unflatten expects {len(treedef.slots)} leaves, got {len(leaves)}")
    old_leaves, _ = flatten(treedef.model)
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for old, new, places in zip(old_leaves, leaves, treedef.slots, strict=True):
        if new is old:
            continue
        if new.shape != old.shape:
            raise ArgumentError(
                f"leaf {places[0][0]}.{places[0][1]} has shape {tuple(old.shape)}, "
                f"got {tuple(new.shape)}"
            )
        if isinstance(old, nn.Parameter) and not isinstance(new, nn.Parameter):
            new = tree_parameter(new, old.requires_grad)
        for path, name in places:
            by_path.setdefault(path, {})[name] = new
    return rewrite(treedef.model, {path: setting(values) for path, values in by_path.items()})


def map(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module) -> nn.Module:
    """A new model with ``fn`` applied to every tensor; unchanged subtrees stay shared."""
    return map_tensors(wrap(model), fn)


def functional(
    model: nn.Module,
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """``(fn, params)`` with ``fn(params, *args, **kwargs)`` a pure function of ``params``.

    ``params`` holds every parameter and buffer by dotted name (intervention layers'
    tensors included). ``fn`` runs on a private structural copy of the model, so swapping
    tensors in never touches a module another tree shares.
    """
    private = freeze_tree(wrap(model), "")
    params = dict(private.named_parameters())
    params.update(private.named_buffers())

    def fn(params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(private, params, args, kwargs)

    return fn, params
