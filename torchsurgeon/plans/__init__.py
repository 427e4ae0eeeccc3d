"""Plans: rewrites as data — record them, save them, check them, replay them anywhere.

``plan(rewritten)`` turns the steps that built a model into a :class:`Plan` (selector
expressions, operations, registry layer specs, the base's identity); ``Plan.save`` writes
one safetensors file with a JSON manifest, ``Plan.load`` validates every field before
building anything; ``apply(plan, base)`` replays it on a base of the same identity and
``execute`` also runs it and reduces what it returns — exactly what a remote host does.
``meta(model)`` and :class:`Structure` give a model's structure without its weights.
"""

from torchsurgeon.plans.errors import (
    IdentityMismatchError,
    PlanError,
    PlanFormatError,
    PlanLimitError,
)
from torchsurgeon.plans.identity import BaseIdentity, identity_of, pin_identity
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.record import plan
from torchsurgeon.plans.replay import apply, execute
from torchsurgeon.plans.returning import Reduction, Returning
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.spec import LayerSpec, PlanStep
from torchsurgeon.plans.structure import Structure, meta, structure_of

__all__ = [
    "BaseIdentity",
    "IdentityMismatchError",
    "LayerSpec",
    "Plan",
    "PlanError",
    "PlanFormatError",
    "PlanLimitError",
    "PlanLimits",
    "PlanStep",
    "Reduction",
    "Returning",
    "Structure",
    "apply",
    "execute",
    "identity_of",
    "meta",
    "pin_identity",
    "plan",
    "structure_of",
]
