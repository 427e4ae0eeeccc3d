"""Running a rewritten model and reading what it recorded: ``ts.run`` and ``ts.Result``.

Calling a rewritten model is plain PyTorch: edits apply and nothing is kept. ``ts.run``
calls it with its recording layers switched on and hands back the output with everything
they recorded, by key. It takes the model, a compiled model, or a bound method such as
``model.generate`` (every generation step is recorded, in order). Given ``backend=``, the
same call runs elsewhere — e.g. on a remote host through ``ts.remote.Client`` — and returns
the same kind of :class:`Result`.

Each run owns its records. A run's state — its record lists, call counters, gradient sites
and values — lives in a context of its own, keyed by layer identity
(:mod:`torchsurgeon.layers.run_state`), never on the layers: trees that share layers, a
``ts.run`` nested in another, and other threads running the same model record side by side.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import InterventionLayer, Recorder
from torchsurgeon.layers.compute import StopRun
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.graph import Graph, RunValues, device_of
from torchsurgeon.layers.guards import running
from torchsurgeon.layers.run_state import LayerRun, RunContext
from torchsurgeon.surgery.errors import (
    ArgumentTypeError,
    KeyNotFoundError,
    SelectionError,
    SurgeryError,
    nearest_note,
)
from torchsurgeon.surgery.frozen import is_frozen
from torchsurgeon.surgery.lineage import lineage_of
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.tokenized import tokenized

__all__ = ["Backend", "Result", "Saved", "run", "run_with"]

_RUN_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, InterventionLayer], ...]] = (
    weakref.WeakKeyDictionary()
)


class Saved(Mapping[str, torch.Tensor]):
    """The recorded tensors by key, one tensor per key.

    A key whose layer ran once maps to that tensor. A key whose layer ran several times (one
    call per generation step) has no single tensor: reading it raises an error pointing to
    ``Result.records[key]``, the list of every call in order. The rule is the same for every
    key and every run; ``records`` always holds lists.
    """

    __slots__ = ("_records",)

    def __init__(self, records: Mapping[str, list[torch.Tensor]]) -> None:
        self._records = records

    def __getitem__(self, key: str) -> torch.Tensor:
        values = self._records.get(key)
        if not values:
            if not isinstance(key, str):
                raise KeyNotFoundError(f"saved keys are str, got {type(key).__name__} {key!r}")
            hint = nearest_note(key, self) or "; nothing was saved in this run"
            raise KeyNotFoundError(f"nothing was saved under {key!r}{hint}")
        if len(values) > 1:
            raise SurgeryError(
                f"{key!r} was recorded {len(values)} times in this run (once per call, e.g. per "
                f"generation step); read result.records[{key!r}], the list of every call in order"
            )
        return values[0]

    def __contains__(self, key: object) -> bool:
        return bool(self._records.get(key))  # type: ignore[call-overload]

    def __iter__(self) -> Iterator[str]:
        return (key for key, values in self._records.items() if values)

    def __len__(self) -> int:
        return sum(1 for values in self._records.values() if values)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{k!r}: {_shape(v[0]) if len(v) == 1 else f'{len(v)} calls'}"
            for k, v in self._records.items()
            if v
        )
        return "Saved({" + shown + "})"


def _shape(value: Any) -> str:
    return f"<{list(value.shape)}>" if isinstance(value, torch.Tensor) else type(value).__name__


@dataclass
class Result:
    """What one run gave back: the model's output and the recorded tensors by key.

    ``records[key]`` lists every tensor a recording layer saw, in call order (one per
    generation step in ``generate``); ``saved[key]`` is the one tensor of a layer that ran
    once (see :class:`Saved`). Gradients recorded by ``SaveGrad`` appear once ``backward``
    has run.
    """

    output: Any
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def saved(self) -> Saved:
        return Saved(self.records)


class Backend(Protocol):
    """Anything that can run a rewritten model elsewhere (see ``ts.remote.Client``)."""

    def run(self, model: nn.Module, *args: Any, **kwargs: Any) -> Result: ...


def _placed_run_layers(model: nn.Module) -> tuple[tuple[str, InterventionLayer], ...]:
    """Recording layers and run readers, by path (cached for frozen trees)."""
    found = _RUN_LAYERS.get(model) if is_frozen(model) else None
    if found is None:
        found = tuple(
            (p, m)
            for p, m in iter_nodes(model)
            if isinstance(m, Recorder)
            or (
                isinstance(m, InterventionLayer)
                and (m.reads_run or m.grad_site or m.steps is not None)
            )
        )
        by_key: dict[str, Recorder] = {}
        for _, layer in found:
            if not isinstance(layer, Recorder):
                continue
            other = by_key.setdefault(layer.key, layer)
            if other is not layer:
                raise SelectionError(
                    f"two recording layers use the key {layer.key!r} (at {other.site!r} and "
                    f"{layer.site!r}); give each its own name, e.g. Save('resid{{layer}}'), or "
                    "Save() to key each by its path"
                )
        if is_frozen(model):
            _RUN_LAYERS[model] = found
    return found


def _module_of(target: Callable[..., Any]) -> nn.Module:
    if isinstance(target, nn.Module):
        return getattr(target, "_orig_mod", target)  # torch.compile's OptimizedModule
    owner = getattr(target, "__self__", None)
    if isinstance(owner, nn.Module):
        return getattr(owner, "_orig_mod", owner)
    from torchsurgeon.plans.plan import Plan  # plans build on this module

    if isinstance(target, Plan):
        raise ArgumentTypeError(
            "ts.run(target): a Plan is a rewrite as data, not a model; build the model it "
            "describes with ts.apply(plan, model) and run that: "
            "ts.run(ts.apply(plan, model), ...)"
        )
    raise ArgumentTypeError(
        "ts.run(target): expects a model, a compiled model or a bound method of one "
        f"(model.generate), got {type(target).__name__}"
    )


def run(
    target: nn.Module | Callable[..., Any],
    *args: Any,
    backend: Backend | None = None,
    backward: Expr | None = None,
    **kwargs: Any,
) -> Result:
    """Call ``target(*args, **kwargs)`` with recording on; return a :class:`Result`.

    ``target`` may also be a session (``ts.session``): its runs in order, one ``Result``
    per run by name. ``backward`` is a scalar expression over the finished run
    (``ts.out("logits")[:, -1, a].sum()``) that is differentiated once the forward pass is
    done: ``SaveGrad`` layers record the gradients reaching their sites, ``ComputeGrad``
    layers edit them. The model's weights keep no ``.grad`` (see ``ts.wrap``).
    """
    if getattr(type(target), "ts_session", False):  # a Session (ts.session): no import needed
        if args or kwargs:
            raise ArgumentTypeError(
                "ts.run(session) takes no inputs: each run of a session has its own"
            )
        return backend.run(target) if backend is not None else target.run_locally()  # type: ignore[return-value]
    if backend is not None:
        model = _module_of(target)
        if backward is not None:
            kwargs["backward"] = backward
        if target is not model:
            name = getattr(target, "__name__", "")
            if name == "generate" and hasattr(backend, "generate"):
                return backend.generate(model, *args, **kwargs)
            raise ArgumentTypeError(
                "ts.run(target, backend=): pass the model itself (or model.generate), not "
                "another method"
            )
        return backend.run(model, *args, **kwargs)
    args, kwargs = tokenized(target, args, kwargs)  # text -> token ids, as a host does
    _refuse_weightless(_module_of(target), args, kwargs)
    return run_with(target, args, kwargs, backward=backward)


def _refuse_weightless(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse real inputs to a model whose weights all sit on ``meta`` (``client.meta(...)``):
    it would hand back ``meta`` tensors, not values. Meta inputs are a shape check: allowed."""
    params = model.parameters()
    first = next(params, None)
    if first is None or not first.is_meta or not all(p.is_meta for p in params):
        return  # the usual case costs one parameter lookup
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return  # accelerate offload: weights are loaded into the meta placeholders per call
    values = [*args, *kwargs.values()]
    values += [v for c in values if isinstance(c, (list, tuple)) for v in c]
    values += [v for c in values if isinstance(c, dict) for v in c.values()]
    real = next((v for v in values if isinstance(v, torch.Tensor) and not v.is_meta), None)
    if real is not None:
        raise SurgeryError(
            "this model has no weights here (its parameters are meta tensors, e.g. from "
            "client.meta(...)), so running it on real inputs would give meta tensors, not "
            "values: run it on its host with ts.run(model, ..., backend=client). To check "
            f"shapes only, pass meta inputs (inputs.to('meta'); got a {real.device} tensor)."
        )


