"""Running one request: the checks, the rewritten view, a run-time guard, the run, the reductions.

:func:`prepare_submission` makes every check a request owes before it is queued — one run
or a session's runs in order (:mod:`torchsurgeon.layers.session`). :func:`run_submission`
is the whole job of a worker, in-process or in a Ray actor: it takes the views
:meth:`~torchsurgeon.remote.hosted.HostedModel.prepare` made, runs them under the job's
deadline (checked before every module call of the hosted base and every node of an
expression: :mod:`torchsurgeon.remote.deadline`; a run past ``max_run_seconds`` stops with a
``timeout`` error), applies the plan's reductions (:mod:`torchsurgeon.plans.returning`) and
encodes the result.

Whatever a run raises is the request's doing — its plan, its inputs — and comes back as a
422 ``run_failed`` naming the exception, never as a host error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import layer_class
from torchsurgeon.layers.guards import deadline as expression_deadline
from torchsurgeon.layers.guards import run_guard
from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.layers.session import training_result
from torchsurgeon.layers.training import Batch, Optimizer, train, trainable, with_tensors
from torchsurgeon.plans.errors import PlanError, PlanFormatError, PlanLimitError
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.returning import Returning
from torchsurgeon.remote.deadline import JobTimeout
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.estimates import Cost
from torchsurgeon.remote.estimates import estimate as estimate_cost
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.memory import HostMemoryExceeded, watch
from torchsurgeon.remote.progress import report
from torchsurgeon.remote.result_wire import encode_result, result_nbytes
from torchsurgeon.remote.transfer import Inputs, decode_submission
from torchsurgeon.surgery.errors import SurgeryError

__all__ = [
    "PreparedRun",
    "encoded_result",
    "prepare_submission",
    "run_submission",
    "timed_out",
]


@dataclass(frozen=True)
class PreparedRun:
    """One run of a submission, checked: its name (``None`` outside a session), its plan,
    the rewritten view of the base and the inputs."""

    name: str | None
    plan: Plan
    view: nn.Module
    inputs: Inputs
    training: tuple[list[str], Optimizer, int] | None = None
    """A training run's tensor names, optimizer and steps, checked."""
    cost: Cost | None = None
    """Its estimate (``None`` for training and runs of trained tensors)."""


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
    trained_names: dict[str, list[str]] = {}
    for name, plan_bytes, inputs in submitted:
        where = "" if name is None else f"runs.{name}."
        try:
            plan = hosted.read_plan(plan_bytes, limits)
        except PlanLimitError as error:
            raise ApiError(422, "limit_exceeded", error.reason, where + error.field) from None
        except PlanFormatError as error:
            raise ApiError(422, "invalid_plan", error.reason, where + error.field) from None
        if inputs.text is not None and not hosted.takes_text:
            raise ApiError(422, "no_tokenizer", f"model {hosted.name!r} has no tokenizer", "text")
        if inputs.call != "train":
            _check_gradients(plan, limits, where)
        try:
            if inputs.call == "train":
                view, settings = _prepare_training(hosted, plan, inputs, limits, estimate)
                trained_names[name or ""] = settings[0]
                cost = None
            else:
                settings = None
                if inputs.trained is not None:
                    view = _view_with_trained(hosted, plan, inputs, limits, trained_names)
                    cost = None
                else:
                    view, cost = hosted.prepare(
                        plan, limits, inputs if estimate else None, meta_runs
                    )
        except ApiError as error:
            if name is None:
                raise
            raise ApiError(
                error.status, error.code, f"run {name!r}: {error.message}", where + error.field
            ) from None
        if meta_runs is not None:
            meta_runs[name] = cost.records if cost is not None else {}  # type: ignore[index]
            result_bytes += cost.result_bytes if cost is not None else 0
        prepared.append(PreparedRun(name, plan, view, inputs, settings, cost))
    if result_bytes > limits.max_result_bytes:
        raise ApiError(
            422,
            "result_too_large",
            f"the session's results would hold {result_bytes} bytes, over the limit "
            f"max_result_bytes={limits.max_result_bytes}; return fewer entries or reduce them",
            "returning",
        )
    return prepared


