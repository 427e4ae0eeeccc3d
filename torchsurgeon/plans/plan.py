"""``Plan``: a rewrite as data — what to change in which base, and what to hand back.

A plan holds the base's identity (:class:`~torchsurgeon.plans.identity.BaseIdentity`), the
ordered rewrite steps (:class:`~torchsurgeon.plans.spec.PlanStep`: selector expression,
operation, layer spec) and what a run returns (:class:`~torchsurgeon.plans.returning.Returning`).
It is an immutable value: :meth:`Plan.returning` gives a new plan.

On disk and on the wire a plan is one safetensors file with the JSON manifest in its
metadata (:mod:`torchsurgeon.plans.wire`); reading one validates every field
(:mod:`torchsurgeon.plans.schema`) before anything is built. Make a plan with
``ts.plan(rewritten)`` and replay it with ``ts.apply(plan, base)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.graph import Graph
from torchsurgeon.plans.identity import BaseIdentity
from torchsurgeon.plans.returning import Reduction, Returning, Slice
from torchsurgeon.plans.schema import (
    DTYPES,
    FORMAT,
    SCHEMA_VERSION,
    Manifest,
    PlanLimits,
    validate,
)
from torchsurgeon.plans.spec import LayerSpec, PlanStep
from torchsurgeon.plans.wire import pack, unpack
from torchsurgeon.selectors.expression import SelectorStep
from torchsurgeon.surgery.errors import ArgumentTypeError, SerializationError

__all__ = ["Plan"]

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True, eq=False)
class Plan:
    """The rewrite steps from a base, the base's identity, and what a run returns."""

    base: BaseIdentity
    steps: tuple[PlanStep, ...] = ()
    outputs: Returning = field(default_factory=Returning)
    backward: Graph | None = None
    """A scalar expression differentiated after the forward pass (``ts.run(..., backward=)``)."""

    # ----------------------------------------------------------------- building

    def returning(
        self,
        *names: str,
        mean: int | Sequence[int] | None = None,
        topk: int | None = None,
        positions: slice | int | Slice | None = None,
        position_dim: int = 1,
        **computed: Expr,
    ) -> Plan:
        """A plan that returns only the listed entries (with every earlier call's), reduced.

        Entries are saved keys and output entries (``"output"``, ``"logits"``, ...):
        ``plan.returning("logits", topk=5)``, ``plan.returning("block3", mean=[1])``.
        A keyword argument is a value computed where the plan runs, after the forward pass,
        and returned under its name (``result.saved["diff"]``):
        ``plan.returning(diff=ts.out("logits")[:, -1, a] - ts.out("logits")[:, -1, b])``.
        Without any ``returning`` call a run returns everything, unreduced.
        """
        if not names and not computed:
            raise ArgumentTypeError(
                "returning: name at least one entry (a saved key or 'logits', ...) or a "
                "computed value (name=expression)"
            )
        reduces = mean is not None or topk is not None or positions is not None
        reduction = (
            Reduction.make(mean=mean, topk=topk, positions=positions, position_dim=position_dim)
            if reduces
            else None
        )
        return replace(self, outputs=self.outputs.adding(names, reduction, computed))

    def with_backward(self, expr: Expr | None) -> Plan:
        """A plan whose run differentiates the scalar ``expr`` after the forward pass, as
        ``ts.run(model, ..., backward=expr)`` does: ``SaveGrad`` layers record the gradients
        reaching their sites, ``ComputeGrad`` layers edit them."""
        if expr is None:
            return replace(self, backward=None)
        if not isinstance(expr, Expr):
            raise ArgumentTypeError(
                f"backward= takes an expression (e.g. ts.out('logits')[0, -1, 5]), got "
                f"{type(expr).__name__}"
            )
        graph = Graph.of(expr)
        graph.check_leaves(here=False, output=True)
        return replace(self, backward=graph)

    # ----------------------------------------------------------------- data

    def manifest(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(manifest JSON, tensors by reference)``: the file's two parts."""
        tensors: dict[str, torch.Tensor] = {}
        ref_of: dict[int, str] = {}  # one tensor used by several layers is stored once
        steps: list[dict[str, Any]] = []
        for step in self.steps:
            layer = None
            if step.layer is not None:
                refs = {}
                for name, tensor in sorted(step.layer.tensors.items()):  # canonical order
                    refs[name] = _add_tensor(tensor, tensors, ref_of)
                layer = {
                    "type": step.layer.type_name,
                    "config": copy.deepcopy(dict(step.layer.config)),  # the caller may edit it
                    "tensors": refs,
                }
            steps.append(
                {
                    "selection": [s.to_json() for s in step.selection],
                    "operation": step.operation,
                    "layer": layer,
                }
            )
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "base": self.base.to_json(),
            "steps": steps,
            "returning": self.outputs.to_json(
                lambda t: _add_tensor(t, tensors, ref_of)  # constants of computed values
            ),
        }
        if self.backward is not None:
            manifest["backward"] = {
                "expr": self.backward.to_json(),
                "tensors": [_add_tensor(t, tensors, ref_of) for t in self.backward.tensors],
            }
        manifest["tensors"] = {
            ref: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
            for ref, t in tensors.items()
        }
        return manifest, tensors

    @classmethod
    def from_manifest(
        cls,
        manifest: Any,
        tensors: dict[str, torch.Tensor],
        limits: PlanLimits | None = None,
    ) -> Plan:
        """A plan from a manifest and its tensors, every field validated first."""
        checked = validate(manifest, tensors, limits or PlanLimits())
        return cls._from_checked(checked, tensors)

    @classmethod
    def _from_checked(cls, checked: Manifest, tensors: dict[str, torch.Tensor]) -> Plan:
        steps = tuple(
            PlanStep(
                selection=tuple(SelectorStep.from_json(s.model_dump()) for s in step.selection),
                operation=step.operation,
                layer=None
                if step.layer is None
                else LayerSpec(
                    step.layer.type,
                    dict(step.layer.config),
                    {name: tensors[ref] for name, ref in step.layer.tensors.items()},
                ),
            )
            for step in checked.steps
        )
        backward = None
        if checked.backward is not None:
            backward = Graph.from_json(
                checked.backward.expr, [tensors[ref] for ref in checked.backward.tensors]
            )
        return cls(
            BaseIdentity.from_json(checked.base.model_dump()),
            steps,
            Returning.from_json(checked.returning.model_dump(), tensors),
            backward,
        )

    def to_bytes(self) -> bytes:
        """The plan file's bytes (safetensors with the JSON manifest in its metadata)."""
        manifest, tensors = self.manifest()
        return pack(manifest, tensors)

    @classmethod
    def from_bytes(cls, data: bytes, limits: PlanLimits | None = None) -> Plan:
        """Read a plan file's bytes; :class:`PlanFormatError` names the first problem."""
        limits = limits or PlanLimits()
        manifest, tensors = unpack(data, limits)
        return cls.from_manifest(manifest, tensors, limits)

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` (conventionally ``*.tsplan``); returns the path."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path, limits: PlanLimits | None = None) -> Plan:
        """Read and validate the plan file at ``path``."""
        return cls.from_bytes(Path(path).read_bytes(), limits)

    # ----------------------------------------------------------------- comparing

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        same_backward = (self.backward is None) == (other.backward is None) and (
            self.backward is None or self.backward.same_as(other.backward)  # type: ignore[arg-type]
        )
        return (
            self.base == other.base
            and same_backward
            and self.outputs == other.outputs
            and len(self.steps) == len(other.steps)
            and all(a.same_as(b) for a, b in zip(self.steps, other.steps, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        lines = [f"Plan(base={self.base.architecture}, {len(self.steps)} step(s)"]
        lines += [f"  {i}: {step}" for i, step in enumerate(self.steps)]
        if self.outputs.names is not None:
            lines.append(f"  returning {list(self.outputs.names)}")
        return "\n".join(lines) + ")"


def _add_tensor(
    tensor: torch.Tensor, tensors: dict[str, torch.Tensor], ref_of: dict[int, str]
) -> str:
    """``tensor``'s reference in the plan's table (one tensor used twice is stored once)."""
    ref = ref_of.setdefault(id(tensor), f"t{len(tensors)}")
    tensors[ref] = tensor
    return ref


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise SerializationError(
            f"a layer tensor has dtype {dtype}, which plans do not carry; use one of "
            + ", ".join(DTYPES)
        )
    return name
