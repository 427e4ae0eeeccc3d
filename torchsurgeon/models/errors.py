"""Errors of the model conversions: an architecture we cannot convert, a broken checkpoint.

Both are ``ValueError`` subclasses, so code that guards a conversion with ``except
ValueError`` keeps working; the messages say what was found and what to do instead.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The model (or a feature of its config) has no explicit-layer conversion.

    The message lists the supported families and points to ``ts.wrap(model)``, which works
    on any ``nn.Module`` (selectors then reach its real submodules, though not the
    intermediates its forward keeps in local variables).
    """


class CheckpointError(ValueError):
    """A checkpoint directory or tensor is missing, or a tensor has the wrong shape."""
