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

Strictness is by allow-list, as in Equinox: a frozen node refuses *every* attribute write
and delete from outside — submodules, parameters, buffers, plain attributes such as ``eps``,
the training flag. The one writer allowed is the module's own code, updating caches its
class keeps (transformers' rotary embeddings store recomputed frequencies during
``forward``). Device and dtype moves (``.to``, ``.cuda``, ``.half``, ...) and mode switches
(``.train()``, ``.eval()``) are functional on a frozen tree: they return a new tree and
leave the original as it was, so write ``model = model.to("cuda")`` or ``model =
model.eval()``; one whose new tree is dropped (a bare ``model.eval()`` statement) warns with
a :class:`DiscardedMoveWarning`. A mode switch copies only the modules whose flag changes
(and their ancestors), so a rewrite put in eval mode never flips a module it shares with
its base.

What is shared, and what is not:

- **Tensor storage** is shared with the wrapped model and between trees (no bytes copied).
- **Parameter objects** are the tree's own: :func:`wrap` puts a new ``nn.Parameter`` over
  the same storage in every place (ties kept), with the original's ``requires_grad``, so
  nothing done to a tree reaches the user's ``Parameter`` objects.
- **Gradients.** A frozen tree's weights never collect ``.grad``: a backward pass through a
  tree computes gradients for activations (``SaveGrad``), inputs and intervention tensors,
  and drops what autograd would accumulate into the shared weights (the first time, with a
  :class:`SharedWeightGradientWarning`), so one experiment's gradients never land on the
  user's model or on another tree. Weight gradients are a value, not a side effect:
  ``torch.autograd.grad(loss, params)`` (which accumulates nothing) or
  ``torch.func.grad`` over ``ts.functional(model)``.
- **Pickling** (``pickle``, ``copy.deepcopy``, ``torch.save``) keeps a tree frozen: it is
  rebuilt on load as the same frozen classes, refusing the same writes.
"""

from __future__ import annotations

import bisect
import dis
import functools
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchsurgeon.surgery.display import TreescopeRepr
from torchsurgeon.surgery.errors import ArgumentTypeError, FrozenModuleError
from torchsurgeon.surgery.paths import child_path, describe

__all__ = [
    "WRITABLE_ATTRIBUTES",
    "DiscardedMoveWarning",
    "FrozenModule",
    "SharedWeightGradientWarning",
    "freeze_tree",
    "frozen_at",
    "frozen_class",
    "is_frozen",
    "original_class",
    "recorded_path",
    "shallow_copy",
    "tree_parameter",
    "wrap",
]

_PATH_ATTR = "_ts_path"
_SEALED_ATTR = "_ts_sealed"
_FROZEN_CLASSES: dict[type, type] = {}
_COPIED_CONTAINERS = (dict, OrderedDict, set, list)
WRITABLE_ATTRIBUTES = frozenset({"_is_torch_compile"})
"""The only attribute a frozen node lets anyone assign: the marker ``torch.compile(model)``
sets on the module it wraps (the training flag is switched functionally: ``.eval()``)."""
_warned_about_grads = False


class SharedWeightGradientWarning(UserWarning):
    """A backward pass reached a frozen tree's shared weights; their ``.grad`` is not kept."""


class DiscardedMoveWarning(UserWarning):
    """A device/dtype move or mode switch of a frozen tree whose new tree was dropped:
    nothing changed."""


def _dropped(frame: types.FrameType | None) -> bool:
    """Whether the call ``frame`` is making throws its result away (a bare statement)."""
    if frame is None:
        return False
    offsets, names = _instructions(frame.f_code)
    after = bisect.bisect_right(offsets, frame.f_lasti)  # f_lasti may sit in the call's caches
    return after < len(names) and names[after] == "POP_TOP"


@functools.lru_cache(maxsize=64)
def _instructions(code: types.CodeType) -> tuple[list[int], list[str]]:
    ops = list(dis.get_instructions(code))
    return [op.offset for op in ops], [op.opname for op in ops]


