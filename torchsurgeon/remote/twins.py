"""The values that travel beside a meta run (*twins*), for
:func:`~torchsurgeon.remote.estimates.estimate`: small integer tensors derived from the
inputs carry their real values (CPU copies), so model code that branches on them takes the
branch the real run will."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

__all__ = ["keep_values", "on_meta"]

_TWIN_ELEMENTS = 1 << 20
"""Tensors up to this many elements carry real values beside the meta ones (see above)."""


class _ListIndexes(TorchFunctionMode):
    """Keeps the values of ``x[:, [-1, 0]]`` known on meta tensors.

    Python turns a list index into an index tensor created directly on ``x``'s device —
    on meta, with no values and without passing through the dispatcher, so the meter cannot
    give the result a twin. At the ``Tensor.__getitem__`` call, where the list is still a
    list, the twin is the same index applied to ``x``'s twin.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            func is torch.Tensor.__getitem__
            and isinstance(out, torch.Tensor)
            and out.is_meta
            and _twin(out) is None
            and _plain_index(args[1])
        ):
            twin = _twin(args[0])
            if twin is not None and out.numel() <= _TWIN_ELEMENTS:
                with _disable_current_modes():
                    out._ts_twin = twin[args[1]]
                out._ts_from = args[0].__dict__.get("_ts_from", frozenset())
        return out


def _plain_index(index: Any) -> bool:
    """An index of ints, slices of ints, ``None``, ``...`` and lists of ints only."""
    entries = index if isinstance(index, tuple) else (index,)
    for entry in entries:
        if isinstance(entry, list):
            if not all(type(v) is int for v in entry):
                return False
        elif not (entry is None or entry is Ellipsis or type(entry) in (int, slice)):
            return False
    return True


def _twin(tensor: torch.Tensor) -> torch.Tensor | None:
    return tensor.__dict__.get("_ts_twin") if tensor.is_meta else tensor


def _forget_twin(value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value.__dict__.pop("_ts_twin", None)


def _real(value: Any) -> Any:
    """The CPU twin of a meta tensor (or device), for computing a twin."""
    if isinstance(value, torch.Tensor):
        return _twin(value) if value.is_meta else value
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    return value


def _arguments(func: Any, args: Any, kwargs: Any) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` of every argument of a call of ``func``."""
    schema = func._schema.arguments
    by_name = {argument.name: argument for argument in schema}
    named = [(by_name[name], value) for name, value in kwargs.items() if name in by_name]
    return [*zip(schema, args, strict=False), *named]


def _aliased(
    func: Any, alias: Any, args: Any, kwargs: Any, flat_in: list[torch.Tensor]
) -> torch.Tensor | None:
    """The input a result aliases (by the schema's alias sets), else the first tensor input."""
    for argument, value in _arguments(func, args, kwargs):
        info = argument.alias_info
        if (
            info is not None
            and isinstance(value, torch.Tensor)
            and info.before_set & alias.before_set
        ):
            return value
    return flat_in[0] if flat_in else None


def keep_values(tensor: torch.Tensor, values: torch.Tensor) -> None:
    """Let the meta ``tensor`` carry ``values`` (a CPU copy) as its twin, if it is small."""
    if tensor.is_meta and not values.is_meta and values.numel() <= _TWIN_ELEMENTS:
        tensor._ts_twin = values.detach().to("cpu", copy=True)


def on_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta tensor (small ones keep their values)."""

    def convert(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        copy = torch.empty_like(tensor, device="meta")
        keep_values(copy, tensor)
        return copy

    return tree_map(convert, value)


def _inputs_on_meta(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's inputs on meta, each tensor marked with its name (``args.<i>`` or its key)."""
    meta_args, meta_kwargs = on_meta((tuple(args), dict(kwargs)))
    named = [(f"args.{i}", v) for i, v in enumerate(meta_args)] + list(meta_kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor):
            value._ts_from = frozenset({name})
    return meta_args, meta_kwargs
