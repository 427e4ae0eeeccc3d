"""Expression graphs: the serial form of an expression, its parser and its evaluator.

A :class:`Graph` lists an expression's nodes in topological order, each ``(op, args,
params)`` with ``args`` the indices of earlier nodes — so a value used twice is one node, a
graph is checked in one pass without recursion, and it cannot have a cycle — and numbers
its tensor constants for its owner (a layer's buffers, a plan's tensor table).
:meth:`Graph.from_json` is what a host runs on untrusted input: the op of every node is
looked up in the allow-list (:mod:`torchsurgeon.layers.allowed`, optionally narrowed), its
parameters checked by kind, its arguments counted, the node count and depth bounded.
:meth:`Graph.evaluate` is a loop over the nodes calling the allow-list's functions, with the
run's values (:class:`RunValues`) for ``ts.saved``, ``ts.out`` and ``ts.call``; it traces
under ``torch.compile(fullgraph=True)`` with no graph break.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchsurgeon.layers.allowed import (
    DTYPE_NAMES,
    LEAVES,
    MAX_DEPTH,
    MAX_NODES,
    OPS,
    REQUIRED,
    ExpressionError,
    check_param,
    check_path,
    is_int,
    nearest,
    params_of,
)
from torchsurgeon.layers.expr import Expr, as_expr
from torchsurgeon.layers.guards import (
    cancelled_by,
    current_deadline,
    current_guard,
    deadline,
    run_guard,
)
from torchsurgeon.surgery.errors import PathError
from torchsurgeon.surgery.paths import get_at

__all__ = [
    "Graph",
    "RunValues",
    "cancelled_by",
    "current_deadline",
    "current_guard",
    "deadline",
    "device_of",
    "run_guard",
]


# --------------------------------------------------------------------------- graphs


@dataclass(frozen=True)
class RunValues:
    """What an expression can read while it runs (every field optional).

    ``records`` are this run's recorded tensors by key; ``runs`` the records of earlier
    runs of a session, by run name; ``output`` the model's output (after the forward);
    ``model`` the base model whose modules ``ts.call`` calls.
    """

    records: Mapping[str, Sequence[torch.Tensor]] | None = None
    runs: Mapping[str, Mapping[str, Sequence[torch.Tensor]]] | None = None
    output: Any = None
    has_output: bool = False
    model: Any = None
    inputs: Mapping[str, Any] | None = None
    """The model call's arguments by name (``"input_ids"``, ``"args.0"``, keywords)."""
    device: torch.device | None = None
    """Where the run's tensors are: a graph's own constants (a computed return's, a loss's)
    are moved there; a layer's constants are its buffers, already beside its site."""
    modules: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Graph:
    """An expression in serial form: nodes in topological order, the last one the result.

    ``nodes[i]`` is ``(op, args, params)`` with ``args`` indices of earlier nodes and
    ``params`` JSON values; ``tensors`` are the tensor constants, which ``const`` nodes
    name by position.
    """

    nodes: tuple[tuple[str, tuple[int, ...], tuple[tuple[str, Any], ...]], ...]
    tensors: tuple[torch.Tensor, ...] = ()

    @classmethod
    def of(cls, expr: Expr) -> Graph:
        """The graph of ``expr`` (shared sub-expressions become one node)."""
        index: dict[int, int] = {}
        nodes: list[tuple[str, tuple[int, ...], tuple[tuple[str, Any], ...]]] = []
        tensors: list[torch.Tensor] = []
        tensor_index: dict[int, int] = {}  # one tensor used twice is one constant
        stack: list[tuple[Expr, bool]] = [(as_expr(expr), False)]
        while stack:  # iterative post-order: no recursion limit on deep expressions
            node, ready = stack.pop()
            if id(node) in index:
                continue
            if not ready:
                stack.append((node, True))
                stack.extend((a, False) for a in reversed(node.args) if id(a) not in index)
                continue
            params = dict(node.params)
            if node.tensor is not None:
                if id(node.tensor) not in tensor_index:
                    tensor_index[id(node.tensor)] = len(tensors)
                    tensors.append(node.tensor.detach())
                params["tensor"] = tensor_index[id(node.tensor)]
            nodes.append((node.op, tuple(index[id(a)] for a in node.args), tuple(params.items())))
            index[id(node)] = len(nodes) - 1
            if len(nodes) > MAX_NODES:
                raise ExpressionError(f"the expression has over {MAX_NODES} nodes")
        return cls(tuple(nodes), tuple(tensors))

    def same_as(self, other: Graph) -> bool:
        """Equal as data: the same nodes and parameters, and equal constants."""
        return (
            self.nodes == other.nodes
            and len(self.tensors) == len(other.tensors)
            and all(
                a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                for a, b in zip(self.tensors, other.tensors, strict=True)
            )
        )

    def expr(self) -> Expr:
        """The graph as an expression again."""
        built: list[Expr] = []
        for op, args, params in self.nodes:
            p = dict(params)
            tensor = (
                self.tensors[p["tensor"]] if op == "const" and p["tensor"] is not None else None
            )
            if tensor is not None:
                p["tensor"] = None
            built.append(Expr(op, tuple(built[a] for a in args), p, tensor))
        return built[-1]

    # -- JSON -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [
                {"op": op, "args": list(args), "params": dict(params)}
                for op, args, params in self.nodes
            ]
        }

    @classmethod
    def from_json(
        cls,
        data: Any,
        tensors: Sequence[torch.Tensor],
        *,
        allowed: frozenset[str] | None = None,
        max_nodes: int = MAX_NODES,
    ) -> Graph:
        """Parse untrusted JSON; :class:`ExpressionError` naming the node at the first problem.

        ``allowed`` narrows :data:`OPS` (leaves and ``call`` are allowed unless it is given
        and omits ``"call"``); ``tensors`` are the constants ``const`` nodes may name.
        """
        if not isinstance(data, dict) or set(data) != {"nodes"}:
            raise ExpressionError('an expression is {"nodes": [...]}')
        raw = data["nodes"]
        if not isinstance(raw, list) or not raw:
            raise ExpressionError("an expression has a non-empty list of nodes")
        if len(raw) > max_nodes:
            raise ExpressionError(f"{len(raw)} nodes, over the limit of {max_nodes}")
        nodes = []
        depth: list[int] = []
        used_tensors: set[int] = set()
        for i, node in enumerate(raw):
            where = f"node {i}"
            if not isinstance(node, dict) or set(node) != {"op", "args", "params"}:
                raise ExpressionError(f'{where}: a node is {{"op", "args", "params"}}')
            op, args, params = node["op"], node["args"], node["params"]
            if not isinstance(op, str) or (op not in OPS and op not in LEAVES and op != "call"):
                raise ExpressionError(f"{where}: unknown operation {str(op)[:64]!r}; {nearest(op)}")
            if allowed is not None and op not in LEAVES and op not in allowed:
                raise ExpressionError(
                    f"{where}: operation {op!r} is not allowed on this host; allowed: "
                    f"{', '.join(sorted(allowed))}"
                )
            if not isinstance(args, list) or not all(is_int(a) and 0 <= a < i for a in args):
                raise ExpressionError(f"{where}: args are indices of earlier nodes, got {args!r}")
            if len(args) > 64:
                raise ExpressionError(f"{where}: {len(args)} arguments, over 64")
            if not isinstance(params, dict):
                raise ExpressionError(f"{where}: params is an object")
            try:
                checked = _parse_node(op, args, params)
            except (ExpressionError, TypeError) as error:
                raise ExpressionError(f"{where} ({op}): {error}") from None
            if op == "const":
                t = checked["tensor"]
                if t is not None:
                    if not 0 <= t < len(tensors):
                        raise ExpressionError(f"{where}: names tensor {t}, which is not there")
                    used_tensors.add(t)
                elif checked["value"] is None:
                    raise ExpressionError(f"{where}: a constant has a value or a tensor")
            depth.append(1 + max((depth[a] for a in args), default=0))
            if depth[-1] > MAX_DEPTH:
                raise ExpressionError(f"{where}: the expression is over {MAX_DEPTH} deep")
            nodes.append((op, tuple(args), tuple(checked.items())))
        if len(used_tensors) != len(tensors):
            raise ExpressionError(f"{len(tensors) - len(used_tensors)} constant tensor(s) unused")
        return cls(tuple(nodes), tuple(tensors))

    # -- running --------------------------------------------------------------------
    def evaluate(
        self,
        here_value: Any = None,
        values: RunValues | None = None,
        tensors: Sequence[torch.Tensor] | None = None,
    ) -> Any:
        """The graph's value; :class:`ExpressionError` naming the node that failed.

        ``tensors`` replace the graph's constants (a layer passes its buffers, which move
        with ``.to()``).
        """
        values = values or _NOTHING
        constants = self.tensors if tensors is None else tensors
        device = values.device
        if device is not None and any(t.device != device for t in constants):
            constants = [t.to(device) for t in constants]
        results: list[Any] = []
        guard = current_guard()
        for i, (op, args, params) in enumerate(self.nodes):
            deadline = current_deadline()  # per node: a cancel from another thread counts
            if deadline is not None and time.monotonic() > deadline:
                raise ExpressionError(f"node {i}: the run went past its time limit")
            if guard is not None:
                guard()  # raises its own error (a host's memory watch)
            inputs = [results[a] for a in args]
            p = dict(params)
            try:
                results.append(_node(op, inputs, p, here_value, values, constants))
            except ExpressionError as error:
                raise ExpressionError(f"node {i} ({_show(op, p)}): {error}") from None
            except (RuntimeError, IndexError, TypeError, ValueError) as error:
                shapes = ", ".join(_shape(v) for v in inputs)
                raise ExpressionError(
                    f"node {i} ({_show(op, p)}) on ({shapes}) failed: {error}"
                ) from None
        return results[-1]

    def check_leaves(self, *, here: bool, output: bool) -> None:
        """Refuse ``ts.here`` where there is no tensor and ``ts.out`` before the output."""
        for i, (op, _, params) in enumerate(self.nodes):
            if op == "here" and not here:
                raise ExpressionError(
                    f"node {i}: ts.here is the tensor a layer acts on; a computed result has "
                    "none (read ts.saved(...) or ts.out(...))"
                )
            if op == "out" and not output:
                entry = dict(params)["entry"]
                raise ExpressionError(
                    f"node {i}: ts.out({entry!r}) is the model's output, known only after the "
                    "forward pass; read it in plan.returning(...), or read ts.saved(...) here"
                )

    def reads(self) -> set[str]:
        """The kinds of run values the graph reads: ``saved``, ``runs``, ``call``, ``out``."""
        kinds = set()
        for op, _, params in self.nodes:
            if op == "saved":
                kinds.add("runs" if dict(params)["run"] is not None else "saved")
            elif op == "input":
                kinds.add("saved")  # read from the run, like a saved value
            elif op in ("call", "out"):
                kinds.add(op)
        return kinds


