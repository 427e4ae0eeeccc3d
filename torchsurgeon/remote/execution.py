"""Running one request: the checks, the rewritten view, a run-time guard, the run, the reductions.

:func:`prepare_submission` makes every check a request owes before it is queued — one run
or a session's runs in order (:mod:`torchsurgeon.layers.session`). :func:`run_submission`
is the whole job of a worker, in-process or in a Ray actor: it takes the views
:meth:`~torchsurgeon.remote.hosted.HostedModel.prepare` made, adds a *deadline
guard* — a forward pre-hook on every module of the view, intervention layers included,
placed by one more copy-on-write rewrite, so only this request's view carries it — runs
the model without gradients, applies the plan's reductions
(:mod:`torchsurgeon.plans.returning`) and encodes the result. A run past
``max_run_seconds`` stops at the next module call with a ``timeout`` error. (The guard costs
a shallow copy of every node once per request, ~30 µs a node, and a clock read per module
call; the cost estimate made before the job was queued bounds what one call can do.)

Whatever a run raises is the request's doing — its plan, its inputs — and comes back as a
422 ``run_failed`` naming the exception, never as a host error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.plans.errors import PlanError, PlanFormatError, PlanLimitError
from torchsurgeon.plans.plan import Plan
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import Inputs, decode_submission, encode_result, result_nbytes
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.rewrite import Edit, rewrite

__all__ = [
    "JobTimeout",
    "PreparedRun",
    "prepare_submission",
    "run_request",
    "run_submission",
    "with_deadline",
]


class JobTimeout(RuntimeError):
    """A run went past its deadline."""


def with_deadline(view: nn.Module, deadline: float, limit: float) -> nn.Module:
    """``view`` with a check of ``time.monotonic() < deadline`` before every module call."""

    def check(module: nn.Module, args: Any) -> None:
        if time.monotonic() > deadline:
            raise JobTimeout(f"the run went past the limit max_run_seconds={limit:g}")

    def guard(node: nn.Module, path: str) -> nn.Module:
        node.register_forward_pre_hook(check, prepend=True)
        return node

    edits: dict[str, Edit] = {path: guard for path, _ in iter_nodes(view)}
    return rewrite(view, edits)


@dataclass(frozen=True)
class PreparedRun:
    """One run of a submission, checked: its name (``None`` outside a session), its plan,
    the rewritten view of the base and the inputs."""

    name: str | None
    plan: Plan
    view: nn.Module
    inputs: Inputs


def prepare_submission(
    hosted: HostedModel, body: bytes, limits: Limits, *, estimate: bool = True
) -> list[PreparedRun]:
    """Every check a submission owes before it is queued; :class:`ApiError` at the first.

    A session's runs are checked in order, each estimated on meta tensors with the meta
    records of the runs before it, so ``ts.saved(key, run=...)`` is checked like any value;
    the results of all runs together must fit ``max_result_bytes``. (``estimate=False``: a
    worker re-reading what its host already checked.)
    """
    submitted = decode_submission(body, limits)
    session = submitted[0][0] is not None
    meta_runs: dict[str, Any] | None = {} if session else None
    result_bytes = 0
    prepared = []
    for name, plan_bytes, inputs in submitted:
        where = "" if name is None else f"runs.{name}."
        try:
            plan = Plan.from_bytes(plan_bytes, limits.plan_limits())
        except PlanLimitError as error:
            raise ApiError(422, "limit_exceeded", error.reason, where + error.field) from None
        except PlanFormatError as error:
            raise ApiError(422, "invalid_plan", error.reason, where + error.field) from None
        if inputs.text is not None and not hosted.takes_text:
            raise ApiError(422, "no_tokenizer", f"model {hosted.name!r} has no tokenizer", "text")
        try:
            view, cost = hosted.prepare(plan, limits, inputs if estimate else None, meta_runs)
        except ApiError as error:
            if name is None:
                raise
            raise ApiError(
                error.status, error.code, f"run {name!r}: {error.message}", where + error.field
            ) from None
        if cost is not None and meta_runs is not None:
            meta_runs[name] = cost.records  # type: ignore[index]
            result_bytes += cost.result_bytes
        prepared.append(PreparedRun(name, plan, view, inputs))
    if result_bytes > limits.max_result_bytes:
        raise ApiError(
            422,
            "result_too_large",
            f"the session's results would hold {result_bytes} bytes, over the limit "
            f"max_result_bytes={limits.max_result_bytes}; return fewer entries or reduce them",
            "returning",
        )
    return prepared


def run_submission(hosted: HostedModel, runs: list[PreparedRun], limits: Limits) -> bytes:
    """Run a prepared submission (each session run in order, one deadline for all); the
    encoded result."""
    deadline = time.monotonic() + limits.max_run_seconds
    records: dict[str, Any] = {}
    results: dict[str, Result] = {}
    try:
        for item in runs:
            args, kwargs = hosted.call_arguments(item.inputs)
            guarded = with_deadline(item.view, deadline, limits.max_run_seconds)
            session = records if item.name is not None else None
            with torch.no_grad():
                result = run_with(guarded, args, kwargs, session)
                returned = item.plan.outputs.apply(result, guarded, session)
            if item.name is None:
                return _encoded(returned, limits)
            records[item.name] = result.records
            results[item.name] = returned
    except JobTimeout as error:
        raise ApiError(408, "timeout", str(error)) from None
    except PlanError as error:
        raise ApiError(422, "bad_returning", str(error), "returning") from None
    except ExpressionError as error:
        raise ApiError(422, "bad_expression", str(error), error.field or "steps") from None
    except Exception as error:  # the plan's or the inputs' doing (the base is never changed)
        raise ApiError(422, "run_failed", f"{type(error).__name__}: {error}") from None
    return _encoded(results, limits)


def run_request(
    hosted: HostedModel, plan: Plan, view: nn.Module, inputs: Inputs, limits: Limits
) -> bytes:
    """Run ``view`` (``plan`` applied to ``hosted``) on ``inputs``; the encoded result."""
    return run_submission(hosted, [PreparedRun(None, plan, view, inputs)], limits)


def _encoded(result: Result | dict[str, Result], limits: Limits) -> bytes:
    runs = result.values() if isinstance(result, dict) else [result]
    size = sum(result_nbytes(r) for r in runs)
    if size > limits.max_result_bytes:
        raise ApiError(
            422,
            "result_too_large",
            f"the result holds {size} bytes, over the limit max_result_bytes="
            f"{limits.max_result_bytes}; return fewer entries or reduce them "
            "(plan.returning(name, mean=..., topk=..., positions=...))",
        )
    return encode_result(result)
