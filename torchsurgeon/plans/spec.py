"""The two data values a plan is made of: a layer spec and a rewrite step.

A :class:`LayerSpec` is an intervention layer as data — its registry type name, its JSON
config and its named tensors — and :meth:`LayerSpec.build` turns it back into a layer
through the registry (the same allow-list a host uses). A :class:`PlanStep` is one recorded
rewrite: the selector expression, the operation, and the layer spec it inserted or replaced
with (none for ``remove_from_parent``).

Only registry layers become specs. A plain module, a subclass of a registry layer that is
not itself registered, or a tensor on the meta device raise
:class:`~torchsurgeon.surgery.errors.SerializationError` saying why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.layers.base import InterventionLayer, layer_class, layer_types
from torchsurgeon.layers.expr import describe
from torchsurgeon.layers.graph import Graph
from torchsurgeon.selectors.expression import SelectorStep
from torchsurgeon.surgery.errors import SerializationError
from torchsurgeon.surgery.frozen import original_class

__all__ = ["OPERATIONS", "LayerSpec", "Operation", "PlanStep"]

Operation = Literal["insert_before", "insert_after", "replace", "remove_from_parent"]
OPERATIONS: tuple[str, ...] = ("insert_before", "insert_after", "replace", "remove_from_parent")


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """An intervention layer as data: registry type name, JSON config, named tensors."""

    type_name: str
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, layer: nn.Module) -> LayerSpec:
        """The spec of ``layer``; :class:`SerializationError` if it is not a registry layer."""
        kind = original_class(layer)
        if not isinstance(layer, InterventionLayer):
            raise SerializationError(
                f"{kind.__name__} is not an intervention layer, so it cannot travel in a plan; "
                f"only registry layers can ({', '.join(sorted(layer_types()))})"
            )
        registered = layer_types().get(kind.type_name)
        if registered is not kind:
            raise SerializationError(
                f"{kind.__name__} (type_name {kind.type_name!r}) is not the registered layer of "
                "that name; register it with @ts.layers.register_layer under its own type_name "
                "so a host can rebuild it"
            )
        config = dict(layer.config())
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise SerializationError(f"{kind.__name__}'s config is not JSON: {error}") from None
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in layer.tensors().items():
            if tensor.is_meta:
                raise SerializationError(
                    f"{kind.__name__}.{name} is a tensor on the meta device, with no values to send"
                )
            tensors[name] = tensor.detach().to("cpu").contiguous()
        return cls(kind.type_name, config, tensors)

    def build(self) -> InterventionLayer:
        """A fresh layer from this spec (through the registry)."""
        return layer_class(self.type_name).from_spec(dict(self.config), dict(self.tensors))

    def same_as(self, other: LayerSpec) -> bool:
        """Equal type, config and tensors (dtype, shape and every value)."""
        return (
            self.type_name == other.type_name
            and dict(self.config) == dict(other.config)
            and self.tensors.keys() == other.tensors.keys()
            and all(_same_tensor(t, other.tensors[k]) for k, t in self.tensors.items())
        )

    def __repr__(self) -> str:
        config = ", ".join(
            f"{k}={_shown(v, self.tensors, k)}" for k, v in self.config.items() if v is not None
        )
        tensors = ", ".join(
            f"{k}=<{list(t.shape)} {t.dtype}>"
            for k, t in self.tensors.items()
            if not _is_constant(k, self.config)
        )
        return f"{self.type_name}({', '.join(p for p in (config, tensors) if p)})"


@dataclass(frozen=True, eq=False)
class PlanStep:
    """One rewrite: replay ``selection`` from the root, then ``operation`` with ``layer``."""

    selection: tuple[SelectorStep, ...]
    operation: Operation
    layer: LayerSpec | None = None

    def __str__(self) -> str:
        expression = "".join(f".{s}" for s in self.selection)
        payload = "" if self.layer is None else repr(self.layer)
        return f"select(model){expression}.{self.operation}({payload})"

    def same_as(self, other: PlanStep) -> bool:
        """Equal expression (as JSON), operation and layer spec."""
        return (
            self.operation == other.operation
            and [s.to_json() for s in self.selection] == [s.to_json() for s in other.selection]
            and _same_layer(self.layer, other.layer)
        )


def _shown(value: Any, tensors: Mapping[str, torch.Tensor], name: str) -> str:
    """A config value as the spec's repr shows it (an expression in its readable form)."""
    if isinstance(value, dict) and set(value) == {"expr"}:
        constants = [
            tensors[f"{name}_c{i}"] for i in range(len(tensors)) if f"{name}_c{i}" in tensors
        ]
        try:
            return describe(Graph.from_json(value["expr"], constants).expr())
        except ValueError:
            return "<expression>"
    return repr(value)


def _is_constant(name: str, config: Mapping[str, Any]) -> bool:
    field, _, number = name.rpartition("_c")
    value = config.get(field)
    return number.isdigit() and isinstance(value, dict) and set(value) == {"expr"}


def _same_layer(a: LayerSpec | None, b: LayerSpec | None) -> bool:
    return a is b is None or (a is not None and b is not None and a.same_as(b))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
