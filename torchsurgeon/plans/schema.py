"""The plan manifest's schema: every field of a plan file, checked before anything is built.

A plan file is untrusted input — a host receives them from anyone holding an API key — so
reading one is validation first. :class:`Manifest` (pydantic, strict, no extra fields)
fixes the shape of the JSON; :func:`validate` then checks what a schema cannot: the schema
version, selector expressions (through the selectors' own parser), layer types against the
registry (the allow-list, optionally narrowed by :class:`PlanLimits`), every layer config
by rebuilding the layer, tensor references against the tensors the file holds (dtype,
shape, finite values) and the size limits. Every error is a
:class:`~torchsurgeon.plans.errors.PlanFormatError` naming the field (``steps.2.layer.type``).

Numbers arrive already strict from the reader (:func:`torchsurgeon.plans.wire.parse_json`:
64-bit integers, finite floats). A boolean is never an integer here: pydantic's strict mode
still takes ``true`` for ``Literal[1]`` (``True == 1`` in Python), so the schema version is
checked by type as well, and so is a layer's ``on``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from torchsurgeon.layers.allowed import DTYPES as ALLOWED_DTYPES
from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import layer_types
from torchsurgeon.layers.graph import Graph
from torchsurgeon.plans.differences import MAX_CONFIG_KEYS, MAX_ENTRIES, MAX_ENTRY, MAX_KEY
from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.returning import Reduction
from torchsurgeon.plans.spec import OPERATIONS
from torchsurgeon.selectors.expression import OPERATIONS as SELECTOR_OPERATIONS
from torchsurgeon.selectors.expression import SelectorStep

__all__ = [
    "DTYPES",
    "FORMAT",
    "SCHEMA_VERSION",
    "Manifest",
    "PlanLimits",
    "validate",
]

FORMAT = "torchsurgeon.plan"
SCHEMA_VERSION = 1
DTYPES: dict[str, torch.dtype] = ALLOWED_DTYPES
"""The tensor dtypes a plan may hold, by the name the manifest uses."""


@dataclass(frozen=True)
class PlanLimits:
    """How big a plan may be. A host sets its own; the defaults suit a local file."""

    max_plan_bytes: int = 512 << 20
    max_manifest_bytes: int = 4 << 20
    max_depth: int = 32
    max_json_items: int = 1 << 22
    """Array elements and object members in one JSON text (the header, or the manifest)."""
    max_steps: int = 1024
    max_tensors: int = 4096
    max_tensor_bytes: int = 256 << 20
    max_total_tensor_bytes: int = 512 << 20
    max_topk: int = 1 << 20
    allowed_layers: frozenset[str] | None = None
    """Layer type names accepted (``None``: every registered layer)."""
    allowed_ops: frozenset[str] | None = None
    """Expression operations accepted (``None``: all of ``ts.layers.expr.OPS``; leave out
    ``"call"`` to refuse calls of the model's modules)."""
    max_expr_nodes: int = 4096
    """Nodes in one expression graph."""

    def allowed(self) -> list[str]:
        registered = set(layer_types())
        names = registered if self.allowed_layers is None else registered & self.allowed_layers
        return sorted(names)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1, max_length=256)]
TensorRef = Annotated[str, Field(pattern=r"^t[0-9]{1,9}$")]


_Entry = Annotated[str, Field(max_length=MAX_ENTRY)]
_Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY)]
_Entries = Annotated[list[_Entry], Field(max_length=MAX_ENTRIES)]


class Summary(_Strict):
    """Where-to-look description of a base (optional: plans before it have none)."""

    config: Annotated[dict[_Key, _Entry], Field(max_length=MAX_CONFIG_KEYS)] | None
    modules: _Entries | None
    tensors: _Entries | None


class Identity(_Strict):
    architecture: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")]
    structure_hash: Hash
    config_hash: Hash | None
    fingerprint: Hash | None
    summary: Summary | None = None


