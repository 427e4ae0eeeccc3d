"""Intervention sites: how an inserted layer sits on a module without moving it.

Inserting a layer before or after the module at ``mlp.down_proj`` does not re-parent that
module (which would change its path, its ``state_dict`` keys and every selector written
against it). Instead the rewrite gives the module's private copy two child lists,
``ts_before`` and ``ts_after``, and a forward pre-hook and hook (the ordinary PyTorch
mechanism, so ``torch.compile``, ``generate`` and ``device_map`` all see them) that run
those layers. The original module keeps its path, its class and its parameters; the
inserted layers are ordinary nodes of the tree at ``mlp.down_proj.ts_before.0`` and can be
selected, shown, replaced or removed like any other.

A layer acts on one tensor of the call, its *target*: by default the primary tensor — the
first tensor argument (else the first tensor keyword argument) before the module, element 0
of a tuple/list output (the first field of a ``ModelOutput``/dict, or the tensor itself)
after it. A layer's ``on`` attribute picks another: an ``int`` is a positional argument or
output element, a ``str`` a keyword argument or output field.

A layer with ``steps`` set (``Save("h", steps=[0, 2])``) acts only at those calls within
one run — one call per generation step in ``generate`` — and passes the tensor through at
the others.

Layers at one site run in the order they were inserted, in the direction the data flows:
a second ``insert_before`` runs after the first (just before the module), and a second
``insert_after`` runs after the first. So ``insert_before(SetValues(...))`` followed by
``insert_before(Save("x"))`` records the value the module receives — the order a reader of
the code expects, and the order ``ts.show`` lists them in.

A layer inserted *after* a module whose class sets ``reads_input = True`` is called as
``layer(target, input=x)``, where ``x`` is the module's primary input as the module
received it (after any ``insert_before`` layers). That is how an adapter such as LoRA adds
a path from a Linear's input to its output while sitting after it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import nn

from torchsurgeon.surgery.errors import SelectionError, SiteError
from torchsurgeon.surgery.frozen import (
    freeze_tree,
    frozen_at,
    original_class,
    recorded_path,
    shallow_copy,
)
from torchsurgeon.surgery.paths import SITE_LISTS, child_path, describe

__all__ = [
    "AFTER",
    "BEFORE",
    "LayerCall",
    "add_layers",
    "check_widths",
    "is_container",
    "site_layers",
    "site_width",
    "watching",
]

BEFORE, AFTER = SITE_LISTS
_HOOKED = "_ts_hooked"
_WATCH: ContextVar[list[LayerCall] | None] = ContextVar("ts_layer_calls", default=None)


class LayerCall(NamedTuple):
    """One call of an inserted layer seen by :func:`watching`."""

    site: str
    target: tuple[int, ...]
    """The shape of the tensor the layer was given."""
    result: tuple[int, ...] | None
    """The shape of what it returned (``None``: not a tensor)."""


@contextmanager
def watching() -> Iterator[list[LayerCall]]:
    """Record every inserted layer's call in this context (an estimate's meta run uses it
    to learn which layers change their target's shape, e.g. the rows of a batch)."""
    calls: list[LayerCall] = []
    token = _WATCH.set(calls)
    try:
        yield calls
    finally:
        _WATCH.reset(token)


def _called(layer: nn.Module, call: Callable[[Any], Any], value: torch.Tensor) -> Any:
    """``call(value)``, noted while :func:`watching`."""
    out = call(value)
    calls = None if torch.compiler.is_compiling() else _WATCH.get()
    if calls is not None:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        calls.append(LayerCall(getattr(layer, "site", ""), tuple(value.shape), shape))
    return out


Accessor = int | str | None