def run_with(
    target: nn.Module | Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None = None,
    backward: Expr | Graph | None = None,
) -> Result:
    """:func:`run` locally; ``runs`` are the records of a session's earlier runs, by name,
    for ``ts.saved(key, run=name)``; ``backward`` a scalar expression to differentiate once
    the forward pass is done (its gradients reach ``SaveGrad`` and ``ComputeGrad``)."""
    graph = None
    if backward is not None:
        graph = backward if isinstance(backward, Graph) else Graph.of(backward)
        graph.check_leaves(here=False, output=True)
    model = _module_of(target)
    layers = tuple(layer for _, layer in _placed_run_layers(model))
    records: dict[str, list[torch.Tensor]] = {}
    sites: list[torch.Tensor] = []  # the tensors of SaveGrad / ComputeGrad, for backward=
    # only layers that read the run (and a backward expression) may read its inputs
    readers = graph is not None or any(not isinstance(m, Recorder) for m in layers)
    inputs = named_inputs(model, args, kwargs) if readers else {}
    context = _context(model, layers, records, runs, sites, inputs)
    with running(context):
        try:
            output = target(*args, **kwargs)
        except StopRun:
            output = None  # a Stop layer ended the pass: what was saved until then is the result
        if graph is not None:
            _backward(graph, model, records, runs, output, sites, inputs)
    return Result(output, records)


