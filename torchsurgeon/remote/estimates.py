"""The estimate of what a request would cost, made on meta tensors before it is queued, and
the costs a host already estimated (:class:`Estimates`), so a repeated request is not
estimated again.

The request's view of a structure-only (meta) copy of the model runs on meta copies of the
inputs (:func:`estimate`), under a ``TorchDispatchMode`` that sees every tensor operation.
It tracks the bytes of every tensor alive (a tensor's storage is counted once, from the
operation that allocated it until the last tensor sharing it is gone) and the seconds each
operation would take at this host's measured speed for its dtype
(:mod:`~torchsurgeon.remote.calibrate`), so a broadcast that would blow a tensor up, or a
sum over a huge expanded view that would run for minutes, is refused as the operation that
would pay for it is about to happen on meta. Model code that branches on a tensor's values
(``attention_mask.all()``) gets them: small integer tensors derived from the inputs carry
their real values alongside (a *twin*, computed on the CPU,
:mod:`~torchsurgeon.remote.twins`), so the meta run takes the branch the real run will.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.graph import Graph
from torchsurgeon.layers.results import run_with
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.returning import Returning
from torchsurgeon.remote.calibrate import Rates, Uncalibrated, measured_rates, op_cost
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import TIME_FRACTION, Limits
from torchsurgeon.remote.result_wire import tensors_in
from torchsurgeon.remote.twins import (
    _TWIN_ELEMENTS,
    _aliased,
    _arguments,
    _forget_twin,
    _inputs_on_meta,
    _ListIndexes,
    _real,
    _twin,
    keep_values,
    on_meta,
)
from torchsurgeon.surgery.sites import LayerCall, watching

__all__ = ["Cost", "Estimates", "estimate", "keep_values", "on_meta"]

_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


@dataclass(frozen=True)
class Cost:
    """What a run would cost, from :func:`estimate`."""

    peak_bytes: int
    """The most bytes of tensors (activations, saves, outputs) alive at one time."""
    result_bytes: int
    """The bytes the returned tensors take (what travels back)."""
    tensor_ops: int
    consulted: frozenset[str] = frozenset()
    """The inputs (``args.0``, ``attention_mask``, ...) whose *values* the run read to
    decide what to do; for every other input only its dtype and shape mattered."""
    record_bytes: int = 0
    """The part of :attr:`result_bytes` that recorded values take."""
    records: Any = field(default=None, compare=False, repr=False)
    """The meta run's records (for a session's later runs to read), when asked for."""
    work: float = 0.0
    """The arithmetic the run does, as the meter counted it (see ``Limits.max_work``)."""
    layer_calls: tuple[LayerCall, ...] = field(default=(), compare=False, repr=False)
    """Every call of an inserted layer in the meta run, with its target's and its result's
    shapes (co-batching merges only runs whose layers keep their target's rows)."""
    seconds: float = 0.0
    """The run's time at this host's measured speed (0 under a ``Limits.max_work``)."""


class _Refused(Exception):
    """Raised inside the meta run to stop it at the operation that went over a limit."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class _Storage:
    """The bytes of one allocation; its finalizer runs when the last tensor on it is gone."""

    __slots__ = ("__weakref__", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class _Meter(TorchDispatchMode):
    """Counts operations and live tensor bytes of a meta run; stops it at a limit."""

    def __init__(self, limits: Limits, rates: Rates | None) -> None:
        super().__init__()
        self.limits = limits
        self.rates = None if math.isfinite(limits.max_work) else rates
        self.budget = limits.run_budget(Cost(0, 0, 0))[1]
        self.ops = 0
        self.work = 0.0
        self.seconds = 0.0
        self.live = 0
        self.peak = 0
        self.consulted: set[str] = set()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        if self.ops > self.limits.max_tensor_ops:
            raise _Refused(
                ApiError(
                    422,
                    "limit_exceeded",
                    f"the run would perform more than {self.limits.max_tensor_ops} tensor "
                    f"operations (the limit max_tensor_ops); the last was {func}",
                    "max_tensor_ops",
                )
            )
        flat_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self._charge(func, flat_in, [])  # the inputs and the product, before any is computed
        if func is _LOCAL_SCALAR:  # .item(), bool(t): the value decides what runs next
            twin = _twin(args[0])
            if twin is None:
                raise _Refused(
                    ApiError(
                        422,
                        "cannot_estimate",
                        "the model reads the value of a tensor whose values are not known "
                        "before the run (computed from the weights, or too large to follow) "
                        "to decide what to run, so the cost of this request cannot be known "
                        "before it runs",
                    )
                )
            self.consulted.update(args[0].__dict__.get("_ts_from", ()))
            self._commit(func, flat_in, [])
            return twin.item()
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            # An output whose shape depends on values (nonzero, tolist, ...): the twins know.
            out = self._from_values(func, args, kwargs, flat_in, error)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self._commit(func, flat_in, flat_out)
        self._follow_values(func, args, kwargs, flat_in, flat_out)
        returns = func._schema.returns
        for i, tensor in enumerate(flat_out):
            nbytes = tensor.numel() * tensor.element_size()
            alias = returns[min(i, len(returns) - 1)].alias_info if returns else None
            if alias is not None:  # a view or an in-place result: the storage it shares
                source = _aliased(func, alias, args, kwargs, flat_in)
                storage = getattr(source, "_ts_storage", None) if source is not None else None
                if storage is not None:
                    tensor._ts_storage = storage
                continue
            if nbytes > self.limits.max_activation_bytes - self.live:
                raise _Refused(
                    ApiError(
                        422,
                        "limit_exceeded",
                        f"the run would hold {self.live + nbytes} bytes of tensors at once "
                        f"(the operation {func} makes a tensor of shape {list(tensor.shape)}, "
                        f"{nbytes} bytes), over the limit max_activation_bytes="
                        f"{self.limits.max_activation_bytes}",
                        "max_activation_bytes",
                    )
                )
            storage = _Storage(nbytes)
            weakref.finalize(storage, self._free, nbytes)
            tensor._ts_storage = storage
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out

    def _charge(
        self, func: Any, flat_in: list[torch.Tensor], flat_out: list[torch.Tensor]
    ) -> tuple[float, float]:
        """The run's work and seconds with this operation; refused over the budget."""
        try:
            work, seconds = op_cost(func, flat_in, flat_out, self.rates)
        except Uncalibrated as missing:
            raise _Refused(
                ApiError(
                    422,
                    "unsupported_dtype",
                    f"the run computes in {missing.dtype} ({func}), a dtype whose speed this "
                    f"host did not measure ({missing.kind}s), so its cost cannot be known",
                    "dtype",
                )
            ) from None
        work, seconds = self.work + work, self.seconds + seconds
        shapes = [list(t.shape) for t in flat_in][:3]
        if work > self.limits.max_work:
            raise _Refused(
                ApiError(
                    422,
                    "limit_exceeded",
                    f"the run would do about {work:.3g} element operations, over the limit "
                    f"max_work={self.limits.max_work:g}; the last was {func} on {shapes}",
                    "max_work",
                )
            )
        if seconds > self.budget:
            raise _Refused(
                ApiError(
                    422,
                    "limit_exceeded",
                    f"the run would take about {seconds:.3g} s on this host (by its measured "
                    f"speed), over {TIME_FRACTION:g} of the limit max_run_seconds="
                    f"{self.limits.max_run_seconds:g}; the last operation was {func} on "
                    f"{shapes} in {sorted({str(t.dtype) for t in (*flat_in, *flat_out)})}",
                    "max_run_seconds",
                )
            )
        return work, seconds

    def _commit(self, func: Any, flat_in: list[torch.Tensor], flat_out: list[torch.Tensor]) -> None:
        self.work, self.seconds = self._charge(func, flat_in, flat_out)

    def _from_values(
        self, func: Any, args: Any, kwargs: Any, flat_in: list[torch.Tensor], error: Exception
    ) -> Any:
        """``func`` computed on the twins, for an operation meta tensors cannot do."""
        if not all(not t.is_meta or _twin(t) is not None for t in flat_in):
            if isinstance(error, NotImplementedError) or "meta" in str(error):
                raise _Refused(
                    ApiError(
                        422,
                        "cannot_estimate",
                        f"the run calls {func}, whose result depends on values computed from "
                        "the weights (or too large to follow), so the cost of this request "
                        "cannot be known before it runs",
                    )
                ) from None
            raise error
        real = func(*tree_map(_real, args), **tree_map(_real, kwargs))
        for tensor in flat_in:
            self.consulted.update(tensor.__dict__.get("_ts_from", ()))
        device = kwargs.get("device")
        if device is not None and torch.device(device).type != "meta":
            return real  # copied off the meta device on purpose: the values themselves

        def on_meta_with_values(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            copy = torch.empty_like(value, device="meta")
            copy._ts_twin = value
            return copy

        return tree_map(on_meta_with_values, real)

    def _follow_values(
        self,
        func: Any,
        args: Any,
        kwargs: Any,
        flat_in: list[torch.Tensor],
        flat_out: list[torch.Tensor],
    ) -> None:
        """Give the outputs twins when every input has one and the outputs are small."""
        known = all(not t.is_meta or _twin(t) is not None for t in flat_in)
        small = sum(t.numel() for t in flat_out) <= _TWIN_ELEMENTS
        if known and small:
            try:
                real = func(*tree_map(_real, args), **tree_map(_real, kwargs))
            except Exception:  # the twin is a convenience: without it, no value is known
                real = None
            if real is not None:
                twins = [t for t in tree_flatten(real)[0] if isinstance(t, torch.Tensor)]
                if len(twins) == len(flat_out):
                    sources = frozenset().union(*(t.__dict__.get("_ts_from", ()) for t in flat_in))
                    for tensor, twin in zip(flat_out, twins, strict=True):
                        tensor._ts_twin = twin
                        tensor._ts_from = sources  # the inputs these values come from
                    return
        for argument, value in _arguments(func, args, kwargs):
            if argument.alias_info is not None and argument.alias_info.is_write:
                _forget_twin(value)  # written to without its twin: its values are unknown


def estimate(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    returning: Returning,
    limits: Limits,
    runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None = None,
    backward: Graph | None = None,
    rates: Rates | None = None,
) -> Cost:
    """The cost of ``run(model, *args, **kwargs)`` reduced by ``returning``, on meta tensors.

    ``model`` is a structure-only view (every tensor on the meta device); ``args`` and
    ``kwargs`` are the real inputs. :class:`ApiError` (422) names the limit a request goes
    over (``max_activation_bytes``, ``max_tensor_ops``, ``max_result_bytes``), or the error
    the run would fail with (``run_failed``, ``bad_returning``), before anything is
    allocated for real.
    """
    meta_args, meta_kwargs = _inputs_on_meta(args, kwargs)
    if rates is None and not math.isfinite(limits.max_work):
        rates = measured_rates()  # this host's speed: see Limits.max_work
    meter = _Meter(limits, rates)
    phase = "steps"  # where a refusal with no field of its own happened: the plan's layers
    try:
        grad = torch.set_grad_enabled(backward is not None)
        with grad, _ListIndexes(), meter, watching() as calls:
            result = run_with(model, meta_args, meta_kwargs, runs, backward)
            phase = "returning"
            returned = returning.apply(result, model, runs)
    except _Refused as refused:
        error = refused.error
        raise ApiError(error.status, error.code, error.message, error.field or phase) from None
    except PlanError as error:
        raise ApiError(422, "bad_returning", str(error), "returning") from None
    except ExpressionError as error:
        raise ApiError(422, "bad_expression", str(error), error.field or phase) from None
    except Exception as error:  # what the real run would raise: say so before it is queued
        message = f"{type(error).__name__}: {error}".replace("Meta", "")
        raise ApiError(422, "run_failed", message, phase) from None
    recorded = sum(t.numel() * t.element_size() for t in tensors_in(returned.records))
    size = recorded + sum(t.numel() * t.element_size() for t in tensors_in(returned.output))
    if size > limits.max_result_bytes:
        raise ApiError(
            422,
            "result_too_large",
            f"the result would hold {size} bytes, over the limit max_result_bytes="
            f"{limits.max_result_bytes}; return fewer entries or reduce them "
            "(plan.returning(name, mean=..., topk=..., positions=...))",
            "returning",
        )
    records = result.records if runs is not None else None
    return Cost(
        meter.peak,
        size,
        meter.ops,
        frozenset(meter.consulted),
        recorded,
        records,
        meter.work,
        tuple(calls),
        seconds=meter.seconds,
    )


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
