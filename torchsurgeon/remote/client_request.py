"""What a client sends: a plan, rewritten model, session or training loop as request bytes."""

from __future__ import annotations

from typing import Any

from torch import nn

from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.session import Session
from torchsurgeon.layers.training import (
    Optimizer,
    Trained,
    Training,
    call_of,
    trainable,
)
from torchsurgeon.plans.identity import BaseIdentity
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.record import plan as plan_of
from torchsurgeon.remote.transfer import encode_request, encode_session

__all__ = ["hosted_model_for", "request_of", "training_request"]


def request_of(
    target: Plan | nn.Module | Session,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    backward: Expr | None,
    call: str,
    co_batch: bool,
) -> tuple[Plan, bytes]:
    """A submission's request bytes, with the plan that picks its hosted model.

    Args:
        target: a plan, a rewritten model (planned here) or a session (sent whole; its runs
            carry their own inputs).
        inputs, kwargs: the model call's arguments.
        backward: a scalar expression the host differentiates after the forward pass.
        call: ``"forward"``, ``"generate"`` or ``"train"``.
        co_batch: whether a co-batching host may merge the request with others.
    """
    if isinstance(target, Session):
        if inputs or kwargs:
            raise TypeError("a session carries each run's inputs; pass no inputs with it")
        plans = [(r, *_as_call(r.target)) for r in target.runs]
        if not plans:
            raise ValueError("the session has no runs")
        body = encode_session(
            [
                (r.name, p.to_bytes(), r.args, dict(r.kwargs or {}), c, details)
                for r, p, c, details in plans
            ]
        )
        return plans[0][1], body
    plan = _as_plan(target)
    if backward is not None:
        plan = plan.with_backward(backward)
    return plan, encode_request(plan.to_bytes(), inputs, kwargs, call, alone=not co_batch)


def _as_plan(target: Plan | nn.Module) -> Plan:
    return target if isinstance(target, Plan) else plan_of(target)


def _as_call(target: Any) -> tuple[Plan, str, dict[str, Any]]:
    """A session run's plan, call and call details: ``model.generate`` generates, a
    ``ts.training(...)`` trains, ``ts.trained(model, run=...)`` runs with trained tensors."""
    if isinstance(target, Training):
        plan, training, batches = training_request(
            target.model, target.batches, target.loss, target.params, target.optimizer, target.steps
        )
        return plan, "train", {"training": training, "batches": batches}
    if isinstance(target, Trained):
        plan, call, details = _as_call(target.model)
        return plan, call, {**details, "trained": target.run}
    owner = getattr(target, "__self__", None)
    if isinstance(owner, nn.Module) and getattr(target, "__name__", "") == "generate":
        return plan_of(owner), "generate", {}
    return _as_plan(target), "forward", {}


def training_request(
    model: nn.Module | Plan,
    batches: Any,
    loss: Expr,
    params: Any,
    optimizer: Optimizer,
    steps: int,
) -> tuple[Plan, dict[str, Any], list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """A training loop as a request's plan (its loss as ``backward``), settings, batches."""
    if not isinstance(model, nn.Module):
        raise TypeError("a training run trains a rewritten model (its plan travels)")
    if not isinstance(optimizer, Optimizer):
        raise TypeError("optimizer= is ts.optim.AdamW(...) or ts.optim.SGD(...)")
    names = [f"{path}.{field}" for path, field in trainable(model, params)]
    plan = plan_of(model).with_backward(loss)
    settings = {"params": names, "optimizer": optimizer.to_json(), "steps": steps}
    return plan, settings, [call_of(batch) for batch in batches]


def hosted_model_for(plan: Plan, hosted: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The hosted model the plan's base is, or ``None`` and what the refusal should say.

    A model fits when the host would accept the plan on it: the same identity (the same
    structure, for a plan made on a structure-only model). The text names what the plan
    was built against and what each hosted model is, with its first difference, so no one
    is sent to ``model_name=`` a model that would refuse the plan too.

    Args:
        plan: the plan to run.
        hosted: the host's model list (``Client.models()``).
    """
    match = "exact" if plan.base.fingerprint is not None else "structure"
    lines = []
    for model in hosted:
        try:
            identity = BaseIdentity.from_json(dict(model["identity"]))
            problems = plan.base.differences(identity, match)  # type: ignore[arg-type]
            if not problems:
                return str(model["name"]), ""
            lines.append(f"{model['name']!r} is {identity.describe()} ({problems[0]})")
        except (KeyError, TypeError, ValueError, AttributeError):  # a host's data: checked
            lines.append(f"{model.get('name')!r} has no readable identity")
    listed = "; ".join(lines) if lines else "(none)"
    return None, (
        f"no hosted model holds this plan's base: the plan was built against "
        f"{plan.base.describe()}. Hosted: {listed}. Build the plan on client.meta(name) of "
        "a hosted model (or on a local copy of its checkpoint) to run it there"
    )
