"""``apply(plan, base)``: replay a plan's steps on a base; ``execute``: apply, run, reduce.

Replaying is the same thing the user did interactively: for each step, run its selector
expression from the root of the model so far (``selectors.replay``), rebuild its layer from
the registry, and call the Selection's rewrite method. So a replayed model is built by the
very code that built the original, shares every parameter with ``base``, and never changes
``base``.

Before replaying, the base's identity is checked against the plan's: ``match="exact"``
(default) wants the same architecture, structure, config and weight fingerprint;
``match="structure"`` accepts any base with the same paths, classes and shapes (another
fine-tune of the model, a structure-only model on the meta device).

:func:`execute` is what a host does with a request, and so the exact local twin of a
remote run: apply, ``ts.run``, then the plan's reductions.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.layers.session import Session
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.plans.identity import BaseIdentity, Match, check_identity
from torchsurgeon.plans.plan import Plan
from torchsurgeon.selectors.selection import replay
from torchsurgeon.surgery.errors import ArgumentTypeError, SurgeryError
from torchsurgeon.surgery.frozen import wrap

__all__ = ["apply", "execute"]


def apply(
    plan: Plan,
    base: nn.Module,
    *,
    match: Match = "exact",
    base_identity: BaseIdentity | None = None,
) -> nn.Module:
    """The model ``plan`` describes, rebuilt on ``base`` (which is left untouched).

    Raises :class:`~torchsurgeon.plans.errors.IdentityMismatchError` listing what differs
    when ``base`` is not the plan's base, and :class:`~torchsurgeon.plans.errors.PlanError`
    naming the step when a step does not fit (a path the base lacks, ...).
    ``base_identity`` is ``base``'s identity when the caller already computed it.
    """
    if not isinstance(plan, Plan):
        swapped = isinstance(plan, nn.Module) and isinstance(base, Plan)
        raise ArgumentTypeError(
            "ts.apply(plan, base): the arguments are the other way round; write "
            "ts.apply(plan, model)"
            if swapped
            else f"ts.apply(plan, base): plan must be a Plan, got {type(plan).__name__}"
        )
    check_identity(plan.base, base, match, base_identity)
    model = wrap(base)
    for i, step in enumerate(plan.steps):
        try:
            selection = replay(model, step.selection)
            if step.operation == "remove_from_parent":
                model = selection.remove_from_parent()
            else:
                layer = step.layer.build()  # type: ignore[union-attr]
                layer.__dict__["_ts_step"] = i  # errors of its expressions name the step
                device = _device_of(selection.get_all())
                if device is not None:
                    layer = layer.to(device)
                model = getattr(selection, step.operation)(layer)
        except (SurgeryError, ValueError, TypeError, IndexError, KeyError) as error:
            raise PlanError(f"step {i} ({step}) does not fit this base: {error}") from error
    return model


def _device_of(nodes: tuple[nn.Module, ...]) -> torch.device | None:
    """Where the first selected node's first tensor lives (layers go next to their site)."""
    for node in nodes:
        for tensor in itertools.chain(node.parameters(), node.buffers()):
            return tensor.device
    return None


def execute(
    plan: Plan | Session,
    base: nn.Module,
    *args: Any,
    match: Match = "exact",
    base_identity: BaseIdentity | None = None,
    **kwargs: Any,
) -> Result | dict[str, Result]:
    """Apply ``plan`` to ``base``, run it on the inputs, and return what the plan returns.

    A :class:`~torchsurgeon.layers.session.Session` runs each of its runs in order (a plan
    applied to ``base``, or a model as it is), later runs reading earlier runs' records,
    and gives one ``Result`` per run by name — exactly what a host returns for it.
    """
    if isinstance(plan, Session):
        if args or kwargs:
            raise ArgumentTypeError("execute(session, base) takes no inputs: each run has its own")

        def resolve(target: Any) -> tuple[Any, Any, Any]:
            owner = getattr(target, "__self__", None)
            if isinstance(target, Plan):
                return apply(target, base, match=match), target.outputs, target.backward
            if isinstance(owner, Plan):  # plan.generate is not a thing: a model's is
                raise ArgumentTypeError("a generating session run is model.generate, not a plan's")
            return target, None, None

        return plan.run_locally(resolve)
    model = apply(plan, base, match=match, base_identity=base_identity)
    return plan.outputs.apply(run_with(model, args, kwargs, backward=plan.backward), model)
