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

Predicates run on a host against its models, from plans anyone with a key may send, so a
predicate reads only what is meant to be compared and never raises. ``attr(name)`` reads a
plain config-like value — an int, float, bool, a string of at most
:data:`MAX_ATTR_STRING` characters, or None — from the module's own ``__dict__``: never a
property or anything computed, never a class attribute, a dunder or a private name, never
a tensor or a submodule, never where the model was loaded from (``name_or_path``, or a
string that looks like a local path); those read as missing. A name that could not be
such a value (not an identifier, or starting with ``_``) is refused when the predicate is
built or parsed. Compared values are JSON scalars (lists of them for ``isin``), and ``matches``
compiles its glob once, when built, to an expression of its own (``fnmatch`` would keep
every pattern it ever saw in a process-wide cache).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, SerializationError
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import layer_index_of

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
_FIELDS = ("layer_index", "path", "attr")
_SCALARS = (int, float, bool, str, type(None))
MAX_ATTR_STRING = 256
"""The longest string attribute ``attr(name)`` reads (longer ones read as missing)."""
_HOST_LOCAL = frozenset({"name_or_path"})
"""Attributes that say where a model was loaded from (transformers sets this one)."""
_LOCAL_PATH = re.compile(r"^(/|~|\\\\|file:|[A-Za-z]:[\\/])")
_MAX_NAME = 64
_MAX_GLOB = 1024


def class_names(module: nn.Module) -> set[str]:
    """Every name the classes of ``module``'s MRO answer to (bare and fully qualified)."""
    names: set[str] = set()
    for cls in original_class(module).__mro__:
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return names


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

    def __post_init__(self) -> None:
        if self.kind not in _FIELDS:
            raise ArgumentError(f"unknown field kind {self.kind!r}; known: {', '.join(_FIELDS)}")
        if self.kind == "attr":
            _check_attr_name(self.name)
        elif self.name is not None:
            raise ArgumentError(f"the field {self.kind!r} takes no name, got {self.name!r}")

    def read(self, path: str, module: nn.Module) -> Any:
        if self.kind == "layer_index":
            return layer_index_of(path)
        if self.kind == "path":
            return path
        value = vars(module).get(self.name, _MISSING)  # the instance's own, never computed
        if type(value) not in _SCALARS or self.name in _HOST_LOCAL:
            return _MISSING
        if type(value) is str and (len(value) > MAX_ATTR_STRING or _LOCAL_PATH.match(value)):
            return _MISSING  # not a config value, or a path on the machine that loaded it
        return value

    def to_json(self) -> dict[str, JSONValue]:
        return {"kind": self.kind, "name": self.name} if self.name else {"kind": self.kind}

    def isin(self, values: Sequence[Any]) -> Predicate:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | set | frozenset):
            raise ArgumentTypeError(f"isin(...) takes a list of values, got {_shown(values)}")
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
    """The plain attribute ``name`` of a node: an int, float, bool, short string or None.

    It is read from the module's own ``__dict__`` (``in_features``, ``num_heads``, ...); a
    node without it, or whose ``name`` is a tensor, a module, a property or a long string,
    satisfies no comparison. ``name`` must be a public identifier (no leading ``_``).
    """
    return Field("attr", name)


