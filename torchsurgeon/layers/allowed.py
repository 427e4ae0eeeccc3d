"""The allow-list of the expression language: its operations, their parameters, their checks.

:data:`OPS` is every operation an expression may name — operators, tensor methods and the
``ts.ops`` functions — each with the number of tensor arguments it takes, its parameters in
order with a *kind* each (``dim``: an int; ``dims``: an int, a list of ints or None;
``dtype``: a dtype name; ``pattern``: an einops pattern; ...) and the function that computes
it. :func:`check_param` is the whole parser of parameter values: the same code checks an
expression built in Python and a graph read from the wire, so a host accepts exactly what a
client can build. Nothing is looked up by a user's string except in :data:`OPS`; einsum
equations and einops patterns are matched against a character class and a length before
they reach ``torch.einsum`` or einops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchsurgeon.surgery.errors import ArgumentTypeError, SurgeryError

__all__ = [
    "LEAVES",
    "MAX_DEPTH",
    "MAX_NODES",
    "OPS",
    "ExpressionError",
    "Op",
    "check_param",
    "params_of",
]

MAX_NODES = 4096
"""Nodes in one graph (a host may set fewer)."""
MAX_DEPTH = 256
"""The longest chain of operations in one graph."""
_MAX_TEXT = 256
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""The tensor dtypes a plan may hold (as constants, layer tensors or in its tensor table), by
the name the manifest and ``x.to("...")`` use: one table for expressions and plan files."""
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ExpressionError(SurgeryError, ValueError):
    """An expression that cannot be built, read or evaluated; the message names the node.

    ``field`` names where it sits in a plan (``steps.3.layer.config.expr``) when known.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- parameters
#
# A parameter's kind says which JSON values it takes; ``_check`` is the whole parser of
# parameters, used both when an expression is built in Python and when a graph is read.


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


_EINSUM = re.compile(r"^[a-zA-Z ,.\->]{1,128}$")
_PATTERN = re.compile(r"^[a-zA-Z0-9_ ()\.\->]{1,256}$")
_REDUCTIONS = ("mean", "sum", "max", "min", "prod")


def _int_list(value: Any, shortest: int, longest: int = 16) -> bool:
    return (
        isinstance(value, (list, tuple))
        and shortest <= len(value) <= longest
        and all(is_int(v) for v in value)
    )


def _axis_sizes(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) <= 16
        and all(isinstance(k, str) and k.isidentifier() and is_int(v) for k, v in value.items())
    )


def _slice_bounds(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 3
        and all(v is None or is_int(v) for v in item)
        and (item[2] is None or item[2] > 0)
    )


def check_param(kind: str, value: Any) -> Any:
    """``value`` as parameter kind ``kind`` (JSON form), or ``TypeError`` saying what it takes."""
    if kind == "int" and is_int(value):
        return value
    if kind == "int?" and (value is None or is_int(value)):
        return value
    if kind == "ints" and _int_list(value, 0):
        return list(value)
    if kind == "dims" and (value is None or is_int(value)):
        return value
    if kind == "dims" and _int_list(value, 1):
        return list(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "number" and is_number(value):
        return value
    if kind == "number?" and (value is None or is_number(value)):
        return value
    if kind == "dtype":
        if isinstance(value, torch.dtype) and value in DTYPE_NAMES:
            return DTYPE_NAMES[value]
        if isinstance(value, str) and value in DTYPES:
            return value
        raise ArgumentTypeError(f"a dtype: one of {', '.join(DTYPES)}; got {value!r}")
    if kind == "equation" and isinstance(value, str) and _EINSUM.match(value):
        return value
    if kind == "pattern" and isinstance(value, str) and _PATTERN.match(value):
        return value
    if kind == "reduction" and value in _REDUCTIONS:
        return value
    if kind == "sizes" and _axis_sizes(value):
        return dict(value)
    if kind == "key" and isinstance(value, str) and 0 < len(value) <= _MAX_TEXT:
        return value
    if kind == "key?" and (value is None or (isinstance(value, str) and 0 < len(value) <= 256)):
        return value
    if kind == "index":
        return _check_index(value)
    wanted = {
        "int": "an int",
        "int?": "an int or None",
        "ints": "a list of at most 16 ints",
        "dims": "an int, a list of ints or None",
        "bool": "True or False",
        "number": "a finite number",
        "number?": "a finite number or None",
        "equation": "an einsum equation (letters, ',', '->', '...')",
        "pattern": "an einops pattern (names, spaces, parentheses, '->', '...')",
        "reduction": f"one of {', '.join(_REDUCTIONS)}",
        "sizes": "a mapping of axis names to ints",
        "key": f"a non-empty string of at most {_MAX_TEXT} characters",
        "key?": "None or a non-empty string",
    }.get(kind, kind)
    raise ArgumentTypeError(f"takes {wanted}, got {value!r}")


def _check_index(value: Any) -> list[Any]:
    """An index's JSON entries: ints, ``{"slice": [a, b, c]}``, ``{"list": [...]}``, ``"..."``,
    ``None`` (a new axis) and ``{"arg": k}`` (the node's k-th tensor argument)."""
    if not isinstance(value, list) or len(value) > 16:
        raise ArgumentTypeError(f"takes a list of at most 16 index entries, got {value!r}")
    for entry in value:
        if entry is None or entry == "..." or is_int(entry):
            continue
        if isinstance(entry, dict) and len(entry) == 1:
            ((name, item),) = entry.items()
            if name == "slice" and _slice_bounds(item):
                continue
            if name == "list" and _int_list(item, 1, 1 << 16):
                continue
            if name == "arg" and is_int(item) and 1 <= item <= 16:
                continue
        raise ArgumentTypeError(
            f"index entry {entry!r} is not an int, a slice, a list of ints, '...', None or a "
            "tensor expression"
        )
    if sum(e == "..." for e in value) > 1:
        raise ArgumentTypeError("an index has at most one '...'")
    return value


def torch_index(entries: list[Any], tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    out: list[Any] = []
    for e in entries:
        if e == "...":
            out.append(Ellipsis)
        elif isinstance(e, dict):
            if "slice" in e:
                out.append(slice(*e["slice"]))
            elif "list" in e:
                out.append(list(e["list"]))
            else:
                out.append(tensors[e["arg"]])
        else:
            out.append(e)
    return tuple(out)


# --------------------------------------------------------------------------- the allow-list


@dataclass(frozen=True)
class Op:
    """An allowed operation: how many tensor arguments, which parameters, and its function.

    ``arity`` is the number of tensor (expression) arguments, ``-1`` for one or more
    (``cat``, ``stack``, ``einsum``). ``params`` are ``(name, kind, default)`` in the order
    positional Python arguments fill them (``x.sum(-1)`` is ``dim=-1``); a default of
    ``REQUIRED`` must be given. ``fn(*tensors, **params)`` computes the node.
    """

    name: str
    arity: int
    fn: Callable[..., Any]
    params: tuple[tuple[str, str, Any], ...] = ()
    method: bool = True
    """Whether expressions have it as a method (``x.sum()``); else only in ``ts.ops``."""


REQUIRED = object()
OPS: dict[str, Op] = {}


def _op(name: str, arity: int, fn: Callable[..., Any], *params: Any, method: bool = True) -> None:
    OPS[name] = Op(name, arity, fn, tuple(params), method)


_DIM = ("dim", "int", REQUIRED)
_KEEPDIM = ("keepdim", "bool", False)
_DIMS = ("dim", "dims", None)

# operators (``x + y``, ``x[...]``, ``-x``): not methods by these names
for _name, _fn in {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "truediv": torch.true_divide,
    "floordiv": torch.floor_divide,
    "mod": torch.remainder,
    "pow": torch.pow,
    "matmul": torch.matmul,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "eq": torch.eq,
    "ne": torch.ne,
    "and": torch.bitwise_and,
    "or": torch.bitwise_or,
    "xor": torch.bitwise_xor,
}.items():
    _op(_name, 2, _fn, method=False)
_op("neg", 1, torch.neg, method=False)
_op("invert", 1, torch.bitwise_not, method=False)
_op(
    "getitem",
    -1,
    lambda x, *ts, index: x[torch_index(index, (x, *ts))],
    ("index", "index", REQUIRED),
    method=False,
)
_op("item_of", 1, lambda x, i: x[i], ("i", "int", REQUIRED), method=False)

# reductions
for _name, _fn in {
    "sum": torch.sum,
    "mean": torch.mean,
    "amax": torch.amax,
    "amin": torch.amin,
}.items():
    _op(
        _name,
        1,
        (lambda f: lambda x, dim, keepdim: f(x) if dim is None else f(x, dim, keepdim))(_fn),
        _DIMS,
        _KEEPDIM,
    )
_op(
    "logsumexp",
    1,
    lambda x, dim, keepdim: torch.logsumexp(x, dim, keepdim),
    ("dim", "dims", REQUIRED),
    _KEEPDIM,
)
_op(
    "norm",
    1,
    lambda x, p, dim, keepdim: torch.linalg.vector_norm(x, p, dim, keepdim),
    ("p", "number", 2),
    _DIMS,
    _KEEPDIM,
)
_op(
    "var",
    1,
    lambda x, dim, keepdim, correction: torch.var(x, dim, correction=correction, keepdim=keepdim),
    _DIMS,
    _KEEPDIM,
    ("correction", "int", 1),
)
_op(
    "std",
    1,
    lambda x, dim, keepdim, correction: torch.std(x, dim, correction=correction, keepdim=keepdim),
    _DIMS,
    _KEEPDIM,
    ("correction", "int", 1),
)
_op(
    "argmax",
    1,
    lambda x, dim, keepdim: torch.argmax(x, dim, keepdim),
    ("dim", "int?", None),
    _KEEPDIM,
)
_op(
    "argmin",
    1,
    lambda x, dim, keepdim: torch.argmin(x, dim, keepdim),
    ("dim", "int?", None),
    _KEEPDIM,
)
_op(
    "topk",
    1,
    lambda x, k, dim, largest: torch.topk(x, k, dim, largest),
    ("k", "int", REQUIRED),
    ("dim", "int", -1),
    ("largest", "bool", True),
)
_op("cumsum", 1, lambda x, dim: torch.cumsum(x, dim), _DIM)
_op("softmax", 1, lambda x, dim: torch.softmax(x, dim), _DIM)
_op("log_softmax", 1, lambda x, dim: torch.log_softmax(x, dim), _DIM)

# elementwise
for _name, _fn in {
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "sign": torch.sign,
    "square": torch.square,
    "isnan": torch.isnan,
    "detach": torch.detach,
    "float": lambda x: x.float(),
    "logical_not": torch.logical_not,
}.items():
    _op(_name, 1, _fn)
_op(
    "clamp",
    1,
    lambda x, min, max: torch.clamp(x, min, max),
    ("min", "number?", None),
    ("max", "number?", None),
)
_op("gather", 2, lambda x, index, dim: torch.gather(x, dim, index), _DIM)
_op("to", 1, lambda x, dtype: x.to(DTYPES[dtype]), ("dtype", "dtype", REQUIRED))
_op("type_as", 2, lambda x, other: x.to(other.dtype))

# shapes
_op("unsqueeze", 1, lambda x, dim: x.unsqueeze(dim), _DIM)
_op("squeeze", 1, lambda x, dim: x.squeeze() if dim is None else x.squeeze(dim), _DIMS)
_op("reshape", 1, lambda x, shape: x.reshape(shape), ("shape", "ints", REQUIRED))
_op(
    "flatten",
    1,
    lambda x, start_dim, end_dim: x.flatten(start_dim, end_dim),
    ("start_dim", "int", 0),
    ("end_dim", "int", -1),
)
_op(
    "transpose",
    1,
    lambda x, dim0, dim1: x.transpose(dim0, dim1),
    ("dim0", "int", REQUIRED),
    ("dim1", "int", REQUIRED),
)
_op("permute", 1, lambda x, dims: x.permute(dims), ("dims", "ints", REQUIRED))
_op("expand", 1, lambda x, sizes: x.expand(sizes), ("sizes", "ints", REQUIRED))
_op("flip", 1, lambda x, dims: x.flip(dims), ("dims", "ints", REQUIRED))
_op("zeros_like", 1, torch.zeros_like)
_op("ones_like", 1, torch.ones_like)
_op("full_like", 1, lambda x, value: torch.full_like(x, value), ("value", "number", REQUIRED))


def _rearrange(x: torch.Tensor, pattern: str, sizes: dict[str, int]) -> torch.Tensor:
    import einops

    return einops.rearrange(x, pattern, **sizes)


def _reduce(x: torch.Tensor, pattern: str, reduction: str, sizes: dict[str, int]) -> torch.Tensor:
    import einops

    return einops.reduce(x, pattern, reduction, **sizes)


# ``ts.ops`` functions
_op("where", 3, torch.where, method=False)
_op("maximum", 2, torch.maximum, method=False)
_op("minimum", 2, torch.minimum, method=False)
_op("outer", 2, torch.outer, method=False)
_op("cat", -1, lambda *ts, dim: torch.cat(ts, dim), ("dim", "int", 0), method=False)
_op("stack", -1, lambda *ts, dim: torch.stack(ts, dim), ("dim", "int", 0), method=False)
_op(
    "einsum",
    -1,
    lambda *ts, equation: torch.einsum(equation, *ts),
    ("equation", "equation", REQUIRED),
    method=False,
)
_op(
    "cosine_similarity",
    2,
    lambda a, b, dim, eps: torch.nn.functional.cosine_similarity(a, b, dim, eps),
    ("dim", "int", -1),
    ("eps", "number", 1e-8),
    method=False,
)
_op(
    "rearrange",
    1,
    _rearrange,
    ("pattern", "pattern", REQUIRED),
    ("sizes", "sizes", {}),
    method=False,
)
_op(
    "reduce",
    1,
    _reduce,
    ("pattern", "pattern", REQUIRED),
    ("reduction", "reduction", REQUIRED),
    ("sizes", "sizes", {}),
    method=False,
)

# the leaves: not operations on values, but nodes of the graph all the same
LEAVES: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "here": (),
    "saved": (("key", "key", REQUIRED), ("run", "key?", None), ("call", "int?", None)),
    "out": (("entry", "key", REQUIRED),),
    "input": (("name", "key", REQUIRED),),
    "const": (("value", "number", None), ("tensor", "int?", None), ("bool", "bool", False)),
}
_CALL_PARAMS = (("path", "key", REQUIRED),)


def params_of(op: str) -> tuple[tuple[str, str, Any], ...]:
    if op in LEAVES:
        return LEAVES[op]
    if op == "call":
        return _CALL_PARAMS
    return OPS[op].params


def check_path(path: str) -> None:
    if not isinstance(path, str) or not 0 < len(path) <= 1024:
        raise ExpressionError(f"ts.call: a path is a non-empty string, got {path!r}")
    for segment in path.split("."):
        if not segment or not segment.isprintable() or any(c.isspace() for c in segment):
            raise ExpressionError(f"ts.call: bad path {path!r}")


def nearest(name: str, methods: bool = False) -> str:
    import difflib

    names = [n for n, op in OPS.items() if op.method or not methods]
    close = difflib.get_close_matches(str(name)[:64], names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return hint + f"allowed: {', '.join(sorted(names))}"
