"""The costs a host already estimated (:class:`Estimates`), kept so that a repeated request
is not estimated again; a part of :mod:`torchsurgeon.remote.limits`, which exports it."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from torchsurgeon.plans.plan import Plan
from torchsurgeon.remote.calibrate import measured_rates
from torchsurgeon.remote.limits import Cost, Limits, estimate

__all__ = ["Estimates"]


class Estimates:
    """The costs a host already estimated, so a repeated request is not estimated again.

    An estimate depends on the plan, the limits, the inputs' dtypes and shapes (and scalar
    values), and the values of just those inputs it :attr:`Cost.consulted`: a new prompt of
    the same shape under the same plan costs the same, unless the model read a value of it
    (an attention mask's zeros) to decide what to run — then that input's bytes are part of
    the key too. The plan counts by its manifest, where each of its tensors is a dtype and a
    shape: in the structure-only view a layer's tensors are on the meta device, so no value
    of theirs can decide what runs (a run that tried would be refused as ``cannot_estimate``),
    and a plan that differs from a known one only in its tensors' values (another steering
    vector) costs what it costs. Only requests that fit are remembered; the last ``size`` keys
    are kept.
    """

    def __init__(self, size: int = 256) -> None:
        measured_rates()  # a host's start-up: measure its speed once, before any request
        self._size = size
        self._entries: OrderedDict[str, tuple[frozenset[str], dict[str, Cost]]] = OrderedDict()
        self._lock = threading.Lock()

    def check(
        self,
        plan: Plan,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        limits: Limits,
        view: Callable[[], nn.Module],
    ) -> Cost:
        """The cost of the request, estimated on ``view()`` unless known; :class:`ApiError`."""
        named = {**{f"args.{i}": v for i, v in enumerate(args)}, **kwargs}
        manifest, _ = plan.manifest()  # its tensors by dtype and shape only: see the docstring
        key = _digest(
            json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(),
            repr(sorted(limits.to_json().items())).encode(),
            repr([(k, _signature(v)) for k, v in named.items()]).encode(),
        )
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is not None:
            cost = entry[1].get(_values_digest(named, entry[0]))
            if cost is not None:
                return cost
        cost = estimate(view(), args, kwargs, plan.outputs, limits, backward=plan.backward)
        with self._lock:
            consulted, known = self._entries.setdefault(key, (cost.consulted, {}))
            if consulted == cost.consulted and len(known) < 64:
                known[_values_digest(named, consulted)] = cost
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return cost


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape))
    return ("value", type(value).__name__, repr(value))


def _values_digest(named: Mapping[str, Any], consulted: frozenset[str]) -> str:
    parts = []
    for name in sorted(consulted):
        value = named.get(name)
        if isinstance(value, torch.Tensor):
            parts.append(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        else:
            parts.append(repr(value).encode())
    return _digest(*parts)


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()