def _prepare_training(
    hosted: HostedModel, plan: Plan, inputs: Inputs, limits: Limits, estimate: bool
) -> tuple[nn.Module, tuple[list[str], Optimizer, int]]:
    """A training run's view and checked settings; :class:`ApiError` naming the field."""
    if not limits.allow_train:
        raise ApiError(
            422,
            "training_disabled",
            "this host runs no training (started with --no-train); train locally",
            "call",
        )
    if plan.backward is None:
        raise ApiError(
            422, "needs_loss", "a training run needs its loss (the plan's backward=)", "backward"
        )
    settings = inputs.train or {}
    unknown = sorted(set(settings) - {"params", "optimizer", "steps"})
    if unknown:
        raise ApiError(422, "bad_input", f"unknown training setting(s) {unknown}", "train")
    steps = settings.get("steps")
    if type(steps) is not int or not 1 <= steps <= limits.max_train_steps:
        raise ApiError(
            422,
            "bad_input",
            f"steps must be an int from 1 to max_train_steps={limits.max_train_steps}, got "
            f"{str(steps)[:40]}",
            "train.steps",
        )
    try:
        optimizer = Optimizer.from_json(settings.get("optimizer"))
    except (ValueError, TypeError) as error:
        raise ApiError(422, "bad_input", str(error), "train.optimizer") from None
    names = settings.get("params")
    if (
        not isinstance(names, list)
        or not 0 < len(names) <= 256
        or not all(isinstance(n, str) and 0 < len(n) <= 1024 for n in names)
    ):
        raise ApiError(
            422, "bad_input", "params is a list of 1 to 256 tensor names", "train.params"
        )
    view, _ = hosted.prepare(plan, limits)
    _check_names(view, names, "train.params")
    calls = [hosted.call_arguments(batch) for batch in inputs.batches]
    if estimate:
        args, kwargs = calls[0]
        view_on_meta = hosted.meta_view(plan)
        cost = estimate_cost(view_on_meta, args, kwargs, Returning(names=()), limits)
        if 3 * cost.peak_bytes > limits.max_activation_bytes:  # activations kept for backward
            raise ApiError(
                422,
                "limit_exceeded",
                f"a training step would keep about {3 * cost.peak_bytes} bytes of activations "
                f"for its backward pass, over max_activation_bytes={limits.max_activation_bytes}",
                "batches",
            )
    return view, (names, optimizer, steps)


def _view_with_trained(
    hosted: HostedModel,
    plan: Plan,
    inputs: Inputs,
    limits: Limits,
    trained_names: Mapping[str, list[str]],
) -> nn.Module:
    """The view of a run that uses an earlier training run's tensors (checked to fit)."""
    if inputs.trained not in trained_names:
        raise ApiError(
            422,
            "bad_input",
            f"trained={inputs.trained!r} is not an earlier training run of this session "
            f"(those: {sorted(trained_names)})",
            "trained",
        )
    view = hosted.prepare(plan, limits, inputs)[0]  # its inputs checked, its cost estimated
    _check_names(view, trained_names[inputs.trained], "trained")
    return view


def _check_names(view: nn.Module, names: list[str], field: str) -> None:
    try:
        found = {f"{path}.{name}" for path, name in trainable(view, names)}
    except (SurgeryError, KeyError, TypeError) as error:
        message = error.args[0] if error.args else str(error)
        raise ApiError(422, "bad_input", str(message), field) from None
    missing = sorted(set(names) - found)
    if missing:
        raise ApiError(
            422, "bad_input", f"{missing[0]!r} is not a tensor of a layer of the plan", field
        )


def _check_gradients(plan: Plan, limits: Limits, where: str) -> None:
    """Gradient layers need ``backward=``; both need a host that allows gradients."""
    named = {s.layer.type_name for s in plan.steps if s.layer is not None}
    grad_layers = sorted(name for name in named if layer_class(name).grad_site)
    if (plan.backward is not None or grad_layers) and not limits.allow_grad:
        uses = ", ".join([*grad_layers, *(["backward="] if plan.backward is not None else [])])
        raise ApiError(
            422,
            "gradients_disabled",
            f"this host runs no backward pass (started with --no-grad), and the plan uses "
            f"{uses}; run it locally or on a host that allows gradients",
            where + ("backward" if plan.backward is not None else "steps"),
        )
    if grad_layers and plan.backward is None:
        raise ApiError(
            422,
            "needs_backward",
            f"the plan has {', '.join(grad_layers)}, which act on the backward pass, but no "
            "backward=: give the scalar to differentiate, e.g. ts.run(model, ids, backend=client, "
            "backward=ts.out('logits')[:, -1, token].sum())",
            where + "backward",
        )