def _returns_a_new_tree(name: str) -> Callable[..., Any]:
    """``nn.Module.<name>`` (a device/dtype move) that warns when its new tree is dropped."""

    def move(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        moved = getattr(super(FrozenModule, self), name)(*args, **kwargs)
        if moved is not self and _dropped(sys._getframe(1)):
            warnings.warn(
                f"{name}() on a torchsurgeon tree returns a new tree and leaves this one "
                f"unchanged; the new tree was dropped. Write model = model.{name}(...).",
                DiscardedMoveWarning,
                stacklevel=2,
            )
        return moved

    move.__name__ = move.__qualname__ = name
    move.__doc__ = f"``{name}`` as a new tree; this one is left unchanged (see ``ts.wrap``)."
    return move


_MOVES = ("to", "cuda", "cpu", "xpu", "half", "float", "double", "bfloat16", "type", "to_empty")


def _switched(module: nn.Module, mode: bool, caller: types.FrameType | None) -> nn.Module:
    """``module``'s tree in training mode ``mode`` (see :func:`~.rewrite.in_mode`)."""
    from torchsurgeon.surgery.rewrite import in_mode  # same layer: rewrite needs us too

    if not isinstance(mode, bool):
        raise ArgumentTypeError(f"train(mode): mode is a bool, got {type(mode).__name__}")
    switched = in_mode(module, mode)
    if switched is not module and _dropped(caller):
        call = "train()" if mode else "eval()"
        warnings.warn(
            f"{call} on a torchsurgeon tree returns a new tree in that mode and leaves this one "
            f"(and every tree sharing its modules) unchanged; the new tree was dropped. Write "
            f"model = model.{call}.",
            DiscardedMoveWarning,
            stacklevel=3,
        )
    return switched


class FrozenModule(TreescopeRepr):
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
        if name in WRITABLE_ATTRIBUTES or not self._ts_is_sealed() or _a_cache(self, name, value):
            super().__setattr__(name, value)
            return
        if name == "training" and value is self.__dict__.get(name):
            return  # a no-op write (torch.compile's wrapper copies the flag it read)
        raise self._ts_refuse("assign", name, _functional_way(self, name, value))

    def __delattr__(self, name: str) -> None:
        if not self._ts_is_sealed() or _a_cache(self, name, None):
            super().__delattr__(name)
            return
        raise self._ts_refuse("delete", name, _functional_way(self, name, None))

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

    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if not self._ts_is_sealed() or _own_code(self):
            return super().register_buffer(name, tensor, persistent)  # type: ignore[misc]
        raise self._ts_refuse("register buffer", name, "Use ts.tree.map or ts.tree.unflatten.")

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise FrozenModuleError(
            "load_state_dict would write into parameters shared with other models. Build a new "
            "model instead: ts.tree.unflatten(treedef, tensors), or load the weights into the "
            "plain model before ts.wrap."
        )

    def train(self, mode: bool = True) -> nn.Module:
        """This tree in training mode ``mode``, as a new tree (modules whose flag changes are
        copied, the rest shared); this one is left unchanged: ``model = model.train()``."""
        return _switched(self, mode, sys._getframe(1))  # type: ignore[arg-type]

    def eval(self) -> nn.Module:
        """This tree in eval mode, as a new tree; this one is left unchanged: ``model =
        model.eval()``."""
        return _switched(self, False, sys._getframe(1))  # type: ignore[arg-type]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        from torchsurgeon.surgery.rewrite import map_tensors  # same layer: rewrite needs us too

        return map_tensors(self, fn, recurse=recurse)  # type: ignore[arg-type]

    # -- pickling: a frozen tree is rebuilt frozen (the frozen class itself is not importable
    # by name: it carries the original class's qualname so that reprs read naturally).

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_new_frozen, (original_class(self),), dict(self.__dict__))  # type: ignore[arg-type]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for param in self._parameters.values():  # type: ignore[attr-defined]
            if param is not None:
                _drop_grads_of(param)