def _check_attr_name(name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ArgumentError(
            f"attr({name!r}): the name must be a public attribute name (an identifier not "
            "starting with '_'), e.g. attr('in_features')"
        )
    if len(name) > _MAX_NAME:
        raise ArgumentError(f"attr(...): the name is {len(name)} characters, over {_MAX_NAME}")


def _equal(a: Any, b: Any) -> bool:
    """``a == b``, except that a bool equals only a bool (``True == 1`` in Python)."""
    return (type(a) is bool) == (type(b) is bool) and a == b


def _ordered(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """An ordering that never holds with a bool on either side."""
    return lambda a, b: type(a) is not bool and type(b) is not bool and compare(a, b)


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "==": _equal,
    "!=": lambda a, b: not _equal(a, b),
    "<": _ordered(lambda a, b: a < b),
    "<=": _ordered(lambda a, b: a <= b),
    ">": _ordered(lambda a, b: a > b),
    ">=": _ordered(lambda a, b: a >= b),
    "isin": lambda a, b: any(_equal(a, v) for v in b),
    "matches": lambda a, b: isinstance(a, str) and b.fullmatch(a) is not None,
}


@dataclass(frozen=True, eq=False)
class _Compare(Predicate):
    op: str
    field: Field
    value: Any
    _glob: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.op not in _COMPARISONS:
            raise ArgumentError(f"unknown comparison {self.op!r}; known: {', '.join(_COMPARISONS)}")
        if self.op == "matches":
            if not isinstance(self.value, str) or len(self.value) > _MAX_GLOB:
                raise ArgumentError(
                    f"matches(...) takes a glob string of at most {_MAX_GLOB} characters, "
                    f"got {_shown(self.value)}"
                )
            object.__setattr__(self, "_glob", re.compile(fnmatch.translate(self.value)))
            return
        values = self.value if self.op == "isin" else (self.value,)
        if self.op == "isin" and not isinstance(self.value, tuple):
            raise ArgumentError(f"isin(...) takes a list of values, got {_shown(self.value)}")
        bad = [v for v in values if type(v) not in _SCALARS]
        if bad:
            raise ArgumentError(
                f"a predicate compares with ints, floats, bools, strings or None (JSON "
                f"scalars), got {_shown(bad[0])}"
            )

    def __call__(self, path: str, module: nn.Module) -> bool:
        found = self.field.read(path, module)
        if found is None or found is _MISSING:
            return False
        compared = self._glob if self.op == "matches" else self.value
        try:
            return bool(_COMPARISONS[self.op](found, compared))
        except TypeError:  # ordering a str against a number: no comparison holds
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
    raise ArgumentTypeError(f"instance_of expects a class or a class name, got {cls!r}")


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
        raise ArgumentTypeError(
            f"{value} is a field, not a predicate: compare it, e.g. == or .isin([...])"
        )
    if callable(value):
        try:
            arity = len(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            arity = 1
        return _Callable(value, takes_path=arity >= 2)
    raise ArgumentTypeError(
        f"expected a predicate (e.g. ts.layer_index.isin([12, 13])) or a callable, got "
        f"{type(value).__name__}"
    )


def predicate_from_json(data: dict[str, JSONValue]) -> Predicate:
    """Rebuild a predicate from :meth:`Predicate.to_json` output (strictly checked)."""
    if not isinstance(data, dict) or "op" not in data:
        raise ArgumentError(f"a predicate must be an object with an 'op' field, got {data!r}")
    op = data["op"]
    if op in ("and", "or", "not"):
        args = data.get("args")
        if not isinstance(args, list) or not args or (op == "not" and len(args) != 1):
            raise ArgumentError(f"predicate {op!r} needs a non-empty 'args' list")
        return _Logic(op, tuple(predicate_from_json(a) for a in args))
    if op == "instance_of":
        return instance_of(str(data.get("class", "")))
    if op in _COMPARISONS:
        found = data.get("field")
        if not isinstance(found, dict) or found.get("kind") not in _FIELDS:
            raise ArgumentError(f"predicate {op!r} has no valid 'field': {_shown(found)}")
        if set(found) - {"kind", "name"}:
            raise ArgumentError(f"a field has only 'kind' and 'name', got {sorted(found)}")
        if found["kind"] == "attr" and not isinstance(found.get("name"), str):
            raise ArgumentError("an attr field needs a string 'name'")
        value = data.get("value")
        if op == "isin":
            if not isinstance(value, list):
                raise ArgumentError("predicate 'isin' needs a list 'value'")
            value = tuple(value)
        if op == "matches" and not isinstance(value, str):
            raise ArgumentError("predicate 'matches' needs a string 'value'")
        return _Compare(op, Field(found["kind"], found.get("name")), value)
    raise ArgumentError(
        f"unknown predicate op {op!r}; known: and, or, not, instance_of, " + ", ".join(_COMPARISONS)
    )


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: messages quote what was sent, never all of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
