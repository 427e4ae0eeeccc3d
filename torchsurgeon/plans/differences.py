"""Where two bases differ: the first module, config key or tensor, for identity mismatches.

A :class:`~torchsurgeon.plans.identity.BaseIdentity` holds hashes, which say *that* two
models differ. When both models are still alive in this process (a plan made here and
applied to another model here), these helpers walk them and name *where*: the first
module path whose class differs or that only one has, the first config key with both
values, the first parameter or buffer whose name, shape, dtype or sampled values differ.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import iter_nodes, join

__all__ = ["first_config_difference", "first_structure_difference", "first_weight_difference"]

_SHOWN = 80  # characters of a config value shown in a message


def _name(cls: type) -> str:
    return cls.__qualname__


def _nodes(model: nn.Module) -> dict[str, nn.Module]:
    return dict(iter_nodes(model))


def _own_tensors(node: nn.Module) -> dict[str, Any]:
    return {
        name: tensor
        for name, tensor in [*node._parameters.items(), *node._buffers.items()]
        if tensor is not None
    }


def first_structure_difference(plans: nn.Module, this: nn.Module) -> str | None:
    """The first module path (class or tensor shapes) at which ``this`` base differs."""
    mine, theirs = _nodes(plans), _nodes(this)
    for path, node in mine.items():
        where = repr(path) if path else "the root"
        other = theirs.get(path)
        if other is None:
            return f"{where} ({_name(original_class(node))}) is missing from this base"
        a, b = original_class(node), original_class(other)
        if a is not b:
            return f"at {where} the plan's base has a {_name(a)}, this base a {_name(b)}"
        ta, tb = _own_tensors(node), _own_tensors(other)
        for name, tensor in ta.items():
            full = repr(join(path, name))
            if name not in tb:
                return f"tensor {full} is missing from this base"
            if tensor.shape != tb[name].shape:
                return (
                    f"tensor {full} has shape {list(tensor.shape)} in the plan's base, "
                    f"{list(tb[name].shape)} in this base"
                )
        extra = next((n for n in tb if n not in ta), None)
        if extra is not None:
            return f"this base has an extra tensor {join(path, extra)!r}"
    extra_path = next((p for p in theirs if p not in mine), None)
    if extra_path is not None:
        cls = _name(original_class(theirs[extra_path]))
        return f"this base has an extra module {extra_path!r} ({cls})"
    return None


def first_config_difference(plans: dict[str, Any] | None, this: dict[str, Any] | None) -> str:
    """The first config key (sorted) whose values differ, with both values."""
    if plans is None or this is None:
        which = "the plan's base" if plans is None else "this base"
        return f"{which} has no config"
    missing = object()
    for key in sorted(set(plans) | set(this)):
        a, b = plans.get(key, missing), this.get(key, missing)
        if a != b:
            shown = ["(absent)" if v is missing else _short(v) for v in (a, b)]
            return f"config key {key!r}: {shown[0]} in the plan's base, {shown[1]} in this base"
    return "the configs differ only in how they serialize"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def first_weight_difference(plans: nn.Module, this: nn.Module) -> str | None:
    """The first parameter or buffer whose name, shape, dtype or sampled values differ."""
    from torchsurgeon.plans.identity import _sample, _tensors  # identity imports this module

    mine, theirs = dict(_tensors(plans)), dict(_tensors(this))
    for name, tensor in mine.items():
        other = theirs.get(name)
        if other is None:
            return f"tensor {name!r} is missing from this base"
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            return (
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)} in the plan's base, "
                f"{other.dtype} {list(other.shape)} in this base"
            )
        if tensor.is_meta or other.is_meta:
            return None  # a structure-only side has no values to compare
        if _sample(name, tensor) != _sample(name, other):
            return f"tensor {name!r}: values differ (a different checkpoint, or edited weights)"
    extra = next((n for n in theirs if n not in mine), None)
    return None if extra is None else f"this base has an extra tensor {extra!r}"