_NOTHING = RunValues()


def device_of(*values: Any) -> torch.device | None:
    """The device of the first tensor found in ``values`` (outputs, records), if any."""
    stack = list(values)
    while stack:
        value = stack.pop(0)
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return None


def _node(
    op: str,
    inputs: list[Any],
    p: dict[str, Any],
    here_value: Any,
    values: RunValues,
    constants: Sequence[torch.Tensor],
) -> Any:
    if op == "here":
        if here_value is None:
            raise ExpressionError(
                "ts.here is the tensor a layer acts on; there is none here (use ts.saved or "
                "ts.out after a run)"
            )
        return here_value
    if op == "const":
        if p["tensor"] is not None:
            return constants[p["tensor"]]
        return bool(p["value"]) if p["bool"] else p["value"]
    if op == "saved":
        return _saved(values, p["key"], p["run"], p["call"])
    if op == "out":
        return _output_entry(values, p["entry"])
    if op == "input":
        return _input(values, p["name"])
    if op == "call":
        return _module(values, p["path"])(*inputs)
    return OPS[op].fn(*inputs, **p)


def _parse_node(op: str, args: list[int], params: dict[str, Any]) -> dict[str, Any]:
    spec = params_of(op)
    known = {name for name, _, _ in spec}
    unknown = set(params) - known
    if unknown:
        raise ExpressionError(
            f"unknown parameter(s) {sorted(unknown)[:4]}; it takes {sorted(known)}"
        )
    out: dict[str, Any] = {}
    for name, kind, default in spec:
        if name not in params:
            if default is REQUIRED:
                raise ExpressionError(f"parameter {name!r} is required")
            out[name] = default
            continue
        value = params[name]
        try:
            out[name] = (
                None
                if value is None and (default is None or "?" in kind)
                else check_param(kind, value)
            )
        except TypeError as error:
            raise ExpressionError(f"parameter {name!r} {error}") from None
    if op in LEAVES and args:
        raise ExpressionError("takes no arguments")
    if op == "call":
        check_path(out["path"])
        if not args:
            raise ExpressionError("takes at least one argument")
    elif op in OPS:
        arity = OPS[op].arity
        if op == "getitem":
            refs = [e["arg"] for e in out["index"] if isinstance(e, dict) and "arg" in e]
            if len(args) != 1 + len(refs) or sorted(refs) != list(range(1, len(args))):
                raise ExpressionError(
                    f"an index with {len(refs)} tensor entries takes {1 + len(refs)} "
                    f"arguments, numbered 1..{len(refs)}; got {len(args)}"
                )
        elif (arity == -1 and not args) or (arity >= 0 and len(args) != arity):
            raise ExpressionError(
                f"takes {'one or more' if arity == -1 else arity} argument(s), got {len(args)}"
            )
    return out


