"""The errors of plans: a plan that is malformed, one that does not fit its base.

A plan crosses trust boundaries (a file someone sent, a request body on a host), so the
errors here are for *people*: each names the field or step at fault and what was expected.
All derive from :class:`~torchsurgeon.surgery.errors.SurgeryError` through
:class:`PlanError`, so one ``except`` catches every plan problem, and a host maps them to
4xx answers without guessing.
"""

from __future__ import annotations

from torchsurgeon.surgery.errors import SurgeryError

__all__ = ["IdentityMismatchError", "PlanError", "PlanFormatError", "PlanLimitError"]


class PlanError(SurgeryError, ValueError):
    """Base class: something wrong with a plan, or with replaying one."""


class PlanFormatError(PlanError):
    """Bytes or a manifest that are not a valid plan; ``field`` names where (e.g. ``steps.2``)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message


class IdentityMismatchError(PlanError):
    """A plan replayed onto a base that is not the model it was made from."""


class PlanLimitError(PlanFormatError):
    """A plan (or a request carrying one) over a size limit: too many bytes, steps, tensors."""