def run_submission(hosted: HostedModel, runs: list[PreparedRun], limits: Limits) -> bytes:
    """Run a prepared submission (each session run in order, one deadline for all); the
    encoded result."""
    deadline = time.monotonic() + limits.max_run_seconds
    try:
        with expression_deadline(deadline), run_guard(watch(limits.max_host_memory_bytes)):
            return _run_all(hosted, runs, limits)
    except JobTimeout:
        raise timed_out(limits) from None
    except HostMemoryExceeded as error:
        raise ApiError(507, "host_memory", str(error), "max_host_memory_bytes") from None
    except PlanError as error:
        raise ApiError(422, "bad_returning", str(error), "returning") from None
    except ExpressionError as error:
        if time.monotonic() > deadline:
            raise timed_out(limits) from None
        raise ApiError(422, "bad_expression", str(error), error.field or "steps") from None
    except ApiError:
        raise
    except Exception as error:  # the plan's or the inputs' doing (the base is never changed)
        raise ApiError(422, "run_failed", f"{type(error).__name__}: {error}", "steps") from None


def _run_all(
    hosted: HostedModel,
    runs: list[PreparedRun],
    limits: Limits,
) -> bytes:
    """The runs in order (one, or a session's); the encoded result."""
    records: dict[str, Any] = {}
    results: dict[str, Result] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}
    for item in runs:
        view = item.view  # the hosted base checks the job's deadline (remote/deadline.py)
        session = records if item.name is not None else None
        if item.inputs.trained is not None:
            view = with_tensors(view, trained[item.inputs.trained])
        if item.training is not None:
            names, optimizer, steps = item.training
            batches = [Batch(*hosted.call_arguments(b)) for b in item.inputs.batches]
            done = train(
                view,
                batches,
                loss=item.plan.backward,  # type: ignore[arg-type]
                params=names,
                optimizer=optimizer,
                steps=steps,
                on_step=lambda step, loss, steps=steps: report(
                    {"step": step + 1, "steps": steps, "loss": loss}
                ),
            )
            trained[item.name or ""] = done.tensors
            result = training_result(done)
            if item.name is None:
                return encoded_result(result, limits)
            records[item.name] = result.records
            results[item.name] = result
            continue
        args, kwargs = hosted.call_arguments(item.inputs)
        if item.inputs.call == "generate":
            result = _generate(view, args, kwargs, session)
        else:
            with torch.set_grad_enabled(item.plan.backward is not None):
                result = run_with(view, args, kwargs, session, item.plan.backward)
        with torch.no_grad():
            returned = item.plan.outputs.apply(result, view, session)
        if item.name is None:
            return encoded_result(returned, limits)
        records[item.name] = result.records
        results[item.name] = returned
    return encoded_result(results, limits)


_SAMPLING = threading.Lock()
"""Seeded sampling sets the process's generator: one sampled generation at a time."""


def _generate(
    view: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], session: Any
) -> Result:
    """``view.generate(*args, **kwargs)`` recorded, greedy or sampled from ``seed``."""
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    with torch.no_grad():
        if seed is None:
            return run_with(view.generate, args, kwargs, session)
        with _SAMPLING, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return run_with(view.generate, args, kwargs, session)


def timed_out(limits: Limits) -> ApiError:
    """The ``408 timeout`` of a run past ``max_run_seconds``."""
    message = f"the run went past the limit max_run_seconds={limits.max_run_seconds:g}"
    return ApiError(408, "timeout", message)


def encoded_result(result: Result | dict[str, Result], limits: Limits) -> bytes:
    """The result file's bytes; :class:`ApiError` when it is over ``max_result_bytes``."""
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
