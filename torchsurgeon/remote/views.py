"""The plans a host read and the views it made of them, kept for the next request."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.base import InterventionLayer
from torchsurgeon.plans.plan import Plan
from torchsurgeon.surgery.paths import iter_nodes

__all__ = ["Views"]


class Views:
    """The plans a host read and the views it made of them, kept for the next request.

    Researchers send one plan with many inputs (a probe over a dataset, a sweep over
    prompts); reading a plan (parse, schema, layer checks) and replaying it on the base cost
    a few milliseconds a request. A plan is kept by its bytes and the plan limits it was
    read under, its view (the base rewritten by it) by the plan object, with the count of
    its recording layers. The cache is bounded by bytes, not count: the tensors a plan and
    its view's layers hold (the base they share is not counted) total at most ``max_bytes``
    (``Limits.max_cached_plan_bytes``), least recently used dropped first, and a plan bigger
    than that is not kept; at most ``size`` plans. Both are immutable: a view is a frozen
    tree, and two runs of one view never share records (``ts.run`` gives a run that finds
    the view busy a private copy of its recording sites). A plan that fails to read or to
    apply is not kept.
    """

    def __init__(self, size: int = 64, max_bytes: int = 256 << 20) -> None:
        self._size = size
        self.max_bytes = max_bytes
        self._plans: OrderedDict[tuple[bytes, Any], Plan] = OrderedDict()
        self._views: dict[int, tuple[Plan, nn.Module, int]] = {}
        self._bytes: dict[int, int] = {}
        """The bytes each kept plan holds, with its view's, by ``id(plan)``."""
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """The bytes of tensors the kept plans and views hold (beyond the base)."""
        with self._lock:
            return sum(self._bytes.values())

    def plan(self, key: tuple[bytes, Any]) -> Plan | None:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def keep_plan(self, key: tuple[bytes, Any], plan: Plan, max_bytes: int | None = None) -> Plan:
        """Keep ``plan`` (unless it alone is over ``max_bytes``); the one kept is returned."""
        nbytes = _tensor_bytes(plan.manifest()[1].values())
        with self._lock:
            if max_bytes is not None:
                self.max_bytes = max_bytes
            if key not in self._plans and nbytes > self.max_bytes:
                return plan
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            self._bytes.setdefault(id(plan), nbytes)
            self._evict()
            return plan

    def view(self, plan: Plan) -> tuple[nn.Module, int] | None:
        """The view of a kept ``plan`` (the very object :meth:`keep_plan` returned)."""
        with self._lock:
            entry = self._views.get(id(plan))
        if entry is None or entry[0] is not plan:
            return None
        return entry[1], entry[2]

    def keep_view(self, plan: Plan, view: nn.Module, saves: int) -> None:
        """Keep the view of a kept plan, counting the tensors its layers hold beyond the plan's."""
        own = _storages(plan.manifest()[1].values())
        layers = [
            t for _, m in iter_nodes(view) if isinstance(m, InterventionLayer) for t in m.buffers()
        ]
        extra = sum(n for ptr, n in _storages(layers).items() if ptr not in own)
        with self._lock:
            if not any(kept is plan for kept in self._plans.values()):  # only kept plans' views
                return
            if id(plan) in self._views or self._bytes.get(id(plan), 0) + extra > self.max_bytes:
                return
            self._views[id(plan)] = (plan, view, saves)
            self._bytes[id(plan)] = self._bytes.get(id(plan), 0) + extra
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used plans (and views) past ``size`` plans or ``max_bytes``."""
        while len(self._plans) > self._size or (
            len(self._plans) > 1 and sum(self._bytes.values()) > self.max_bytes
        ):
            _, dropped = self._plans.popitem(last=False)
            self._views.pop(id(dropped), None)
            self._bytes.pop(id(dropped), None)


def _storages(tensors: Any) -> dict[int, int]:
    """``{storage address: its bytes}`` of real tensors (one storage counted once)."""
    found: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _tensor_bytes(tensors: Any) -> int:
    return sum(_storages(tensors).values())
