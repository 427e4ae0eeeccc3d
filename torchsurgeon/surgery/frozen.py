"""Frozen module trees: ordinary ``nn.Module`` trees that refuse structural mutation.

torchsurgeon never changes a module it was given. :func:`wrap` makes a *structural* copy of
a model — one new object per module, every parameter and buffer tensor shared — whose
modules belong to frozen subclasses of their own classes (the trick
``torch.nn.utils.parametrize`` uses to add behaviour: swap ``__class__`` for a subclass).
A frozen module is still an instance of its class, still named like it, and still runs
exactly as before; what it refuses is assigning or deleting a submodule or parameter, with
a :class:`FrozenModuleError` that names the path and the functional way to do it.

Because a frozen tree never changes shape, rewrites can share every untouched subtree with
the tree they came from (see :mod:`torchsurgeon.surgery.rewrite`), and facts derived from a
tree (which intervention layers it holds, say) can be cached against it.

Device and dtype moves (``.to``, ``.cuda``, ``.half``, ...) are functional on a frozen tree:
they return a new tree and leave the original where it was, so write ``model =
model.to("cuda")``. Training-mode flags (``.train()``/``.eval()``) are ordinary attributes
and are shared with every tree that shares the module.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchsurgeon.surgery.errors import FrozenModuleError
from torchsurgeon.surgery.paths import child_path, describe

__all__ = [
    "FrozenModule",
    "freeze_tree",
    "frozen_at",
    "frozen_class",
    "is_frozen",
    "original_class",
    "recorded_path",
    "shallow_copy",
    "wrap",
]

_PATH_ATTR = "_ts_path"
_SEALED_ATTR = "_ts_sealed"
_FROZEN_CLASSES: dict[type, type] = {}
_COPIED_CONTAINERS = (dict, OrderedDict, set, list)


class FrozenModule:
    """Mixin placed first in the MRO of every frozen class; see the module docstring."""

    _ts_frozen = True

    def _ts_is_sealed(self) -> bool:
        # Objects a frozen class builds through its own __init__ (``ModuleList[1:]`` makes a
        # new list of the same class) are new values under construction, not tree nodes.
        return self.__dict__.get(_SEALED_ATTR, False)

    def _ts_refuse(self, what: str, name: str, how: str) -> FrozenModuleError:
        where = child_path(recorded_path(self), name)
        return FrozenModuleError(
            f"cannot {what} {describe(where)} of frozen {type(self).__name__}: torchsurgeon "
            f"trees are immutable and shared with the models they came from. {how}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        modules = self.__dict__.get("_modules", {})
        params = self.__dict__.get("_parameters", {})
        if not self._ts_is_sealed():
            super().__setattr__(name, value)
            return
        if isinstance(value, nn.Parameter) or name in params:
            raise self._ts_refuse(
                "assign",
                name,
                "Build a model with new tensors instead: ts.tree.map(fn, model), or "
                "treedef + leaves -> ts.tree.unflatten(treedef, leaves).",
            )
        if isinstance(value, nn.Module) or name in modules:
            raise self._ts_refuse(
                "assign",
                name,
                f"Build a new model instead: ts.select(model).at({name!r}).replace(new_module)"
                " (paths are relative to the selection).",
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        structural = {*self.__dict__.get("_modules", {}), *self.__dict__.get("_parameters", {})}
        if self._ts_is_sealed() and name in structural:
            raise self._ts_refuse(
                "delete", name, "Build a new model instead: ts.select(model).at(...).replace()."
            )
        super().__delattr__(name)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if not self._ts_is_sealed():
            return super().add_module(name, module)  # type: ignore[misc]
        raise self._ts_refuse("add submodule", name, "Use ts.select(...).replace(...).")

    def register_module(self, name: str, module: nn.Module | None) -> None:
        if not self._ts_is_sealed():
            return super().register_module(name, module)  # type: ignore[misc]
        raise self._ts_refuse("register submodule", name, "Use ts.select(...).replace(...).")

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if not self._ts_is_sealed():
            return super().register_parameter(name, param)  # type: ignore[misc]
        raise self._ts_refuse("register parameter", name, "Use ts.tree.map or ts.tree.unflatten.")

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise FrozenModuleError(
            "load_state_dict would write into parameters shared with other models. Build a new "
            "model instead: ts.tree.unflatten(treedef, tensors), or load the weights into the "
            "plain model before ts.wrap."
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        from torchsurgeon.surgery.rewrite import map_tensors  # same layer: rewrite needs us too

        return map_tensors(self, fn, recurse=recurse)  # type: ignore[arg-type]


def frozen_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The frozen subclass of ``cls`` (made once per class, then cached)."""
    if issubclass(cls, FrozenModule):
        return cls
    frozen = _FROZEN_CLASSES.get(cls)
    if frozen is None:
        frozen = type(
            cls.__name__,
            (FrozenModule, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
        _FROZEN_CLASSES[cls] = frozen
    return frozen


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a node of a frozen tree."""
    return isinstance(module, FrozenModule)


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class a frozen module was made from (the class itself for a plain module)."""
    cls = type(module)
    if issubclass(cls, FrozenModule):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, FrozenModule))
    return cls


def shallow_copy(module: nn.Module, path: str | None = None) -> nn.Module:
    """A new module object of the same (frozen) class sharing children and tensors.

    The per-module containers (``_modules``, ``_parameters``, hook dicts, ...) are copied,
    so changing the copy's children or hooks never reaches the original.
    """
    copy = object.__new__(frozen_class(type(module)))
    state = {
        key: (type(value)(value) if type(value) in _COPIED_CONTAINERS else value)
        for key, value in module.__dict__.items()
    }
    state[_SEALED_ATTR] = True
    if path is not None:
        state[_PATH_ATTR] = path
    object.__setattr__(copy, "__dict__", state)
    return copy


def wrap(module: nn.Module) -> nn.Module:
    """A frozen tree with ``module``'s structure, sharing every parameter and buffer.

    ``module`` itself is left exactly as it was. Wrapping a frozen tree returns it as is.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"ts.wrap expects an nn.Module, got {type(module).__name__}")
    return module if is_frozen(module) else freeze_tree(module, "")


def frozen_at(module: nn.Module, path: str) -> nn.Module:
    """``module`` as a frozen subtree sitting at ``path``: as is when it already is one.

    A node records its path for error messages; a frozen module moved by a rewrite (a
    ``replace`` with a node of another tree, siblings renumbered by ``remove_from_parent``)
    records an old one, so such a subtree is re-frozen (new module objects, same tensors).
    """
    # Every frozen subtree is built with consistent paths, so a node and its children
    # recording theirs means the whole subtree does: no walk below the children.
    children = module._modules.items()
    if (
        is_frozen(module)
        and recorded_path(module) == path
        and all(c is None or recorded_path(c) == child_path(path, n) for n, c in children)
    ):
        return module
    return freeze_tree(module, path)


def recorded_path(module: nn.Module) -> str:
    """The path a frozen node records for its messages (``""`` for a root or a plain module)."""
    return module.__dict__.get(_PATH_ATTR, "")


def freeze_tree(module: nn.Module, path: str) -> nn.Module:
    """Frozen structural copy of ``module`` as it will sit at ``path`` of some tree."""
    copies: dict[int, nn.Module] = {}

    def freeze(node: nn.Module, path: str) -> nn.Module:
        if id(node) in copies:
            return copies[id(node)]
        copy = shallow_copy(node, path)
        copies[id(node)] = copy
        children = copy._modules
        for name, child in list(children.items()):
            if child is not None:
                children[name] = freeze(child, child_path(path, name))
        return copy

    return freeze(module, path)