def add_layers(node: nn.Module, before: Sequence[nn.Module], after: Sequence[nn.Module]) -> None:
    """Give a *private copy* ``node`` more intervention layers (and hooks, once).

    New layers go at the end of the site's list (insertion order is run order). The lists
    are frozen like the rest of the tree — a later rewrite shares this node, so an ``append``
    on a plain list would reach every model made from it — but extending one copies only the
    list object: the layers already there keep their places and are not copied again.
    """
    if (before or after) and is_container(node):
        raise SelectionError(
            f"{type(node).__name__} at {describe(recorded_path(node))} is a container: its "
            "children are its contents, so a layer sitting on it would run as one more "
            "element; insert on one of its children"
        )
    for which, layers in ((BEFORE, before), (AFTER, after)):
        if layers:
            node._modules[which] = _extended(node, which, layers)
            hooked = node.__dict__.setdefault(_HOOKED, set())
            if which not in hooked:  # only the hook a side needs: each one costs every call
                if which == BEFORE:
                    node.register_forward_pre_hook(_run_before, with_kwargs=True)
                else:
                    node.register_forward_hook(_run_after, with_kwargs=True)
                node.__dict__[_HOOKED] = {*hooked, which}  # a new set: copies share the old


def _extended(node: nn.Module, which: str, layers: Sequence[nn.Module]) -> nn.Module:
    path = child_path(recorded_path(node), which)
    old = node._modules.get(which)
    if old is None:
        return freeze_tree(nn.ModuleList(layers), path)
    new = shallow_copy(old, path)  # own _modules dict; the old list is never changed
    start = len(new._modules)
    for i, layer in enumerate(layers, start):
        new._modules[str(i)] = frozen_at(layer, child_path(path, str(i)))
    return new