class Selector(_Strict):
    op: Literal[SELECTOR_OPERATIONS]  # type: ignore[valid-type]
    arg: JsonValue = None


class Layer(_Strict):
    type: Name
    config: dict[Name, JsonValue]
    tensors: dict[Name, TensorRef]


class Step(_Strict):
    selection: Annotated[list[Selector], Field(max_length=256)]
    operation: Literal[OPERATIONS]  # type: ignore[valid-type]
    layer: Layer | None


class TensorInfo(_Strict):
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=16)]


class ReductionSpec(_Strict):
    positions: Annotated[list[int | None], Field(min_length=3, max_length=3)] | None = None
    position_dim: int = 1
    mean: Annotated[list[int], Field(min_length=1, max_length=16)] | None = None
    topk: Annotated[int, Field(ge=1)] | None = None


class ComputedSpec(_Strict):
    expr: JsonValue
    tensors: Annotated[list[TensorRef], Field(max_length=4096)]


class ReturningSpec(_Strict):
    names: Annotated[list[Name], Field(max_length=4096)] | None = None
    reductions: dict[Name, ReductionSpec] = {}
    computed: Annotated[dict[Name, ComputedSpec], Field(max_length=256)] = {}


class Manifest(_Strict):
    format: Literal["torchsurgeon.plan"]
    schema_version: Literal[1]
    base: Identity
    steps: list[Step]
    returning: ReturningSpec
    backward: ComputedSpec | None = None
    tensors: dict[TensorRef, TensorInfo]