for _move in _MOVES:
    setattr(FrozenModule, _move, _returns_a_new_tree(_move))


def _a_cache(module: nn.Module, name: str, value: Any) -> bool:
    """Whether this write is the module's own code updating a cache (see :func:`_own_code`)."""
    structural = isinstance(value, (nn.Module, nn.Parameter))
    structural = structural or name in module._modules or name in module._parameters
    return not structural and _own_code(module, depth=3)


def _own_code(module: nn.Module, depth: int = 2) -> bool:
    """Whether the write being refused comes from ``module``'s own code (the frame that
    called ``__setattr__`` / ``register_buffer`` has it as ``self``). Only caches qualify:
    submodules and parameters are refused whoever writes them (``ModuleList.__setitem__``
    is the module's own code too).

    A module may keep caches of its own — transformers' rotary embeddings recompute and
    store their frequencies during ``forward`` (longrope's ``long_inv_freq``, dynamic
    scaling's ``inv_freq``) — and refusing those would break the model's own forward. Writes
    from anywhere else (a user's ``m.eps = ...``, another library) are refused.
    """
    return sys._getframe(depth).f_locals.get("self") is module


def _new_frozen(cls: type[nn.Module]) -> nn.Module:
    """An empty frozen ``cls`` for pickle to fill in (its state follows)."""
    return object.__new__(frozen_class(cls))


def _functional_way(module: nn.Module, name: str, value: Any) -> str:
    """What to do instead of writing ``name`` on a frozen ``module``."""
    if isinstance(value, nn.Parameter) or name in module._parameters:
        return (
            "Build a model with new tensors instead: ts.tree.map(fn, model), or "
            "treedef + leaves -> ts.tree.unflatten(treedef, leaves)."
        )
    if isinstance(value, nn.Module) or name in module._modules:
        return (
            f"Build a new model instead: ts.select(model).at({name!r}).replace(new_module) "
            "(paths are relative to the selection)."
        )
    if isinstance(value, torch.Tensor) or name in module._buffers:
        return (
            "Buffers are shared with every tree made from this one; build a model with new "
            "tensors instead: ts.tree.map(fn, model) or ts.tree.unflatten(treedef, leaves)."
        )
    return (
        "Attributes of a frozen node are shared with every tree made from it; set it on the "
        "plain module before ts.wrap, or replace the node: ts.select(model).at(path)"
        ".replace(new_module). For the training flag, write model = model.eval() (or "
        ".train()): a new tree in that mode."
    )


def tree_parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A tree's own ``Parameter`` over ``tensor``'s storage, whose ``.grad`` is never kept."""
    param = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
    _drop_grads_of(param)
    return param


def _drop_grads_of(param: torch.Tensor) -> None:
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    if param.requires_grad and not any(h is _drop_grad for h in hooks.values()):
        param.register_post_accumulate_grad_hook(_drop_grad)


def _drop_grad(param: torch.Tensor) -> None:
    global _warned_about_grads
    param.grad = None
    if not _warned_about_grads:
        _warned_about_grads = True
        warnings.warn(
            "a backward pass reached the weights of a torchsurgeon tree; their .grad is not "
            "kept, because a tree shares its weights with the model it came from and with "
            "every tree made from it. Activation gradients: ts.layers.SaveGrad. Weight "
            "gradients: torch.autograd.grad(loss, params) or torch.func.grad over "
            "ts.functional(model). (Shown once.)",
            SharedWeightGradientWarning,
            stacklevel=2,
        )


def _own_parameters(copy: nn.Module, memo: dict[int, nn.Parameter]) -> None:
    """Give a fresh copy of a *plain* module the tree's own Parameter objects (ties kept)."""
    params = copy._parameters
    for name, param in params.items():
        if type(param) is nn.Parameter:  # subclasses (quantized weights, ...) stay as they are
            if id(param) not in memo:
                # detach(), not .data: the tree's Parameter shares the original's version
                # counter, so a write through either is seen by both (autograd, caches)
                memo[id(param)] = tree_parameter(param.detach(), param.requires_grad)
            params[name] = memo[id(param)]


