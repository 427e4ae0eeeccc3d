"""``plan(rewritten)``: turn the lineage a rewrite left behind into a :class:`Plan`.

Every rewrite made through a selection records its step on the new model (see
:mod:`torchsurgeon.surgery.lineage`). :func:`plan` reads that record back, converts each
step into data — the selector expression as JSON, the operation, the inserted layer as a
registry spec — and adds the identity of the base the steps started from.

Steps that are not data refuse, naming the step and why: ``apply(fn)`` (a Python function),
``replace`` with a module that is not a registry layer, a selector built on a Python
callable predicate, a layer tensor of a dtype plans do not carry.
"""

from __future__ import annotations

from torch import nn

from torchsurgeon.plans.identity import BaseIdentity, identity_of
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.schema import DTYPES
from torchsurgeon.plans.spec import LayerSpec, PlanStep
from torchsurgeon.selectors.expression import steps_to_json
from torchsurgeon.surgery.errors import SerializationError
from torchsurgeon.surgery.lineage import RewriteStep, lineage_of

__all__ = ["plan"]


def plan(model: nn.Module, *, base_identity: BaseIdentity | None = None) -> Plan:
    """The rewrite that made ``model`` from its base, as a :class:`Plan`.

    ``base_identity`` skips computing the base's identity when the caller knows it. A model
    that was never rewritten gives a plan with no steps.
    """
    lineage = lineage_of(model)
    steps = tuple(_step(i, step) for i, step in enumerate(lineage.steps))
    identity = base_identity if base_identity is not None else identity_of(lineage.base)
    return Plan(identity, steps)


def _step(i: int, step: RewriteStep) -> PlanStep:
    where = "select(model)" + "".join(f".{s}" for s in step.selection)
    described = f"rewrite step {i} ({where}.{step.operation}(...))"
    try:
        steps_to_json(step.selection)
    except SerializationError as error:
        raise SerializationError(f"{described}: {error}") from None
    if step.operation == "apply":
        name = getattr(step.payload, "__qualname__", type(step.payload).__name__)
        raise SerializationError(
            f"{described}: apply({name}) runs a Python function, which cannot travel in a "
            "plan; use insert_before / insert_after / replace with ts.layers layers instead"
        )
    if step.operation == "remove_from_parent":
        return PlanStep(step.selection, "remove_from_parent", None)
    if step.operation not in ("insert_before", "insert_after", "replace"):
        raise SerializationError(f"{described}: unknown operation {step.operation!r}")
    try:
        spec = LayerSpec.of(step.payload)
        for name, tensor in spec.tensors.items():
            if tensor.dtype not in DTYPES.values():
                raise SerializationError(
                    f"{spec.type_name}.{name} has dtype {tensor.dtype}, which plans do not "
                    f"carry; use one of {', '.join(DTYPES)}"
                )
    except SerializationError as error:
        raise SerializationError(f"{described}: {error}") from None
    return PlanStep(step.selection, step.operation, spec)  # type: ignore[arg-type]
