"""Expressions: tensor math as data — what a plan computes where it runs.

A plan that can only insert fixed layers leaves every computation on the client: the
projection of an activation on a direction, a value moved from one site to another, a
logit difference, the logit lens. NNsight ships the Python code for these; a plan ships an
*expression graph* instead, built here with ordinary Python syntax and checked before it
runs.

**Values** (the leaves): ``ts.here`` is the tensor the layer acts on; ``ts.saved(key)`` the
value a ``Save(key)`` recorded earlier in the same forward pass (``run=`` names an earlier
run of a session, ``call=`` one of several calls); ``ts.out(entry)`` an entry of the model's
output (``"logits"``, ``"output.0"``), known only after the forward pass, so for
``plan.returning(...)``; tensors and Python numbers are constants.

**Operations** are nodes, never Python callables: arithmetic and comparison operators,
``@``, indexing (ints, slices, lists of ints, ``...``, ``None`` and expressions), the tensor
methods of the allow-list (``x.sum(-1)``, ``x.softmax(-1)``, ``x.to("float32")``) and the
functions of ``ts.ops`` (``where``, ``einsum``, ``rearrange``, ...). ``ts.call(path, x)``
calls the module at ``path`` *of the base model* (on the host: on the host's weights).

An expression is immutable, and each node is checked when it is built, by the same code
that checks a graph read from the wire (:mod:`torchsurgeon.layers.allowed`). Its serial
form, parser and evaluator are :mod:`torchsurgeon.layers.graph`; shapes and dtypes are
checked by evaluating the graph on meta tensors, which a host does before it queues a
request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchsurgeon.layers.allowed import (
    DTYPE_NAMES,
    LEAVES,
    MAX_DEPTH,
    OPS,
    REQUIRED,
    ExpressionError,
    check_param,
    check_path,
    is_int,
    is_number,
    nearest,
    params_of,
)
from torchsurgeon.layers.index import Index
from torchsurgeon.surgery.errors import ArgumentTypeError

__all__ = [
    "Expr",
    "as_expr",
    "call",
    "describe",
    "here",
    "input",
    "make",
    "method",
    "out",
    "saved",
]


# --------------------------------------------------------------------------- expressions


class Expr:
    """One node of an expression: an op, its argument expressions and its parameters.

    Build expressions from ``ts.here``, ``ts.saved``, ``ts.out``, ``ts.call`` and ``ts.ops``
    with Python operators and methods; they are immutable. ``==`` builds a comparison node
    (as on tensors), so compare expressions as data by their graphs
    (``Graph.of(a).same_as(Graph.of(b))``). An expression has
    no truth value: write a data-dependent choice as ``ts.ops.where(cond, a, b)``.
    """

    __slots__ = ("args", "depth", "op", "params", "tensor")

    def __init__(
        self,
        op: str,
        args: Sequence[Expr] = (),
        params: Mapping[str, Any] | None = None,
        tensor: torch.Tensor | None = None,
    ) -> None:
        if op not in OPS and op not in LEAVES and op != "call":
            raise ExpressionError(f"unknown operation {op!r}; {nearest(op)}")
        depth = 1 + max((a.depth for a in args), default=0)
        if depth > MAX_DEPTH:
            raise ExpressionError(f"the expression is {depth} operations deep, over {MAX_DEPTH}")
        for name, value in (
            ("op", op),
            ("args", tuple(args)),
            ("params", dict(params or {})),
            ("tensor", tensor),
            ("depth", depth),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an expression is immutable; build a new one")

    def __bool__(self) -> bool:
        raise ExpressionError(
            "an expression has no truth value until it runs; write a data-dependent choice "
            "as ts.ops.where(condition, if_true, if_false)"
        )

    __hash__ = object.__hash__

    # -- operators ------------------------------------------------------------------
    def _bin(self, name: str, other: Any, reverse: bool = False) -> Expr:
        other = as_expr(other)
        return Expr(name, (other, self) if reverse else (self, other))

    def __add__(self, o: Any) -> Expr:
        return self._bin("add", o)

    def __radd__(self, o: Any) -> Expr:
        return self._bin("add", o, True)

    def __sub__(self, o: Any) -> Expr:
        return self._bin("sub", o)

    def __rsub__(self, o: Any) -> Expr:
        return self._bin("sub", o, True)

    def __mul__(self, o: Any) -> Expr:
        return self._bin("mul", o)

    def __rmul__(self, o: Any) -> Expr:
        return self._bin("mul", o, True)

    def __truediv__(self, o: Any) -> Expr:
        return self._bin("truediv", o)

    def __rtruediv__(self, o: Any) -> Expr:
        return self._bin("truediv", o, True)

    def __floordiv__(self, o: Any) -> Expr:
        return self._bin("floordiv", o)

    def __mod__(self, o: Any) -> Expr:
        return self._bin("mod", o)

    def __pow__(self, o: Any) -> Expr:
        return self._bin("pow", o)

    def __rpow__(self, o: Any) -> Expr:
        return self._bin("pow", o, True)

    def __matmul__(self, o: Any) -> Expr:
        return self._bin("matmul", o)

    def __rmatmul__(self, o: Any) -> Expr:
        return self._bin("matmul", o, True)

    def __lt__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("lt", o)

    def __le__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("le", o)

    def __gt__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("gt", o)

    def __ge__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("ge", o)

    def __eq__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("eq", o)

    def __ne__(self, o: Any) -> Expr:  # type: ignore[override]
        return self._bin("ne", o)

    def __and__(self, o: Any) -> Expr:
        return self._bin("and", o)

    def __or__(self, o: Any) -> Expr:
        return self._bin("or", o)

    def __xor__(self, o: Any) -> Expr:
        return self._bin("xor", o)

    def __neg__(self) -> Expr:
        return Expr("neg", (self,))

    def __invert__(self) -> Expr:
        return Expr("invert", (self,))

    def __abs__(self) -> Expr:
        return Expr("abs", (self,))

    def __getitem__(self, key: Any) -> Expr:
        entries = key.entries if isinstance(key, Index) else key
        entries = entries if isinstance(entries, tuple) else (entries,)
        json_entries: list[Any] = []
        tensors: list[Expr] = []
        for entry in entries:
            if isinstance(entry, (Expr, torch.Tensor)):
                tensors.append(as_expr(entry))
                json_entries.append({"arg": len(tensors)})
            elif entry is Ellipsis:
                json_entries.append("...")
            elif isinstance(entry, slice):
                json_entries.append({"slice": [entry.start, entry.stop, entry.step]})
            elif isinstance(entry, (list, tuple)):
                json_entries.append({"list": list(entry)})
            else:
                json_entries.append(entry)
        return make("getitem", (self, *tensors), {"index": json_entries})

    @property
    def values(self) -> Expr:
        """The values of a ``topk`` (its element 0)."""
        return make("item_of", (self,), {"i": 0})

    @property
    def indices(self) -> Expr:
        """The indices of a ``topk`` (its element 1)."""
        return make("item_of", (self,), {"i": 1})

    def __getattr__(self, name: str) -> Callable[..., Expr]:
        op = OPS.get(name)
        if op is None or not op.method:
            raise AttributeError(
                f"expressions have no method {name!r}; {nearest(name, methods=True)}"
            )
        return lambda *args, **kwargs: method(name, self, *args, **kwargs)

    def __iter__(self) -> Any:
        raise ArgumentTypeError("an expression is not iterable; index it (x[0]) instead")

    def __repr__(self) -> str:
        return f"ts.expr({describe(self)})"


_INFIX = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
    "pow": "**", "matmul": "@", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==",
    "ne": "!=", "and": "&", "or": "|", "xor": "^",
}  # fmt: skip


def describe(expr: Expr, depth: int = 0) -> str:
    """The expression as Python-like text: ``(here - ((here @ <tensor [64]>)[..., None]))``.

    Deep expressions are cut short (``...``) so a message quoting one stays readable.
    """
    if depth > 12:
        return "..."
    op, params = expr.op, expr.params
    args = [describe(a, depth + 1) for a in expr.args]
    if op == "here":
        return "here"
    if op == "const":
        if expr.tensor is not None:
            return f"<tensor {list(expr.tensor.shape)} {DTYPE_NAMES.get(expr.tensor.dtype)}>"
        return repr(bool(params["value"]) if params["bool"] else params["value"])
    if op in _INFIX:
        return f"({args[0]} {_INFIX[op]} {args[1]})"
    if op in ("neg", "invert"):
        return f"{'-' if op == 'neg' else '~'}{args[0]}"
    if op == "getitem":
        return f"{args[0]}[{_index_text(params['index'], args)}]"
    if op == "item_of":
        return f"{args[0]}.{('values', 'indices')[params['i']] if params['i'] < 2 else params['i']}"
    shown = [f"{k}={v!r}" for k, v in params.items() if v is not None and k != "bool"]
    if op in ("saved", "out", "input"):
        first, *rest = shown
        return f"{op}({first.split('=', 1)[1]}{''.join(', ' + r for r in rest)})"
    if op == "call":
        return f"call({params['path']!r}, {', '.join(args)})"
    if OPS[op].method:
        return f"{args[0]}.{op}({', '.join([*args[1:], *shown])})"
    return f"ops.{op}({', '.join([*args, *shown])})"


def _index_text(entries: list[Any], args: list[str]) -> str:
    parts = []
    for e in entries:
        if e == "...":
            parts.append("...")
        elif isinstance(e, dict) and "slice" in e:
            a, b, c = ("" if v is None else str(v) for v in e["slice"])
            parts.append(f"{a}:{b}" + (f":{c}" if c else ""))
        elif isinstance(e, dict) and "list" in e:
            parts.append(str(e["list"]))
        elif isinstance(e, dict):
            parts.append(args[e["arg"]])
        else:
            parts.append(str(e))
    return ", ".join(parts)


def make(op: str, args: Sequence[Any], params: Mapping[str, Any]) -> Expr:
    """A checked node: ``args`` turned into expressions, ``params`` checked by kind."""
    spec = params_of(op)
    checked: dict[str, Any] = {}
    known = {name for name, _, _ in spec}
    for name in params:
        if name not in known:
            raise ExpressionError(
                f"{op}: unknown parameter {name!r}; it takes {sorted(known) or 'none'}"
            )
    for name, kind, default in spec:
        value = params.get(name, default)
        if value is REQUIRED:
            raise ExpressionError(f"{op}: parameter {name!r} is required")
        try:
            checked[name] = check_param(kind, value) if value is not None or "?" in kind else None
        except TypeError as error:
            raise ExpressionError(f"{op}: {name} {error}") from None
    exprs = tuple(as_expr(a) for a in args)
    arity = OPS[op].arity if op in OPS else (len(exprs) if op == "call" else 0)
    if (arity == -1 and not exprs) or (arity >= 0 and len(exprs) != arity and op != "getitem"):
        raise ExpressionError(
            f"{op} takes {'one or more' if arity == -1 else arity} tensor argument(s), got "
            f"{len(exprs)}"
        )
    return Expr(op, exprs, checked)


def method(name: str, *args: Any, **kwargs: Any) -> Expr:
    """``name(*args, **kwargs)`` as a node: leading expressions/tensors are its tensor
    arguments (``arity`` of them), the rest fill its parameters in order."""
    op = OPS.get(name)
    if op is None:
        raise ExpressionError(f"unknown operation {name!r}; {nearest(name)}")
    if op.arity == -1:
        split = len(args)
        for i, a in enumerate(args):
            if not isinstance(a, (Expr, torch.Tensor)):
                split = i
                break
        tensors, rest = args[:split], args[split:]
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
    else:
        tensors, rest = args[: op.arity], args[op.arity :]
    if name == "gather" and len(args) == 3 and is_int(args[1]):  # torch's order: (dim, index)
        return make("gather", (args[0], args[2]), {"dim": args[1]})
    if name == "to" and rest and isinstance(rest[0], (Expr, torch.Tensor)):
        return make("type_as", (*tensors, rest[0]), {})
    if name in ("reshape", "permute", "expand", "flip") and rest and is_int(rest[0]):
        rest = (list(rest),)  # x.reshape(2, 3) as well as x.reshape((2, 3))
    names = [p[0] for p in op.params]
    if len(rest) > len(names):
        raise ExpressionError(f"{name} takes at most {len(names)} parameter(s) {names}")
    params = dict(zip(names, rest, strict=False))
    for key, value in kwargs.items():
        if key in params:
            raise ExpressionError(f"{name}: parameter {key!r} given twice")
        params[key] = value
    return make(name, tensors, params)


def as_expr(value: Any) -> Expr:
    """``value`` as an expression: itself, or a constant (a tensor or a Python number)."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, torch.Tensor):
        if value.dtype not in DTYPE_NAMES:
            raise ExpressionError(f"a constant tensor of dtype {value.dtype} cannot travel")
        return Expr("const", (), {"value": None, "tensor": None, "bool": False}, value)
    if isinstance(value, bool):
        return Expr("const", (), {"value": int(value), "tensor": None, "bool": True})
    if is_number(value):
        return Expr("const", (), {"value": value, "tensor": None, "bool": False})
    raise ExpressionError(
        f"{type(value).__name__} ({value!r}) is not an expression, a tensor or a number"
    )


here = Expr("here")
"""The tensor the layer holding the expression acts on."""


def saved(key: str, *, run: str | None = None, call: int | None = None) -> Expr:
    """The value ``Save(key)`` recorded: earlier in this forward pass, or in run ``run`` of
    a session. ``call`` picks one of several calls (``-1``: the last); by default a layer
    reads the latest call and ``returning`` the only one."""
    return make("saved", (), {"key": key, "run": run, "call": call})


def out(entry: str) -> Expr:
    """An entry of the model's output (``"logits"``, ``"output.0"``), after the forward."""
    return make("out", (), {"entry": entry})


def input(name: str) -> Expr:
    """An input of the run's model call: a keyword argument (``"attention_mask"``), or a
    positional one by its parameter name (``"input_ids"``) or position (``"args.0"``)."""
    return make("input", (), {"name": name})


def call(path: str, *args: Any) -> Expr:
    """The base model's module at ``path`` called on ``args`` (e.g. the final norm)."""
    if not args:
        raise ExpressionError(f"ts.call({path!r}) needs at least one argument")
    check_path(path)
    return make("call", args, {"path": path})
