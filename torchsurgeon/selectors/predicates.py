"""Predicates that are data: the ``where`` clauses of selector expressions.

A selection step like ``.where(ts.layer_index.isin([12, 13]))`` has to travel in a plan to a
host that replays it, so predicates are small expression trees, not Python functions. They
are built from *fields* of a node — its ``layer_index`` (the last integer segment of its
path, the position of the block in its ``ModuleList``), its ``path``, an attribute
(``ts.attr("in_features")``) — compared with plain values, and combined with ``&``, ``|``
and ``~``. ``instance_of("LlamaMLP")`` tests the class by name.

A Python callable (taking the module, or ``(path, module)``) is accepted anywhere a
predicate is; it works locally and makes any plan built from it refuse to serialize, with a
message naming the step.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchsurgeon.surgery.errors import SerializationError
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.sites import AFTER, BEFORE

__all__ = [
    "Field",
    "Predicate",
    "as_predicate",
    "attr",
    "class_names",
    "instance_of",
    "layer_index",
    "path",
    "predicate_from_json",
]

JSONValue = Any
_MISSING = object()


def class_names(module: nn.Module) -> set[str]:
    """Every name the classes of ``module``'s MRO answer to (bare and fully qualified)."""
    names: set[str] = set()
    for cls in original_class(module).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


def _layer_index(path: str, module: nn.Module) -> int | None:
    segments = path.split(".") if path else []
    for i in range(len(segments) - 1, -1, -1):
        if segments[i].lstrip("-").isdigit() and (i == 0 or segments[i - 1] not in (BEFORE, AFTER)):
            return int(segments[i])
    return None


class Predicate:
    """A serializable test of a node: call it with ``(path, module)``."""

    def __call__(self, path: str, module: nn.Module) -> bool:
        raise NotImplementedError

    def to_json(self) -> dict[str, JSONValue]:
        raise NotImplementedError

    def __and__(self, other: Predicate) -> Predicate:
        return _Logic("and", (self, as_predicate(other)))

    def __or__(self, other: Predicate) -> Predicate:
        return _Logic("or", (self, as_predicate(other)))

    def __invert__(self) -> Predicate:
        return _Logic("not", (self,))


@dataclass(frozen=True)
class Field:
    """A value read off a node; compare it to build a predicate."""

    kind: str  # "layer_index" | "path" | "attr"
    name: str | None = None

    def read(self, path: str, module: nn.Module) -> Any:
        if self.kind == "layer_index":
            return _layer_index(path, module)
        if self.kind == "path":
            return path
        return getattr(module, self.name or "", _MISSING)

    def to_json(self) -> dict[str, JSONValue]:
        return {"kind": self.kind, "name": self.name} if self.name else {"kind": self.kind}

    def isin(self, values: Sequence[Any]) -> Predicate:
        return _Compare("isin", self, tuple(values))

    def matches(self, glob: str) -> Predicate:
        """Shell-style match of the field's string (``*`` crosses dots here)."""
        return _Compare("matches", self, glob)

    def __eq__(self, value: object) -> Predicate:  # type: ignore[override]
        return _Compare("==", self, value)

    def __ne__(self, value: object) -> Predicate:  # type: ignore[override]
        return _Compare("!=", self, value)

    def __lt__(self, value: Any) -> Predicate:
        return _Compare("<", self, value)

    def __le__(self, value: Any) -> Predicate:
        return _Compare("<=", self, value)

    def __gt__(self, value: Any) -> Predicate:
        return _Compare(">", self, value)

    def __ge__(self, value: Any) -> Predicate:
        return _Compare(">=", self, value)

    __hash__ = object.__hash__


layer_index = Field("layer_index")
"""The last integer segment of a node's path: ``12`` for ``model.layers.12.mlp``."""

path = Field("path")
"""A node's dotted path."""


def attr(name: str) -> Field:
    """The attribute ``name`` of a node (a node without it satisfies no comparison)."""
    return Field("attr", name)


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "isin": lambda a, b: a in b,
    "matches": lambda a, b: isinstance(a, str) and fnmatch.fnmatchcase(a, b),
}


@dataclass(frozen=True, eq=False)
class _Compare(Predicate):
    op: str
    field: Field
    value: Any

    def __call__(self, path: str, module: nn.Module) -> bool:
        found = self.field.read(path, module)
        if found is None or found is _MISSING:
            return False
        try:
            return bool(_COMPARISONS[self.op](found, self.value))
        except TypeError:
            return False

    def to_json(self) -> dict[str, JSONValue]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"op": self.op, "field": self.field.to_json(), "value": value}

    def __repr__(self) -> str:
        name = self.field.kind if self.field.name is None else f"attr({self.field.name!r})"
        if self.op in ("isin", "matches"):
            return f"{name}.{self.op}({self.value!r})"
        return f"({name} {self.op} {self.value!r})"


