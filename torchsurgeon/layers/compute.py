"""Layers that compute: ``Compute`` replaces a tensor by an expression, ``Stop`` ends the run.

``Compute(expr)`` is the general edit: directional ablation is
``Compute(ts.here - (ts.here @ d)[..., None] * d)``, a conditional edit
``Compute(ts.ops.where(ts.here > 3, 0.0, ts.here))``, a patch from another site
``Compute(ts.saved("h3"))``. The expression (:mod:`torchsurgeon.layers.expr`) travels in the
plan as data and is checked before it runs.

``Stop()`` ends the forward pass where it sits — NNsight's ``tracer.stop()``: ``ts.run``
returns what was saved until then (and no output), so reading an early layer of a 70B model
costs only the layers before it. Called outside ``ts.run``, the model raises
:class:`StopRun`.
"""

from __future__ import annotations

import torch

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import InterventionLayer, register_layer
from torchsurgeon.layers.expr import Expr
from torchsurgeon.surgery.errors import SurgeryError

__all__ = ["Compute", "Stop", "StopRun"]


class StopRun(SurgeryError):
    """Raised by a ``Stop`` layer to end the forward pass; ``ts.run`` catches it."""


@register_layer
class Compute(InterventionLayer):
    """Replace the target tensor by ``expr`` (``ts.here`` is the tensor it replaces)."""

    type_name = "Compute"
    expr_fields = ("expr",)
    takes_index = False

    def __init__(self, expr: Expr, *, on: int | str | None = None) -> None:
        super().__init__(on=on)
        if not isinstance(expr, Expr):
            raise TypeError(
                f"Compute takes an expression (built from ts.here, ts.saved, ...), got "
                f"{type(expr).__name__}; for a fixed value use SetValues(None, value)"
            )
        self._set_expr("expr", expr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self._evaluate("expr", x)
        if not isinstance(value, torch.Tensor):
            raise ExpressionError(
                f"{self._where()}the expression gave a {type(value).__name__}, not a tensor"
            )
        return value


@register_layer
class Stop(InterventionLayer):
    """End the forward pass here; ``ts.run`` returns what was saved so far."""

    type_name = "Stop"
    takes_index = False

    def __init__(self, *, on: int | str | None = None) -> None:
        super().__init__(on=on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise StopRun(
            f"{self._where()}the forward pass stops here; ts.run(...) returns what was saved "
            "until then"
        )