def is_container(node: nn.Module) -> bool:
    """Whether ``node`` is a Sequential, ModuleList or ModuleDict (its children are its
    contents: iterating it, or its ``forward``, would reach a site's layer lists)."""
    return isinstance(node, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def check_widths(
    operation: str, layer: nn.Module, before: bool, paths: Sequence[str], nodes: Sequence[nn.Module]
) -> None:
    """Refuse a layer whose tensor cannot fit a site of known width (:func:`site_width`)."""
    misfit = getattr(layer, "misfit_width", None)
    if misfit is None or (not before and getattr(type(layer), "reads_input", False)):
        return
    for path, node in zip(paths, nodes, strict=True):
        width = site_width(node, before)
        why = None if width is None else misfit(width)
        if why:
            side = "input" if before else "output"
            raise SiteError(
                f"{operation} at {describe(path)} ({type(node).__name__}, {side} width "
                f"{width}): {why}"
            )


def site_width(node: nn.Module, before: bool) -> int | None:
    """The last dimension of ``node``'s primary input (``before``) or output, where its class
    fixes it (linear maps, embeddings, norms); None where only a run would tell."""
    cls = original_class(node)
    weight = node._parameters.get("weight")
    if issubclass(cls, nn.Linear):
        return node.in_features if before else node.out_features
    if issubclass(cls, nn.Embedding):
        return None if before else node.embedding_dim
    if issubclass(cls, (nn.LayerNorm, nn.RMSNorm)):
        shape = node.normalized_shape
        return int(shape[-1]) if shape else None
    if cls.__name__ in ("Conv1D", "Projection") and weight is not None and weight.dim() == 2:
        rows, cols = weight.shape  # transformers' Conv1D is [in, out]; Projection [out, in]
        return int(rows if (cls.__name__ == "Conv1D") == before else cols)
    return None


def site_layers(node: nn.Module, which: str) -> list[nn.Module]:
    """The layers inserted before (``BEFORE``) or after (``AFTER``) ``node``."""
    layers = node._modules.get(which)
    return list(layers) if layers is not None else []


def _run_before(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    layers = module._modules.get(BEFORE)
    if not layers:
        return None
    for layer in layers._modules.values():
        if getattr(layer, "steps", None) is not None and not layer.ts_active():
            continue  # not one of the layer's generation steps
        args, kwargs = _apply_to_input(module, layer, args, kwargs)
    return args, kwargs


def _run_after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    layers = module._modules.get(AFTER)
    if not layers:
        return None
    for layer in layers._modules.values():
        if getattr(layer, "steps", None) is not None and not layer.ts_active():
            continue  # not one of the layer's generation steps
        call = layer
        if getattr(layer, "reads_input", False):
            call = functools.partial(layer, input=_primary_input(module, layer, args, kwargs))
        output = _apply_to_output(module, layer, output, call)
    return output


def _primary_input(
    module: nn.Module, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise _no_target(module, layer, "input", f"args {_kinds(args)}, kwargs {_kinds(kwargs)}")


def _apply_to_input(
    module: nn.Module, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    on: Accessor = getattr(layer, "on", None)
    if on is None:
        for i, value in enumerate(args):
            if isinstance(value, torch.Tensor):
                return (*args[:i], _called(layer, layer, value), *args[i + 1 :]), kwargs
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                return args, {**kwargs, name: _called(layer, layer, value)}
        raise _no_target(module, layer, "input", f"args {_kinds(args)}, kwargs {_kinds(kwargs)}")
    if isinstance(on, str) and on not in kwargs:
        position = _positional_index(type(module), on)
        if position is None or position >= len(args):
            raise _no_target(module, layer, "input", f"keyword arguments {sorted(kwargs)}")
        on = position
    if isinstance(on, int):
        if not -len(args) <= on < len(args):
            raise _no_target(module, layer, "input", f"{len(args)} positional arguments")
        on %= len(args)
        if not isinstance(args[on], torch.Tensor):
            raise _no_target(module, layer, "input", f"argument {on} = {_kind(args[on])}")
        return (*args[:on], _called(layer, layer, args[on]), *args[on + 1 :]), kwargs
    if not isinstance(kwargs[on], torch.Tensor):
        raise _no_target(module, layer, "input", f"keyword argument {on!r} = {_kind(kwargs[on])}")
    return args, {**kwargs, on: _called(layer, layer, kwargs[on])}


def _apply_to_output(
    module: nn.Module, layer: nn.Module, output: Any, call: Callable[..., Any]
) -> Any:
    on: Accessor = getattr(layer, "on", None)
    if isinstance(output, torch.Tensor):
        if on not in (None, 0):
            raise _no_target(module, layer, "output", "a single tensor")
        return _called(layer, call, output)
    if isinstance(output, (tuple, list)):
        if on is None:
            on = next((i for i, v in enumerate(output) if isinstance(v, torch.Tensor)), None)
        if not isinstance(on, int) or not -len(output) <= on < len(output):
            raise _no_target(module, layer, "output", f"a {type(output).__name__} of {len(output)}")
        items = list(output)
        if not isinstance(items[on], torch.Tensor):
            raise _no_target(module, layer, "output", f"element {on} = {_kind(items[on])}")
        items[on] = _called(layer, call, items[on])
        return type(output)(items) if type(output) in (tuple, list) else type(output)(*items)
    if isinstance(output, dict):  # includes transformers' ModelOutput
        if on is None:
            on = next((k for k, v in output.items() if isinstance(v, torch.Tensor)), None)
        elif isinstance(on, int):
            keys = list(output.keys())
            on = keys[on] if -len(keys) <= on < len(keys) else None
        if on not in output:
            raise _no_target(module, layer, "output", f"fields {list(output.keys())}")
        if not isinstance(output[on], torch.Tensor):
            raise _no_target(module, layer, "output", f"field {on!r} = {_kind(output[on])}")
        output[on] = _called(layer, call, output[on])
        return output
    raise _no_target(module, layer, "output", type(output).__name__)


@functools.cache
def _positional_index(cls: type, name: str) -> int | None:
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index(name) - 1 if name in params else None  # minus ``self``


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _kinds(values: Any) -> str:
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return "{" + ", ".join(f"{k}: {type(v).__name__}" for k, v in items) + "}"


def _no_target(module: nn.Module, layer: nn.Module, side: str, found: str) -> SiteError:
    on = getattr(layer, "on", None)
    where = describe(recorded_path(module))
    wanted = "the primary tensor" if on is None else f"on={on!r}"
    return SiteError(
        f"{type(layer).__name__} inserted {'before' if side == 'input' else 'after'} "
        f"{type(module).__name__} at {where} found no {side} tensor for {wanted}; the call had "
        f"{found}. Pass on=<position or name> to the layer to pick its target."
    )
