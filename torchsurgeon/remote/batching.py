"""Co-batching: several users' requests in one forward pass, each scoped to its own rows.

A host that runs shipped code cannot merge two users' traces: it cannot know what the code
touches. A plan is data, so the host can: requests on the same model with compatible inputs
are stacked along the batch dimension, every layer of request ``k``'s plan is wrapped in a
:class:`RowScope` that hands it rows ``[start_k, stop_k)`` only — so it sees exactly the
batch it would have seen alone — and the output and records are split back per request.

Which requests merge (:func:`batch_key`): a single forward run (no session, no generation,
no backward, no training), whose plan only inserts layers (a ``replace`` or
``remove_from_parent`` changes the model for every row), whose layers read nothing of the
run (``ts.saved``, ``ts.call``, ``ts.input``), do not stop it, count no steps and act on no
gradient, and whose inputs are token tensors of one shape apart from the batch (same length,
same keyword arguments, same dtypes) — so rows never need padding that would move positions.
A request can opt out (``Client.run(..., co_batch=False)``). If a merged pass meets a site
whose tensor has no batch dimension (a rotary table), every request in it runs alone
instead: merging never changes a result.

Each merged request was checked and estimated alone before it was queued; a batch holds at
most ``Limits.max_batch_requests`` of them, and runs under one ``max_run_seconds``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.base import Recorder
from torchsurgeon.layers.graph import deadline
from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.plans.plan import Plan
from torchsurgeon.remote.deadline import JobTimeout
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.execution import PreparedRun, encoded_result, run_submission, timed_out
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.selectors.selection import replay
from torchsurgeon.surgery.frozen import original_class, wrap

__all__ = ["BatchPart", "RowScope", "batch_key", "run_batch"]

_SEPARATOR = "\x1f"
"""Between a request's number and its own record key, in the merged run's keys."""
_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class _NotBatched(Exception):
    """A merged pass met a tensor without the batch dimension: run each request alone."""


@dataclass(frozen=True)
class BatchPart:
    """One request of a batch: its model and its checked run."""

    hosted: HostedModel
    run: PreparedRun


def batch_key(hosted: HostedModel, runs: Sequence[PreparedRun], alone: bool) -> Any:
    """What a request must share with others to merge with them, or ``None`` if it cannot."""
    if alone or len(runs) != 1:
        return None
    run = runs[0]
    if run.name is not None or run.inputs.call != "forward" or run.plan.backward is not None:
        return None
    if run.inputs.trained is not None or run.inputs.text is not None or len(run.inputs.args) > 1:
        return None
    if any(step.operation not in ("insert_before", "insert_after") for step in run.plan.steps):
        return None
    for step in run.plan.steps:
        layer = step.layer
        if layer is None or layer.type_name in ("Stop", "SaveGrad", "ComputeGrad"):
            return None
        if layer.config.get("steps") is not None or _reads_run(layer.config):
            return None
    kwargs = _as_keywords(hosted, run.inputs.args, run.inputs.kwargs)
    if kwargs is None or set(kwargs) - set(_INPUTS) or "input_ids" not in kwargs:
        return None
    shapes = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            return None
        shapes.append((name, str(value.dtype), value.shape[1]))
    return (hosted.name, tuple(shapes))


def _as_keywords(
    hosted: HostedModel, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The call as keyword arguments (token ids given positionally become ``input_ids``)."""
    if not args:
        return dict(kwargs)
    names = [n for n in _forward_parameters(hosted.base) if n != "self"]
    if not names or names[0] != "input_ids" or "input_ids" in kwargs:
        return None
    return {"input_ids": args[0], **kwargs}


def _reads_run(config: Mapping[str, Any]) -> bool:
    """Whether an expression in a layer config reads the run (saved values, calls, inputs)."""
    for value in config.values():
        if isinstance(value, dict) and "expr" in value:
            nodes = value["expr"].get("nodes", [])
            if any(node.get("op") in ("saved", "call", "input", "out") for node in nodes):
                return True
    return False


