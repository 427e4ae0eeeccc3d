"""A hosted model: the base a host serves, loaded once, wrapped, never changed.

:class:`HostedModel` holds what the host knows about one model: the frozen base (or, on a
host whose weights live in Ray workers, its structure-only stand-in), a structure-only
(meta) copy of it for cost estimates, its identity and structure (computed once), and its
tokenizer if the checkpoint has one. :meth:`prepare` turns a plan into this request's own
rewritten view — copy-on-write, so the base and every other request's view are untouched —
after the checks a host owes its users: identity, the layer allow-list, the number of
saves, and, given the request's inputs, what running it would cost
(:func:`~torchsurgeon.remote.estimates.estimate`).

:meth:`call_arguments` checks a model call (:mod:`torchsurgeon.remote.calls`); checkpoints
are local directories loaded as :class:`~torchsurgeon.remote.checkpoints.LocalCheckpoint`
says (:mod:`torchsurgeon.remote.checkpoints`); plans and views read once are kept
(:class:`~torchsurgeon.remote.views.Views`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.base import Recorder
from torchsurgeon.plans.errors import IdentityMismatchError, PlanError
from torchsurgeon.plans.identity import BaseIdentity, identity_of
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.replay import apply
from torchsurgeon.plans.returning import Returning
from torchsurgeon.plans.structure import (
    Structure,
    structure_of,
    without_value_warnings,
)
from torchsurgeon.remote.calls import _attn_implementation, _is_converted, call_arguments
from torchsurgeon.remote.checkpoints import (
    LocalCheckpoint,
    _converted_on_meta,
    load_checkpoint,
    load_tokenizer,
)
from torchsurgeon.remote.deadline import guard_deadlines
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.estimates import Cost, Estimates, estimate, keep_values
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import Inputs
from torchsurgeon.remote.views import Views
from torchsurgeon.selectors.selection import replay
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.lineage import Lineage, with_lineage
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.tree import map as map_tensors

__all__ = ["HostedModel", "LocalCheckpoint"]


@dataclass(frozen=True)
class HostedModel:
    """One served model: ``base`` is shared by every request and never changed."""

    name: str
    base: nn.Module
    identity: BaseIdentity
    structure: Structure
    tokenizer: Any = None
    source: str | None = None
    takes_text: bool = False
    """Whether text inputs are accepted (a tokenizer here, or in the Ray workers)."""
    structure_only: nn.Module | None = None
    """``base`` on the meta device (``base`` itself when it is already): for estimates."""
    attn_implementation: str | None = None
    """The ``transformers`` attention implementation of the base (None: not a
    ``transformers`` model)."""
    estimates: Estimates = field(default_factory=Estimates, compare=False, repr=False)
    views: Views = field(default_factory=lambda: Views(), compare=False, repr=False)

    @classmethod
    def load(cls, name: str, source: nn.Module | str | Path | LocalCheckpoint) -> HostedModel:
        """Load ``source`` (a module, or a local checkpoint directory) and describe it once."""
        tokenizer = None
        path = None
        if isinstance(source, nn.Module):
            module = source
        else:
            checkpoint = LocalCheckpoint.of(source)
            path = str(checkpoint.path)
            module, tokenizer = load_checkpoint(checkpoint)
        # our own frozen copy (its flags, not `source`'s), checking a job's deadline before
        # every module call; every request's view shares those checks
        base = guard_deadlines(wrap(module).eval())
        identity = identity_of(base)
        structure = structure_of(base, identity)
        return cls(
            name,
            base,
            identity,
            structure,
            tokenizer,
            path,
            tokenizer is not None,
            _structure_only(base),
            _attn_implementation(base),
        )

    @classmethod
    def from_structure(
        cls,
        name: str,
        structure: Structure,
        source: str,
        takes_text: bool,
        *,
        converted: bool = False,
        attn_implementation: str | None = None,
    ) -> HostedModel:
        """A stand-in for a model whose weights live elsewhere (in Ray workers).

        It loads the checkpoint's tokenizer (not its weights) when the model takes text, so
        texts are tokenized, checked and their cost estimated before a job is queued. A
        converted model's stand-in is its conversion built here on the meta device (only
        the checkpoint's config and tensor headers are read), pinned to ``structure``'s
        identity: the stand-ins a ``tree`` structure builds have no ``forward`` for the
        cost estimate to run.
        """
        if converted:
            base = _converted_on_meta(source, structure.identity)
        else:  # the served model's attention: the masks its layers see depend on it
            base = structure.build(attn_implementation)
        tokenizer = load_tokenizer(source) if takes_text else None
        return cls(
            name,
            base,
            structure.identity,
            structure,
            tokenizer,
            source,
            takes_text,
            base,
            attn_implementation,
        )

    @classmethod
    def standin(cls, name: str, described: dict[str, Any], source: str) -> HostedModel:
        """The stand-in for a model a worker elsewhere described
        (:func:`torchsurgeon.remote.worker.described`)."""
        return cls.from_structure(
            name,
            Structure.from_json(described["structure"]),
            source,
            described["takes_text"],
            converted=described.get("converted", False),
            attn_implementation=described["attn_implementation"],
        )

    @property
    def converted(self) -> bool:
        """Whether the base is an explicit-dataflow conversion (``ts.load``, ``ts.convert``)."""
        return _is_converted(self.base)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.identity.architecture,
            "identity": self.identity.to_json(),
            "tokenizer": self.takes_text,
            "converted": self.converted,
            "attn_implementation": self.attn_implementation,
        }

    def prepare(
        self,
        plan: Plan,
        limits: Limits,
        inputs: Inputs | None = None,
        runs: Mapping[str, Any] | None = None,
    ) -> tuple[nn.Module, Cost | None]:
        """This request's rewritten view of the base and its estimated cost (``None``
        without inputs); :class:`ApiError` when it cannot be.

        Given the request's ``inputs``, they are checked (:meth:`call_arguments`) and the
        run's cost is estimated on the structure-only copy of the view, so a request over
        ``max_activation_bytes``, ``max_tensor_ops`` or ``max_result_bytes``, or one that
        would fail, is refused here, before it is queued. ``runs`` (a session's later run)
        are the meta records of the earlier runs: then the estimate is made afresh and its
        cost carries this run's meta records.
        """
        match = "exact" if plan.base.fingerprint is not None else "structure"
        known = self.views.view(plan)
        if known is None:
            view = self._apply(plan, self.base, match)
            saves = sum(isinstance(m, Recorder) for _, m in iter_nodes(view))
            self.views.keep_view(plan, view, saves)
        else:
            view, saves = known
        if saves > limits.max_saves:
            raise ApiError(
                422,
                "limit_exceeded",
                f"the plan places {saves} recording layers, over the limit max_saves="
                f"{limits.max_saves}",
                "steps",
            )
        if inputs is not None:
            args, kwargs = self.call_arguments(inputs)
            if inputs.call == "generate":
                return view, self._estimate_generation(plan, view, args, kwargs, limits, match)

            def view_on_meta() -> nn.Module:
                if self.structure_only is None or self.structure_only is self.base:
                    return view
                return self._apply(plan, self.structure_only, match)

            if runs is None:
                return view, self.estimates.check(plan, args, kwargs, limits, view_on_meta)
            cost = estimate(view_on_meta(), args, kwargs, plan.outputs, limits, runs, plan.backward)
            return view, cost
        return view, None

    def read_plan(self, data: bytes, limits: Limits) -> Plan:
        """``Plan.from_bytes(data)`` under ``limits``; the same bytes under the same limits
        are read once (see :class:`Views`). Raises what ``Plan.from_bytes`` raises."""
        plan_limits = limits.plan_limits()
        key = (hashlib.sha256(data).digest(), plan_limits)
        plan = self.views.plan(key)
        if plan is None:
            plan = Plan.from_bytes(data, plan_limits)
            plan = self.views.keep_plan(key, plan, limits.max_cached_plan_bytes)
        return plan

    def meta_view(self, plan: Plan) -> nn.Module:
        """``plan`` applied to the structure-only copy (for estimates)."""
        match = "exact" if plan.base.fingerprint is not None else "structure"
        if self.structure_only is None:
            return self._apply(plan, self.base, match)
        return self._apply(plan, self.structure_only, match)

    def _estimate_generation(
        self,
        plan: Plan,
        view: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limits: Limits,
        match: str,
    ) -> Cost:
        """A generation's cost, bounded by one forward pass over the final length.

        Each step of ``generate`` runs the model on fewer positions than a forward pass over
        the prompt plus every new token, and keeps less (one position per step); so that
        pass, on meta tensors, bounds a step's memory and tensor operations, and its records
        bound the generation's. The token ids come back too.
        """
        ids = args[0] if args else kwargs["input_ids"]
        new = kwargs["max_new_tokens"]
        longer = torch.cat([ids, ids[:, -1:].expand(-1, new)], dim=-1)
        call: dict[str, Any] = {"input_ids": longer}
        mask = kwargs.get("attention_mask")
        if mask is not None:
            call["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], new)], -1)
        meta_view = (
            view
            if self.structure_only is None or self.structure_only is self.base
            else self._apply(plan, self.structure_only, match)
        )
        cost = estimate(meta_view, (), call, Returning(), limits)
        result = cost.record_bytes + longer.numel() * longer.element_size()
        if result > limits.max_result_bytes:
            raise ApiError(
                422,
                "result_too_large",
                f"the generation's records would hold up to {result} bytes, over the limit "
                f"max_result_bytes={limits.max_result_bytes}; save fewer steps (steps=) or "
                "return fewer entries",
                "returning",
            )
        return cost

    def _apply(self, plan: Plan, base: nn.Module, match: str) -> nn.Module:
        try:
            return apply(plan, base, match=match, base_identity=self.identity)  # type: ignore[arg-type]
        except IdentityMismatchError as error:
            raise ApiError(409, "identity_mismatch", f"model {self.name!r}: {error}") from None
        except PlanError as error:
            raise ApiError(422, "plan_does_not_fit", str(error), "steps") from None

    def merged_view(
        self, plans: list[Plan], scoped: Callable[[int, nn.Module], nn.Module]
    ) -> nn.Module:
        """The base with every plan's layers inserted, each as ``scoped(k, layer)`` for
        plan ``k`` (co-batching: each plan was checked alone already)."""
        return merged(wrap(self.base), plans, scoped)

    def call_arguments(self, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The checked model call for ``inputs`` (texts tokenized here, left-padded);
        :class:`ApiError` 422 ``bad_input`` naming the argument at the first problem."""
        return call_arguments(self, inputs)


def merged(
    model: nn.Module, plans: list[Plan], scoped: Callable[[int, nn.Module], nn.Module]
) -> nn.Module:
    """``model`` with the layers of every plan ``k`` inserted as ``scoped(k, layer)``."""
    for k, plan in enumerate(plans):
        for step in plan.steps:
            selection = replay(model, step.selection)
            model = getattr(selection, step.operation)(scoped(k, step.layer.build()))
    return model


def _structure_only(base: nn.Module) -> nn.Module:
    """``base`` on the meta device; its small buffers keep their values (for estimates).

    (Not pinned like ``ts.meta``'s: plans are applied to it with the host's own identity.)
    """
    copy = without_value_warnings(map_tensors(lambda t: t.to("meta"), base))
    copy = with_lineage(copy, Lineage(copy, ()))
    real = dict(base.named_buffers())
    for name, buffer in copy.named_buffers():
        source = real.get(name)
        if source is not None:
            keep_values(buffer, source)
    return copy
