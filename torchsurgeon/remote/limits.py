"""What one request may cost a host — sizes, saves, memory, work, queue depth, run time —
and the estimate of that cost, made before the request is queued.

A host shares one model among many users, so every request is bounded, and going over a
bound is a clear 4xx answer naming the limit (``413``/``422``/``429``) — never a crash or a
stuck worker.

Sizes a request *declares* are checked as it is read. What it would *cost* — the memory
its activations take, the bytes of its result, the number of tensor operations — depends on
the model, the plan and the inputs together, and is known before a byte is allocated: the
request's view of a structure-only (meta) copy of the model runs on meta copies of the
inputs (:func:`estimate`), under a ``TorchDispatchMode`` that sees every tensor operation.
It tracks the bytes of every tensor alive (a tensor's storage is counted once, from the
operation that allocated it until the last tensor sharing it is gone) and the seconds each
operation would take at this host's measured speed for its dtype
(:mod:`~torchsurgeon.remote.calibrate`), so a broadcast that would blow a tensor up, or a
sum over a huge expanded view that would run for minutes, is refused as the operation that
would pay for it is about to happen on meta. Model code that branches on a
tensor's values (``attention_mask.all()``) gets them: small integer tensors derived from
the inputs carry their real values alongside (a *twin*, computed on the CPU), so the meta
run takes the branch the real run will.

While a job runs, the run-time limit is checked before every module call of its view (a
job past it stops with a ``timeout`` error; see :mod:`torchsurgeon.remote.execution`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import layer_types
from torchsurgeon.layers.graph import Graph
from torchsurgeon.layers.results import run_with
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.plans.returning import Returning
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.remote.calibrate import Rates, Uncalibrated, measured_rates, op_cost
from torchsurgeon.remote.errors import ApiError
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

__all__ = ["Cost", "Estimates", "Limits", "estimate", "keep_values", "on_meta"]

GRAD_LAYERS = frozenset({"SaveGrad", "ComputeGrad"})
"""The layers that act on the backward pass (refused by a host started with ``--no-grad``)."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds of a host (bytes unless named otherwise)."""

    max_request_bytes: int = 64 << 20
    """A whole submission: the plan plus the inputs."""
    max_plan_bytes: int = 32 << 20
    max_tensor_bytes: int = 16 << 20
    """Any one tensor of a plan or of the inputs."""
    max_steps: int = 256
    max_saves: int = 64
    """Recording layers in the rewritten model."""
    max_text_items: int = 64
    max_text_chars: int = 64 << 10
    max_result_bytes: int = 64 << 20
    max_activation_bytes: int = 4 << 30
    """Tensors alive at once during a run (activations, saves, the output), as estimated."""
    max_tensor_ops: int = 20_000
    """Tensor operations one run may perform, as estimated (a 70B Llama's forward: ~4,000)."""
    max_work: float = math.inf
    """An operator's override of the time estimate: at most this much arithmetic per run
    (elements read and written, plus ``2 m n k`` per product), whatever the dtype. ``inf``
    (the default): each operation is charged ``work / rate`` seconds at the rate this host
    measured for its dtype and kind (:mod:`~torchsurgeon.remote.calibrate`), against
    ``TIME_FRACTION * max_run_seconds`` (``serve --max-work`` sets it, e.g. for a GPU host)."""
    max_json_items: int = 1 << 17
    """Array elements and object members in a plan's JSON (index lists, Patch rows, ...)."""
    max_queue_per_key: int = 32
    """Jobs one API key may have queued or running at once."""
    max_run_seconds: float = 60.0
    result_ttl_seconds: float = 600.0
    """How long a finished job's result is kept for download."""
    max_result_bytes_per_key: int = 1 << 30
    """Finished results one key may hold; over it, its new submissions get a 429."""
    max_running_per_key: int | None = None
    """Jobs of one key running at once; ``None``: every worker but one (at least one)."""
    watchdog_grace_seconds: float = 10.0
    """A job running past ``max_run_seconds`` plus this is failed and its worker replaced."""
    max_abandoned_runs: int = 4
    """Runs the watchdog gave up on that may still be finishing; at it, new work gets a 503."""
    max_overruns_per_key: int = 1
    """Runs of one key that did not stop by themselves at ``max_run_seconds`` and were killed
    (or abandoned) at the watchdog's deadline, within ``overrun_cooldown_seconds``; at it, the
    key's new work gets a 429 — a plan whose cost the estimate misjudged cannot keep killing
    workers (each restart reloads the model)."""
    overrun_cooldown_seconds: float = 60.0
    request_idle_seconds: float = 30.0
    """Longest pause while a request's body arrives before the host answers 408."""
    allow_grad: bool = True
    """Whether plans may run a backward pass (``backward=``, ``SaveGrad``, ``ComputeGrad``);
    ``torchsurgeon serve --no-grad`` turns it off."""
    allow_train: bool = True
    """Whether training runs are served (``torchsurgeon serve --no-train`` turns it off)."""
    max_train_steps: int = 1000
    """Optimizer steps in one training run (the run's time is bounded by max_run_seconds)."""
    max_batch_requests: int = 8
    """Requests one co-batched forward pass may hold (a host started with co-batching)."""
    batch_window_seconds: float = 0.002
    """How long a worker waits for more requests to join a batch that has room."""
    max_session_runs: int = 16
    """Runs in one session request (each is checked and estimated like a request)."""
    max_expr_nodes: int = 1024
    """Nodes in one expression graph of a plan (a layer's, or a computed value's)."""
    max_host_memory_bytes: int | None = None
    """The host process's memory ceiling: a run is stopped (``507 host_memory``) once the
    process holds more (read between module calls and expression nodes), and each run's
    estimate may take at most half of it over the workers (see ``remote/memory.py``).
    ``None``: 90% of what the machine, or its cgroup, allows."""
    max_cached_plan_bytes: int = 256 << 20
    """Bytes of read plans and their views a host keeps per model for the next request
    (least recently used dropped first; a bigger plan is not kept)."""
    allowed_ops: tuple[str, ...] | None = None
    """Expression operations a plan may use (``None``: all of them; leave out ``"call"`` to
    refuse calls of the model's modules)."""

    def run_budget(self, cost: Cost) -> tuple[float, float]:
        """``cost`` as it counts against one run's budget, and that budget: its work against
        ``max_work`` when the operator set one, else its seconds at this host's measured
        speed against :data:`TIME_FRACTION` of ``max_run_seconds``."""
        if math.isfinite(self.max_work):
            return cost.work, self.max_work
        return cost.seconds, max(TIME_FRACTION * self.max_run_seconds, MIN_TIME_BUDGET)

    def __post_init__(self) -> None:
        """Refuse a nonsense bound (NaN, infinite, negative, absurd) naming the field."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            bounds = _BOUNDS.get(item.name)
            if bounds is None or value is None or (item.name == "max_work" and value == math.inf):
                continue  # max_work=inf: no override, the measured time budget decides
            low, high = bounds
            whole = isinstance(item.default, int) or item.name == "max_running_per_key"
            kind = int if whole else (int, float)
            if (
                isinstance(value, bool)
                or not isinstance(value, kind)
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise ValueError(
                    f"Limits.{item.name} must be a finite {'integer' if whole else 'number'} "
                    f"in [{low:g}, {high:g}], got {value!r}"
                )

    def plan_limits(self) -> PlanLimits:
        """The plan reader's limits (the registry's layers; whether the gradient layers may
        run is :attr:`allow_grad`'s, checked with a message naming the flag)."""
        return PlanLimits(
            max_plan_bytes=self.max_plan_bytes,
            max_steps=self.max_steps,
            max_tensor_bytes=self.max_tensor_bytes,
            max_total_tensor_bytes=self.max_plan_bytes,
            max_json_items=self.max_json_items,
            allowed_layers=frozenset(layer_types()),  # gradient layers: see allow_grad
            allowed_ops=None if self.allowed_ops is None else frozenset(self.allowed_ops),
            max_expr_nodes=self.max_expr_nodes,
        )

    def request_limits(self) -> PlanLimits:
        """The container limits of a submission (plan bytes travel inside it)."""
        return PlanLimits(
            max_plan_bytes=self.max_request_bytes,
            max_tensor_bytes=self.max_request_bytes,  # the plan and each input: checked apart
            max_total_tensor_bytes=self.max_request_bytes,
            max_tensors=64 * self.max_session_runs,
            max_json_items=4096 * self.max_session_runs,  # a few arguments, at most 64 texts
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        data = dict(data)
        if data.get("allowed_ops") is not None:
            data["allowed_ops"] = tuple(data["allowed_ops"])
        return cls(**data)


_DAY = 86_400.0
_BOUNDS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(
        ("max_request_bytes", "max_plan_bytes", "max_tensor_bytes", "max_result_bytes"),
        (1, 1 << 40),
    ),
    "max_activation_bytes": (1, 1 << 50),
    "max_result_bytes_per_key": (1, 1 << 50),
    "max_cached_plan_bytes": (0, 1 << 40),
    "max_host_memory_bytes": (1 << 20, 1 << 50),
    **dict.fromkeys(("max_saves", "max_text_items", "max_abandoned_runs"), (0, 1 << 20)),
    **dict.fromkeys(("max_steps", "max_tensor_ops", "max_json_items"), (1, 1 << 30)),
    **dict.fromkeys(
        ("max_queue_per_key", "max_running_per_key", "max_overruns_per_key"), (1, 1 << 20)
    ),
    **dict.fromkeys(("max_batch_requests", "max_session_runs", "max_expr_nodes"), (1, 1 << 20)),
    "max_text_chars": (0, 1 << 30),
    "max_train_steps": (0, 1 << 30),
    "max_work": (1, 1e24),
    "max_run_seconds": (0, 30 * _DAY),
    "result_ttl_seconds": (0, 365 * _DAY),
    "watchdog_grace_seconds": (0, _DAY),
    "overrun_cooldown_seconds": (0, _DAY),
    "request_idle_seconds": (1e-3, _DAY),
    "batch_window_seconds": (0, 60),
}
"""``(lowest, highest)`` of each numeric field of :class:`Limits` (``max_run_seconds=0``: every
job times out, as tests want; ``serve`` asks for more)."""

TIME_FRACTION = 0.5
"""The part of ``max_run_seconds`` a request's estimated time may take: the rates are the
host's best, and a busy host runs slower."""
MIN_TIME_BUDGET = 0.05
"""Seconds any budget allows: below it the estimate is noise, and the run-time deadline,
checked at every module call, stops what overruns."""


# --------------------------------------------------------------------------- the estimate

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
    recorded = sum(t.numel() * t.element_size() for t in _tensors_in(returned.records))
    size = recorded + sum(t.numel() * t.element_size() for t in _tensors_in(returned.output))
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


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (tuple, list)):  # torch.return_types.topk is a tuple
        return [t for v in value for t in _tensors_in(v)]
    return []


from torchsurgeon.remote.estimates import Estimates  # noqa: E402  (it uses estimate, above)