def validate(manifest: Any, tensors: Mapping[str, torch.Tensor], limits: PlanLimits) -> Manifest:
    """The checked manifest; :class:`PlanFormatError` naming the field at the first problem."""
    if not isinstance(manifest, dict):
        raise PlanFormatError(f"the manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise PlanFormatError(f"expected {FORMAT!r}, got {manifest.get('format')!r}", "format")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1 == 1.0 in Python
        raise PlanFormatError(
            f"unsupported schema version {version!r}; this torchsurgeon reads version "
            f"{SCHEMA_VERSION}",
            "schema_version",
        )
    try:
        checked = Manifest.model_validate(manifest)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise PlanFormatError(f"{first['msg']}{more}", where) from None
    if len(checked.steps) > limits.max_steps:
        raise PlanLimitError(
            f"{len(checked.steps)} steps, over the limit of {limits.max_steps}", "steps"
        )
    _check_tensor_table(checked, tensors, limits)
    for i, step in enumerate(checked.steps):
        _check_step(i, step, tensors, limits)
    for name, reduction in checked.returning.reductions.items():
        if reduction.topk is not None and reduction.topk > limits.max_topk:
            raise PlanLimitError(
                f"topk={reduction.topk} is over the limit of {limits.max_topk}",
                f"returning.reductions.{name}.topk",
            )
        try:  # the reduction's own checks (a slice step > 0, ...), as the plan will build it
            Reduction.from_json(reduction.model_dump())
        except (TypeError, ValueError) as error:
            raise PlanFormatError(str(error), f"returning.reductions.{name}") from None
    graphs = [(f"returning.computed.{n}", c) for n, c in checked.returning.computed.items()]
    if checked.backward is not None:
        graphs.append(("backward", checked.backward))
    for where, computed in graphs:
        missing = [ref for ref in computed.tensors if ref not in tensors]
        if missing:
            raise PlanFormatError(
                f"refers to tensor {missing[0]!r}, which the file does not hold", where
            )
        try:
            graph = Graph.from_json(
                computed.expr,
                [tensors[ref] for ref in computed.tensors],
                allowed=limits.allowed_ops,
                max_nodes=limits.max_expr_nodes,
            )
            graph.check_leaves(here=False, output=True)
        except ExpressionError as error:
            raise PlanFormatError(str(error), f"{where}.expr") from None
    return checked


def _check_tensor_table(
    manifest: Manifest, tensors: Mapping[str, torch.Tensor], limits: PlanLimits
) -> None:
    table = manifest.tensors
    for ref in tensors:
        if ref not in table:
            raise PlanFormatError(
                f"the file holds tensor {ref!r}, which the manifest does not list", "tensors"
            )
    for ref, info in table.items():
        tensor = tensors.get(ref)
        field = f"tensors.{ref}"
        if tensor is None:
            raise PlanFormatError(
                "the manifest lists this tensor but the file does not hold it", field
            )
        if DTYPES[info.dtype] != tensor.dtype:
            raise PlanFormatError(
                f"the manifest says dtype {info.dtype}, the tensor is {tensor.dtype}", field
            )
        if list(tensor.shape) != info.shape:
            raise PlanFormatError(
                f"the manifest says shape {info.shape}, the tensor has {list(tensor.shape)}", field
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PlanFormatError("holds NaN or infinite values", field)


def _check_step(
    i: int, step: Step, tensors: Mapping[str, torch.Tensor], limits: PlanLimits
) -> None:
    where = f"steps.{i}"
    for j, selector in enumerate(step.selection):
        try:
            parsed = SelectorStep.from_json(selector.model_dump())
        except (ValueError, TypeError) as error:
            raise PlanFormatError(str(error), f"{where}.selection.{j}") from None
        if parsed.op == "at":
            _check_path(str(parsed.arg), f"{where}.selection.{j}.arg")
    if step.operation == "remove_from_parent":
        if step.layer is not None:
            raise PlanFormatError("remove_from_parent takes no layer", f"{where}.layer")
        return
    if step.layer is None:
        raise PlanFormatError(f"{step.operation} needs a layer", f"{where}.layer")
    allowed = limits.allowed()
    if step.layer.type not in allowed:
        raise PlanFormatError(
            f"unknown or disallowed layer type {step.layer.type!r}; allowed: {', '.join(allowed)}",
            f"{where}.layer.type",
        )
    kind = layer_types()[step.layer.type]
    values: dict[str, torch.Tensor] = {}
    for name, ref in step.layer.tensors.items():
        if not kind.takes_tensor(name):
            raise PlanFormatError(
                f"{kind.type_name} has no tensor field {name!r} (it has "
                f"{list(kind.tensor_fields) or 'none'})",
                f"{where}.layer.tensors.{name}",
            )
        if ref not in tensors:
            raise PlanFormatError(
                f"refers to tensor {ref!r}, which the file does not hold",
                f"{where}.layer.tensors.{name}",
            )
        values[name] = tensors[ref]
    on = step.layer.config.get("on")
    if on is not None and type(on) not in (int, str):
        raise PlanFormatError(
            f"on must be a position (int), a name (str) or null, got {on!r}",
            f"{where}.layer.config.on",
        )
    for name in kind.expr_fields:
        value = step.layer.config.get(name)
        if isinstance(value, dict) and "expr" in value:
            constants = [
                values[f"{name}_c{i}"] for i in range(len(values)) if f"{name}_c{i}" in values
            ]
            try:
                Graph.from_json(
                    value["expr"],
                    constants,
                    allowed=limits.allowed_ops,
                    max_nodes=limits.max_expr_nodes,
                )
            except ExpressionError as error:
                raise PlanFormatError(str(error), f"{where}.layer.config.{name}") from None
    try:
        kind.from_spec(dict(step.layer.config), values)
    except (TypeError, ValueError, IndexError, KeyError, ArithmeticError) as error:
        raise PlanFormatError(
            f"{kind.type_name} cannot be built from this config: {error}", f"{where}.layer"
        ) from None


def _check_path(pattern: str, field: str) -> None:
    if len(pattern) > 4096:
        raise PlanFormatError("the path is longer than 4096 characters", field)
    for segment in pattern.split(".") if pattern else []:
        if not segment or not segment.isprintable() or any(c.isspace() for c in segment):
            raise PlanFormatError(
                f"bad path {pattern!r}: segments must be non-empty, printable and without spaces",
                field,
            )
