"""Co-batching: several users' requests in one forward pass, each scoped to its own rows.

A host that runs shipped code cannot merge two users' traces: it cannot know what the code
touches. A plan is data, so the host can: requests on the same model with compatible inputs
are stacked along the batch dimension, every layer of request ``k``'s plan is wrapped in a
:class:`RowScope` that hands it rows ``[start_k, stop_k)`` only — so it sees exactly the
batch it would have seen alone — and the output and records are split back per request.

Isolation — no request ever sees, changes or receives another's rows — rests on three
checks, each of which sends a request to run alone rather than guess:

- at admission (:func:`batch_key`): the request's estimate (a meta run of its own view)
  saw every inserted layer return a tensor of exactly its target's shape, with the
  request's rows as the first dimension;
- in the merged pass (:class:`RowScope`): a layer's result must have exactly the shape of
  the rows it was given; otherwise that request is taken out of the batch and runs alone;
- at the split (:func:`_rows`): every tensor of the merged output must have the merged
  batch as its first dimension; a tensor without it (a scalar, a reduction over rows) ends
  the merge and every request runs alone.

Which requests merge: a single forward run (no session, no generation, no backward, no
training), whose plan only inserts layers (a ``replace`` or ``remove_from_parent`` changes
the model for every row), whose layers read nothing of the run (``ts.saved``, ``ts.call``,
``ts.input``), do not stop it, count no steps and act on no gradient, and whose inputs are
token tensors of one shape apart from the batch (same length, same keyword arguments, same
dtypes) — so rows never need padding that would move positions. A request can opt out
(``Client.run(..., co_batch=False)``). If a merged pass meets a site whose tensor has no
batch dimension (a rotary table), every request in it runs alone instead: merging never
changes a result.

Cost: each merged request was checked and estimated alone before it was queued; a batch
holds at most ``Limits.max_batch_requests`` of them, only requests of similar estimated cost
(within ``jobs.WORK_RATIO`` of the batch's first) whose sum fits one run's budget
(``Limits.run_budget``: the seconds at the host's measured speed). A
merged pass that runs out of time is split: each of its requests is queued again to run
alone under its own deadline, so a slow plan cannot time out another user's request.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.base import Recorder, layer_class
from torchsurgeon.layers.guards import deadline
from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.plans.plan import Plan
from torchsurgeon.remote.deadline import JobTimeout
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.estimates import Cost
from torchsurgeon.remote.execution import PreparedRun, encoded_result, run_submission
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.result_wire import tensors_in
from torchsurgeon.remote.worker import RUN_ALONE
from torchsurgeon.surgery.frozen import original_class

__all__ = ["BatchPart", "RowScope", "batch_key", "run_batch"]

_SEPARATOR = "\x1f"
"""Between a request's number and its own record key, in the merged run's keys."""
_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


WORK_RATIO = 2.0
"""Requests merge only with requests whose estimated work is within this factor."""


class _NotBatched(Exception):
    """A merged pass cannot go on. ``part``: the request whose layer broke its rows (it runs
    alone, the others merge again); ``None``: a tensor without the batch dimension (each
    request runs alone)."""

    def __init__(self, message: str, part: int | None = None) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class BatchPart:
    """One request of a batch: its model and its checked run."""

    hosted: HostedModel
    run: PreparedRun

    @property
    def cost(self) -> Cost:
        """Its estimate (what decides which requests may share a pass)."""
        assert self.run.cost is not None  # batch_key merges only estimated runs
        return self.run.cost


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
        if step.layer is None:
            return None
        kind = layer_class(step.layer.type_name)  # what the class declares it does
        if kind.stops_run or kind.grad_site:
            return None
        if step.layer.config.get("steps") is not None or _reads_run(step.layer.config):
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
    if not _keeps_rows(run, kwargs["input_ids"].shape[0]):
        return None
    return (hosted.name, tuple(shapes))


def _keeps_rows(run: PreparedRun, rows: int) -> bool:
    """Whether the request's estimate saw every layer return exactly its target's shape,
    with the request's ``rows`` first (a layer that adds, drops or folds rows runs alone)."""
    if run.cost is None:
        return False
    return all(
        call.result == call.target and call.target[:1] == (rows,) for call in run.cost.layer_calls
    )


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
            if input.dim() == 0 or input.shape[0] != self.total:
                raise _NotBatched(f"an input of shape {list(input.shape)} at a merged site")
            out = self.inner(part, input=input[self.start : self.stop])
        if out is part:
            return x
        if not isinstance(out, torch.Tensor) or out.shape != part.shape:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _NotBatched(
                f"a layer turned rows of shape {list(part.shape)} into {shape}", int(self.tag)
            )
        return torch.cat([x[: self.start], out.to(x.dtype), x[self.stop :]])


def run_batch(parts: Sequence[BatchPart], limits: Limits) -> list[tuple[bytes | None, Any]]:
    """Each part's encoded result (or its :class:`ApiError`, or ``RUN_ALONE``: queue it
    again to run alone), from one merged forward pass."""
    if len(parts) == 1:
        return [_alone(parts[0], limits)]
    try:
        return _merged(parts, limits)
    except _NotBatched as refused:
        if refused.part is None:
            return [_alone(part, limits) for part in parts]
        rest = [p for k, p in enumerate(parts) if k != refused.part]
        out = run_batch(rest, limits)
        out.insert(refused.part, _alone(parts[refused.part], limits))
        return out


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
    except JobTimeout:  # together too slow: each is judged on its own cost, alone
        return [(None, RUN_ALONE)] * len(parts)
    except Exception as error:  # one request's plan failed where it ran alone fine: retry alone
        del error
        return [_alone(part, limits) for part in parts]
    _check_rows(result.output, total)
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
    def scoped(k: int, layer: nn.Module) -> nn.Module:
        return RowScope(layer, bounds[k], bounds[k + 1], total, str(k))

    return hosted.merged_view(list(plans), scoped)


def _check_rows(value: Any, total: int) -> None:
    """Refuse to split an output holding a tensor without the merged batch's rows first
    (a scalar, a reduction over rows): no part of it belongs to one request alone."""
    for tensor in tensors_in(value):
        if tensor.dim() == 0 or tensor.shape[0] != total:
            raise _NotBatched(f"an output tensor of shape {list(tensor.shape)}")


def _rows(value: Any, rows: slice, total: int) -> Any:
    """``value`` (an output, checked by :func:`_check_rows`) with every tensor cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows]
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
