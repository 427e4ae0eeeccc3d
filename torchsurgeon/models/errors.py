"""Errors of the model conversions: an architecture we cannot convert, a broken checkpoint.

Both derive from :class:`~torchsurgeon.surgery.errors.SurgeryError` (one ``except`` catches
every torchsurgeon error) and from ``ValueError``, so code that guards a conversion with
``except ValueError`` keeps working; the messages say what was found and what to do instead.
"""

from __future__ import annotations

from torchsurgeon.surgery.errors import SurgeryError

__all__ = ["CheckpointError", "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(SurgeryError, ValueError):
    """The model (or a feature of its config) has no explicit-layer conversion.

    The message lists the supported families and points to ``ts.wrap(model)``, which works
    on any ``nn.Module`` (selectors then reach its real submodules, though not the
    intermediates its forward keeps in local variables).
    """


class CheckpointError(SurgeryError, ValueError):
    """A checkpoint directory or tensor is missing, or a tensor has the wrong shape."""