def _backward(
    graph: Graph,
    model: nn.Module,
    records: dict[str, list[torch.Tensor]],
    runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None,
    output: Any,
    sites: list[torch.Tensor],
    inputs: Mapping[str, Any],
) -> None:
    """Evaluate the backward expression on the finished run and differentiate it.

    The gradient is taken with respect to the tensors of the run's ``SaveGrad`` and
    ``ComputeGrad`` layers only (``torch.autograd.grad``): their hooks see it, and nothing is
    computed for the weights, whose ``.grad`` a tree would drop anyway.
    """
    if not sites:
        raise ExpressionError(
            "backward=: the model has no SaveGrad or ComputeGrad layer that ran, so the "
            "backward pass would compute nothing you can read; insert ts.layers.SaveGrad(key) "
            "where you want the gradient",
            "backward",
        )
    values = RunValues(
        records=records,
        runs=runs,
        output=output,
        has_output=True,
        model=lineage_of(model).base,
        inputs=inputs,
        device=device_of(output, records),
    )
    value = graph.evaluate(None, values)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ExpressionError(
            f"backward= takes a scalar expression; this one gives {shape}: reduce it, e.g. "
            "with .sum() or .mean()",
            "backward",
        )
    if not value.requires_grad:
        raise ExpressionError(
            "backward=: the expression does not depend on anything that requires grad (was "
            "the run made under torch.no_grad, or on a model with no parameter requiring "
            "grad?)",
            "backward",
        )
    torch.autograd.grad(value.reshape(()), sites, allow_unused=True)


def named_inputs(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The call's arguments for ``ts.input``: ``args.<i>``, the name of the ``forward``
    parameter each positional argument fills, and the keyword arguments."""
    named: dict[str, Any] = {f"args.{i}": value for i, value in enumerate(args)}
    named.update(zip(_positional_names(type(model)), args, strict=False))
    named.update(kwargs)
    return named


@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


def _context(
    model: nn.Module,
    layers: tuple[InterventionLayer, ...],
    records: dict[str, list[torch.Tensor]],
    runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None,
    sites: list[torch.Tensor],
    inputs: Mapping[str, Any],
) -> RunContext:
    """The run's context: each layer's record list, counter, sites and values, by identity."""
    context = RunContext()
    values = None
    for layer in layers:
        store = values_here = None
        if isinstance(layer, Recorder):
            store = records.setdefault(layer.key, [])
        else:
            if values is None:
                base = lineage_of(model).base
                values = RunValues(records=records, runs=runs, model=base, inputs=inputs)
            values_here = values
        sites_here = sites if layer.grad_site else None
        context.add(layer, LayerRun(store, values_here, sites_here, layer.steps is not None))
    return context