def frozen_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The frozen subclass of ``cls`` (made once per class, then cached)."""
    if issubclass(cls, FrozenModule):
        return cls
    frozen = _FROZEN_CLASSES.get(cls)
    if frozen is None:
        frozen = type(
            cls.__name__,
            (FrozenModule, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_ts_original": cls},
        )
        _FROZEN_CLASSES[cls] = frozen
    return frozen


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a node of a frozen tree."""
    return isinstance(module, FrozenModule)


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class a frozen module was made from (the class itself for a plain module)."""
    cls = type(module)
    return cls.__dict__["_ts_original"] if issubclass(cls, FrozenModule) else cls


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
    for name in _INSTANCE_CALLABLES:
        if name in state:
            state[name] = _rebound(module, copy, name, state[name], path)
    object.__setattr__(copy, "__dict__", state)
    return copy


_INSTANCE_CALLABLES = ("forward", "_old_forward")
"""Methods a library may replace on a module *instance* (accelerate's dispatch hooks put
``forward = partial(new_forward, module)`` and ``_old_forward = module.forward`` there)."""


def _rebound(module: nn.Module, copy: nn.Module, name: str, value: Any, path: str | None) -> Any:
    """``value`` — an instance-level ``forward`` of ``module`` — bound to ``copy`` instead.

    A copy that kept the original's bound ``forward`` would run the *original* module's
    children and silently bypass every rewrite below it. What binds the module as its first
    argument (a ``functools.partial``, as accelerate makes, or a bound method) is re-bound to
    the copy; anything else (a closure, a wrapper from another library) is refused.
    """
    if isinstance(value, functools.partial) and value.args and value.args[0] is module:
        rebound = functools.partial(value.func, copy, *value.args[1:], **value.keywords)
        return functools.update_wrapper(rebound, value)
    if isinstance(value, types.MethodType) and value.__self__ is module:
        return types.MethodType(value.__func__, copy)
    if getattr(value, "__self__", None) is copy or (
        isinstance(value, functools.partial) and value.args and value.args[0] is copy
    ):
        return value
    where = "the root" if not path else repr(path)
    raise FrozenModuleError(
        f"cannot make a torchsurgeon tree of {type(module).__name__} at {where}: its {name!r} "
        f"is replaced on the instance ({type(value).__name__} {getattr(value, '__qualname__', '')}"
        "), e.g. by nnsight or a monkey-patch. A copy would still run the original module and "
        "silently bypass every rewrite. Wrap the unpatched model instead (accelerate's "
        "dispatch hooks are handled: a partial or bound method of the module is re-bound)."
    )


def wrap(module: nn.Module, *, tokenizer: Any = None) -> nn.Module:
    """A frozen tree with ``module``'s structure, sharing every parameter and buffer.

    ``module`` itself is left exactly as it was. Wrapping a frozen tree returns it as is.
    Device and dtype moves return a new tree, leaving this one as it was: write ``model =
    model.to(torch.bfloat16)`` (a bare ``model.to(...)`` warns that nothing moved).
    ``tokenizer`` lets ``ts.run(tree, "text")`` take text; trees rewritten from it keep it.
    """
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"ts.wrap(module): expects an nn.Module, got {type(module).__name__}"
        )
    tree = module if is_frozen(module) else freeze_tree(module, "")
    if tokenizer is None:
        return tree
    from torchsurgeon.surgery.tokenized import with_tokenizer  # it builds on this module

    return with_tokenizer(tree, tokenizer)


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
    params: dict[int, nn.Parameter] = {}

    def freeze(node: nn.Module, path: str) -> nn.Module:
        if id(node) in copies:
            return copies[id(node)]
        copy = shallow_copy(node, path)
        if not is_frozen(node):
            _own_parameters(copy, params)
        copies[id(node)] = copy
        children = copy._modules
        for name, child in list(children.items()):
            if child is not None:
                children[name] = freeze(child, child_path(path, name))
        return copy

    return freeze(module, path)
