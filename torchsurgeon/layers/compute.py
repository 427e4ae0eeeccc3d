"""Layers that compute: ``Compute`` replaces a tensor by an expression, ``ComputeGrad`` its
gradient, ``Stop`` ends the run.

``Compute(expr)`` is the general edit: directional ablation is
``Compute(ts.here - (ts.here @ d)[..., None] * d)``, a conditional edit
``Compute(ts.ops.where(ts.here > 3, 0.0, ts.here))``, a patch from another site
``Compute(ts.saved("h3"))``. The expression (:mod:`torchsurgeon.layers.expr`) travels in the
plan as data and is checked before it runs.

``ComputeGrad(expr)`` edits the gradient on its way back through the site — NNsight's
``.grad = ...`` — with ``ts.here`` the gradient that arrives (from the layers after it):
``ComputeGrad(ts.here * 0)`` cuts the gradient there, ``ComputeGrad(ts.here.clamp(-1, 1))``
clips it. Layers before it (and ``SaveGrad`` at earlier sites) see the edited gradient,
layers after it the original: the order of the data, reversed.

``Stop()`` ends the forward pass where it sits — NNsight's ``tracer.stop()``: ``ts.run``
returns what was saved until then (and no output), so reading an early layer of a 70B model
costs only the layers before it. Called outside ``ts.run``, the model raises
:class:`StopRun`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import InterventionLayer, Steps, register_layer
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.run_state import run_state
from torchsurgeon.surgery.errors import ArgumentTypeError, SiteError, SurgeryError

__all__ = ["Compute", "ComputeGrad", "Stop", "StopRun"]


class StopRun(SurgeryError):
    """Raised by a ``Stop`` layer to end the forward pass; ``ts.run`` catches it."""


@register_layer
class Compute(InterventionLayer):
    """Replace the target tensor by ``expr`` (``ts.here`` is the tensor it replaces)."""

    type_name = "Compute"
    expr_fields = ("expr",)
    takes_index = False

    def __init__(self, expr: Expr, *, on: int | str | None = None, steps: Steps = None) -> None:
        super().__init__(on=on, steps=steps)
        self._set_expr("expr", _expression(expr, "Compute", "for a fixed value use SetValues"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self._evaluate("expr", x)
        if not isinstance(value, torch.Tensor):
            raise ExpressionError(
                f"{self._where()}the expression gave a {type(value).__name__}, not a tensor"
            )
        return value


def _expression(value: Any, owner: str, hint: str) -> Expr:
    """``value`` if it is an expression, else an ``ArgumentTypeError`` (a ``TypeError``)
    saying what ``owner`` takes."""
    if not isinstance(value, Expr):
        raise ArgumentTypeError(
            f"{owner} takes an expression (built from ts.here, ts.saved, ...; {hint}), got "
            f"{type(value).__name__}"
        )
    return value


class _EditGrad(torch.autograd.Function):
    """The identity forward; ``edit(gradient)`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, edit: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        ctx.edit = edit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        edited = ctx.edit(grad)
        if not isinstance(edited, torch.Tensor) or edited.shape != grad.shape:
            shape = list(edited.shape) if isinstance(edited, torch.Tensor) else type(edited)
            raise ExpressionError(
                f"ComputeGrad: the expression gave {shape} for a gradient of shape "
                f"{list(grad.shape)}; it must keep the gradient's shape"
            )
        return edited.to(grad.dtype), None


@register_layer
class ComputeGrad(InterventionLayer):
    """Replace the gradient flowing back through the target by ``expr`` (``ts.here``: it)."""

    type_name = "ComputeGrad"
    grad_site = True
    expr_fields = ("expr",)
    takes_index = False

    def __init__(self, expr: Expr, *, on: int | str | None = None, steps: Steps = None) -> None:
        super().__init__(on=on, steps=steps)
        self._set_expr("expr", _expression(expr, "ComputeGrad", "ts.here is the gradient"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            if x.is_meta and not torch.is_grad_enabled():
                return x  # a structure-only check of a forward-only run
            raise SiteError(
                f"{self._where()}the tensor does not require grad, so no gradient will reach "
                "it. Run with gradients enabled (ts.run(..., backward=...), not under "
                "torch.no_grad) on a model whose parameters or inputs require grad."
            )
        return self.through(x, self.gradient_edit())

    def gradient_edit(self) -> Callable[[torch.Tensor], Any]:
        """What the backward pass applies to the gradient: ``expr`` evaluated with it as
        ``ts.here`` and this run's values (kept now, for the backward pass)."""
        state = run_state(self)
        values = None if state is None else state.values
        return lambda grad: self._evaluate("expr", grad, values)

    def through(self, x: torch.Tensor, edit: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """``x`` unchanged, with ``edit`` applied to its gradient in the backward pass (where
        a placed layer edits a shard's gradient through the full one)."""
        state = run_state(self)
        if state is not None:
            state.sites.append(x)  # so backward= reaches (and edits) the gradient here
        return _EditGrad.apply(x, edit)


@register_layer
class Stop(InterventionLayer):
    """End the forward pass here; ``ts.run`` returns what was saved so far."""

    type_name = "Stop"
    takes_index = False
    stops_run = True

    def __init__(self, *, on: int | str | None = None, steps: Steps = None) -> None:
        super().__init__(on=on, steps=steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise StopRun(
            f"{self._where()}the forward pass stops here; ts.run(...) returns what was saved "
            "until then"
        )