class RowScope(nn.Module):
    """A layer applied to rows ``[start, stop)`` of its target only (a merged batch's part).

    It stands where the layer would stand (same ``on``, input passed to adapters), gives the
    layer exactly that request's rows — so indices, ``Patch`` rows and recorded tensors are
    what they are alone — and keeps every other row as it was.
    """

    def __init__(self, inner: nn.Module, start: int, stop: int, total: int, tag: str) -> None:
        super().__init__()
        self.inner = inner
        self.start, self.stop, self.total, self.tag = start, stop, total, tag
        self.on = getattr(inner, "on", None)
        self.reads_input = bool(getattr(inner, "reads_input", False))

    def for_site(self, path: str, n: int) -> RowScope:
        inner = self.inner.for_site(path, n) if hasattr(self.inner, "for_site") else self.inner
        if isinstance(inner, Recorder):
            inner.__dict__["key"] = f"{self.tag}{_SEPARATOR}{inner.key}"  # our private copy
        return RowScope(inner, self.start, self.stop, self.total, self.tag)

    def forward(self, x: torch.Tensor, input: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 0 or x.shape[0] != self.total:
            raise _NotBatched(f"a tensor of shape {list(x.shape)} at a merged site")
        part = x[self.start : self.stop]
        if input is None:
            out = self.inner(part)
        else:
            if input.shape[0] != self.total:
                raise _NotBatched(f"an input of shape {list(input.shape)} at a merged site")
            out = self.inner(part, input=input[self.start : self.stop])
        if out is part:
            return x
        return torch.cat([x[: self.start], out.to(x.dtype), x[self.stop :]])


def run_batch(parts: Sequence[BatchPart], limits: Limits) -> list[tuple[bytes | None, Any]]:
    """Each part's encoded result (or its :class:`ApiError`), from one merged forward pass."""
    if len(parts) == 1:
        return [_alone(parts[0], limits)]
    try:
        return _merged(parts, limits)
    except _NotBatched:
        return [_alone(part, limits) for part in parts]


def _alone(part: BatchPart, limits: Limits) -> tuple[bytes | None, Any]:
    try:
        return run_submission(part.hosted, [part.run], limits), None
    except ApiError as error:
        return None, error


def _merged(parts: Sequence[BatchPart], limits: Limits) -> list[tuple[bytes | None, Any]]:
    hosted = parts[0].hosted
    calls = []
    for part in parts:
        args, kwargs = hosted.call_arguments(part.run.inputs)
        calls.append(_as_keywords(hosted, args, kwargs))
    sizes = [call["input_ids"].shape[0] for call in calls]
    total = sum(sizes)
    bounds = [sum(sizes[:k]) for k in range(len(parts) + 1)]
    model = _merged_model(hosted, [p.run.plan for p in parts], bounds, total)
    merged = {name: torch.cat([call[name] for call in calls]) for name in calls[0]}
    if "use_cache" in _forward_parameters(model):
        merged["use_cache"] = False  # a cache cannot be split per request (nor does it travel)
    try:
        with torch.no_grad(), deadline(time.monotonic() + limits.max_run_seconds):
            result = run_with(model, (), merged)  # the hosted base checks the deadline
    except _NotBatched:
        raise
    except JobTimeout:
        return [(None, timed_out(limits))] * len(parts)
    except Exception as error:  # one request's plan failed where it ran alone fine: retry alone
        del error
        return [_alone(part, limits) for part in parts]
    out = []
    for k, part in enumerate(parts):
        rows = slice(bounds[k], bounds[k + 1])
        prefix = f"{k}{_SEPARATOR}"
        records = {
            key[len(prefix) :]: values
            for key, values in result.records.items()
            if key.startswith(prefix)
        }
        own = Result(_rows(result.output, rows, total), records)
        try:
            returned = part.run.plan.outputs.apply(own, part.run.view)
            out.append((encoded_result(returned, limits), None))
        except ApiError as error:
            out.append((None, error))
        except Exception as error:  # a reduction that does not fit: that request's error
            out.append((None, ApiError(422, "bad_returning", str(error), "returning")))
    return out


def _merged_model(
    hosted: HostedModel, plans: Sequence[Plan], bounds: list[int], total: int
) -> nn.Module:
    model = wrap(hosted.base)
    for k, plan in enumerate(plans):
        for step in plan.steps:
            selection = replay(model, step.selection)
            layer = step.layer.build()  # type: ignore[union-attr]
            scoped = RowScope(layer, bounds[k], bounds[k + 1], total, str(k))
            model = getattr(selection, step.operation)(scoped)
    return model


def _rows(value: Any, rows: slice, total: int) -> Any:
    """``value`` (an output) with every tensor of the merged batch cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == total else value
    if isinstance(value, Mapping):
        fields = {k: _rows(v, rows, total) for k, v in value.items()}
        kind = type(value)
        try:
            return fields if kind is dict else kind(**fields)
        except TypeError:
            return fields
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_rows(v, rows, total) for v in value)
    if isinstance(value, list):
        return [_rows(v, rows, total) for v in value]
    return value


def _forward_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s ``forward`` parameters, in order."""
    try:
        return list(inspect.signature(original_class(model).forward).parameters)
    except (TypeError, ValueError):
        return []