@dataclass(frozen=True, eq=False)
class _Logic(Predicate):
    op: str  # "and" | "or" | "not"
    args: tuple[Predicate, ...]

    def __call__(self, path: str, module: nn.Module) -> bool:
        if self.op == "and":
            return all(p(path, module) for p in self.args)
        if self.op == "or":
            return any(p(path, module) for p in self.args)
        return not self.args[0](path, module)

    def to_json(self) -> dict[str, JSONValue]:
        return {"op": self.op, "args": [p.to_json() for p in self.args]}

    def __repr__(self) -> str:
        if self.op == "not":
            return f"~{self.args[0]!r}"
        return "(" + f" {'&' if self.op == 'and' else '|'} ".join(map(repr, self.args)) + ")"


@dataclass(frozen=True, eq=False)
class _InstanceOf(Predicate):
    class_name: str

    def __call__(self, path: str, module: nn.Module) -> bool:
        return self.class_name in class_names(module)

    def to_json(self) -> dict[str, JSONValue]:
        return {"op": "instance_of", "class": self.class_name}

    def __repr__(self) -> str:
        return f"instance_of({self.class_name!r})"


def instance_of(cls: type | str) -> Predicate:
    """Whether a node is an instance of ``cls`` (a class, or a class name, bare or qualified)."""
    if isinstance(cls, type):
        return _InstanceOf(f"{cls.__module__}.{cls.__qualname__}")
    if isinstance(cls, str) and cls:
        return _InstanceOf(cls)
    raise TypeError(f"instance_of expects a class or a class name, got {cls!r}")


@dataclass(frozen=True, eq=False)
class _Callable(Predicate):
    fn: Callable[..., bool]
    takes_path: bool

    def __call__(self, path: str, module: nn.Module) -> bool:
        return bool(self.fn(path, module) if self.takes_path else self.fn(module))

    def to_json(self) -> dict[str, JSONValue]:
        raise SerializationError(
            f"the predicate {self!r} is a Python callable, which cannot travel in a plan: build "
            "it from ts.layer_index, ts.path, ts.attr(...) or ts.instance_of(...) instead"
        )

    def __repr__(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def as_predicate(value: Predicate | Callable[..., bool]) -> Predicate:
    """``value`` as a :class:`Predicate` (a callable becomes a local-only one)."""
    if isinstance(value, Predicate):
        return value
    if isinstance(value, Field):
        raise TypeError(f"{value} is a field, not a predicate: compare it, e.g. == or .isin([...])")
    if callable(value):
        try:
            arity = len(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            arity = 1
        return _Callable(value, takes_path=arity >= 2)
    raise TypeError(
        f"expected a predicate (e.g. ts.layer_index.isin([12, 13])) or a callable, got "
        f"{type(value).__name__}"
    )


def predicate_from_json(data: dict[str, JSONValue]) -> Predicate:
    """Rebuild a predicate from :meth:`Predicate.to_json` output (strictly checked)."""
    if not isinstance(data, dict) or "op" not in data:
        raise ValueError(f"a predicate must be an object with an 'op' field, got {data!r}")
    op = data["op"]
    if op in ("and", "or", "not"):
        args = data.get("args")
        if not isinstance(args, list) or not args or (op == "not" and len(args) != 1):
            raise ValueError(f"predicate {op!r} needs a non-empty 'args' list")
        return _Logic(op, tuple(predicate_from_json(a) for a in args))
    if op == "instance_of":
        return instance_of(str(data.get("class", "")))
    if op in _COMPARISONS:
        field = data.get("field")
        if not isinstance(field, dict) or field.get("kind") not in ("layer_index", "path", "attr"):
            raise ValueError(f"predicate {op!r} has no valid 'field': {field!r}")
        if field["kind"] == "attr" and not isinstance(field.get("name"), str):
            raise ValueError("an attr field needs a string 'name'")
        value = data.get("value")
        if op == "isin":
            if not isinstance(value, list):
                raise ValueError("predicate 'isin' needs a list 'value'")
            value = tuple(value)
        if op == "matches" and not isinstance(value, str):
            raise ValueError("predicate 'matches' needs a string 'value'")
        return _Compare(op, Field(field["kind"], field.get("name")), value)
    raise ValueError(
        f"unknown predicate op {op!r}; known: and, or, not, instance_of, " + ", ".join(_COMPARISONS)
    )