def _saved(values: RunValues, key: str, run: str | None, call: int | None) -> Any:
    if run is None:
        records = values.records
        if records is None:
            raise ExpressionError(
                f"ts.saved({key!r}) reads what this run recorded; call the model with ts.run"
            )
        where = "in this run so far"
    else:
        if values.runs is None or run not in values.runs:
            known = sorted(values.runs or ())
            raise ExpressionError(
                f"ts.saved({key!r}, run={run!r}): no earlier run of this session is named "
                f"{run!r}; earlier runs: {known or '(none)'}"
            )
        records = values.runs[run]
        where = f"in run {run!r}"
    found = records.get(key)
    if not found:
        known = sorted(k for k, v in records.items() if v)
        raise ExpressionError(
            f"ts.saved({key!r}): nothing was saved under {key!r} {where}; saved: "
            f"{known or '(nothing)'}. A Save({key!r}) must sit at a site that runs earlier"
        )
    if call is None:
        if values.has_output and len(found) > 1:  # after the run: which call is ambiguous
            raise ExpressionError(
                f"ts.saved({key!r}) was recorded {len(found)} times (once per call); pick one "
                f"with ts.saved({key!r}, call=i)"
            )
        return found[-1]
    if not -len(found) <= call < len(found):
        raise ExpressionError(f"ts.saved({key!r}, call={call}): recorded {len(found)} time(s)")
    return found[call]


def _output_entry(values: RunValues, entry: str) -> Any:
    if not values.has_output:
        raise ExpressionError(
            f"ts.out({entry!r}) is the model's output, known only after the forward pass"
        )
    output = values.output
    if entry == "output":
        return output
    if isinstance(output, Mapping) and entry in output and output[entry] is not None:
        return output[entry]
    if isinstance(output, (tuple, list)) and entry.startswith("output."):
        tail = entry[len("output.") :]
        if tail.isdigit() and int(tail) < len(output):
            return output[int(tail)]
    if isinstance(output, Mapping):
        known = ["output", *(str(k) for k, v in output.items() if v is not None)]
    elif isinstance(output, (tuple, list)):
        known = ["output", *(f"output.{i}" for i in range(len(output)))]
    else:
        known = ["output"]
    raise ExpressionError(f"ts.out({entry!r}): the output has no such entry; it has {known}")


def _input(values: RunValues, name: str) -> Any:
    inputs = values.inputs
    if inputs is None:
        raise ExpressionError(f"ts.input({name!r}) reads the run's inputs; run with ts.run")
    if name not in inputs:
        raise ExpressionError(
            f"ts.input({name!r}): the call has no such input; it has {sorted(inputs)}"
        )
    return inputs[name]


def _module(values: RunValues, path: str) -> Callable[..., Any]:
    found = values.modules.get(path)
    if found is not None:
        return found
    model = values.model
    if model is None:
        raise ExpressionError(f"ts.call({path!r}) calls a module of the model; run with ts.run")
    try:
        module = get_at(model, path)
    except PathError as error:
        raise ExpressionError(f"ts.call({path!r}): {error.args[0]}") from None
    values.modules[path] = module
    return module


def _show(op: str, params: dict[str, Any]) -> str:
    if op == "saved":
        return f"ts.saved({params['key']!r})"
    if op in ("out", "call", "input"):
        return f"ts.{op}({next(iter(params.values()))!r})"
    return op


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {DTYPE_NAMES.get(value.dtype, value.dtype)}"
    return type(value).__name__
