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
operation that allocated it until the last tensor sharing it is gone), so a broadcast that
would blow a tensor up, or a Patch that would loop for a minute, is refused as the
operation that would pay for it is about to happen on meta. Model code that branches on a
tensor's values (``attention_mask.all()``) gets them: small integer tensors derived from
the inputs carry their real values alongside (a *twin*, computed on the CPU), so the meta
run takes the branch the real run will.

While a job runs, the run-time limit is checked before every module call of its view (a
job past it stops with a ``timeout`` error; see :mod:`torchsurgeon.remote.execution`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import layer_types
from torchsurgeon.layers.graph import Graph
from torchsurgeon.layers.results import run_with
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.returning import Returning
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.remote.errors import ApiError

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
    max_work: float = 1e15
    """Arithmetic one run may do, as estimated: ``2 * m * n * k`` per matrix product and the
    input elements of every other operation (a 70B Llama's forward over 4,000 tokens: about
    5.6e14). Bounds what a view makes cheap in memory and dear in time (``expand`` then
    ``@``, a reduction of an expanded tensor). Set it to what the host's hardware does in
    ``max_run_seconds`` (``serve --max-work``): a CPU core does ~1e10 a second."""
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
    allowed_ops: tuple[str, ...] | None = None
    """Expression operations a plan may use (``None``: all of them; leave out ``"call"`` to
    refuse calls of the model's modules)."""

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


# --------------------------------------------------------------------------- the estimate

_TWIN_ELEMENTS = 1 << 20
"""Tensors up to this many elements carry real values beside the meta ones (see above)."""
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

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self.ops = 0
        self.work = 0.0
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
        self.work += _work(func, flat_in)
        if self.work > self.limits.max_work:
            raise _Refused(
                ApiError(
                    422,
                    "limit_exceeded",
                    f"the run would do about {self.work:.3g} element operations, over the limit "
                    f"max_work={self.limits.max_work:g}; the last was {func} on "
                    f"{[list(t.shape) for t in flat_in][:3]}",
                    "max_work",
                )
            )
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
            return twin.item()
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:
            # An output whose shape depends on values (nonzero, tolist, ...): the twins know.
            out = self._from_values(func, args, kwargs, flat_in, error)
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
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


class _ListIndexes(TorchFunctionMode):
    """Keeps the values of ``x[:, [-1, 0]]`` known on meta tensors.

    Python turns a list index into an index tensor created directly on ``x``'s device —
    on meta, with no values and without passing through the dispatcher, so the meter cannot
    give the result a twin. At the ``Tensor.__getitem__`` call, where the list is still a
    list, the twin is the same index applied to ``x``'s twin.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            func is torch.Tensor.__getitem__
            and isinstance(out, torch.Tensor)
            and out.is_meta
            and _twin(out) is None
            and _plain_index(args[1])
        ):
            twin = _twin(args[0])
            if twin is not None and out.numel() <= _TWIN_ELEMENTS:
                with _disable_current_modes():
                    out._ts_twin = twin[args[1]]
                out._ts_from = args[0].__dict__.get("_ts_from", frozenset())
        return out


def _plain_index(index: Any) -> bool:
    """An index of ints, slices of ints, ``None``, ``...`` and lists of ints only."""
    entries = index if isinstance(index, tuple) else (index,)
    for entry in entries:
        if isinstance(entry, list):
            if not all(type(v) is int for v in entry):
                return False
        elif not (entry is None or entry is Ellipsis or type(entry) in (int, slice)):
            return False
    return True


_PRODUCTS = {
    "mm", "bmm", "addmm", "baddbmm", "matmul", "addbmm", "linear", "dot", "vdot", "mv", "addmv",
}  # fmt: skip


def _work(func: Any, tensors: list[torch.Tensor]) -> float:
    """The arithmetic of one operation: ``2 m n k`` for a matrix product (from the shapes of
    its two last-dimension operands), else the elements it reads."""
    name = getattr(getattr(func, "_schema", None), "name", "").split("::")[-1]
    matrices = [t for t in tensors if t.dim() >= 1]
    if name in _PRODUCTS and len(matrices) >= 2:
        a, b = matrices[-2], matrices[-1]
        batch = max(a.numel() // max(a.shape[-1], 1), 1)
        columns = b.shape[-1] if b.dim() >= 2 else 1
        return 2.0 * batch * a.shape[-1] * columns
    return float(sum(t.numel() for t in tensors))


def _twin(tensor: torch.Tensor) -> torch.Tensor | None:
    return tensor.__dict__.get("_ts_twin") if tensor.is_meta else tensor


def _forget_twin(value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value.__dict__.pop("_ts_twin", None)


def _real(value: Any) -> Any:
    """The CPU twin of a meta tensor (or device), for computing a twin."""
    if isinstance(value, torch.Tensor):
        return _twin(value) if value.is_meta else value
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    return value


def _arguments(func: Any, args: Any, kwargs: Any) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` of every argument of a call of ``func``."""
    schema = func._schema.arguments
    by_name = {argument.name: argument for argument in schema}
    named = [(by_name[name], value) for name, value in kwargs.items() if name in by_name]
    return [*zip(schema, args, strict=False), *named]


def _aliased(
    func: Any, alias: Any, args: Any, kwargs: Any, flat_in: list[torch.Tensor]
) -> torch.Tensor | None:
    """The input a result aliases (by the schema's alias sets), else the first tensor input."""
    for argument, value in _arguments(func, args, kwargs):
        info = argument.alias_info
        if (
            info is not None
            and isinstance(value, torch.Tensor)
            and info.before_set & alias.before_set
        ):
            return value
    return flat_in[0] if flat_in else None


def keep_values(tensor: torch.Tensor, values: torch.Tensor) -> None:
    """Let the meta ``tensor`` carry ``values`` (a CPU copy) as its twin, if it is small."""
    if tensor.is_meta and not values.is_meta and values.numel() <= _TWIN_ELEMENTS:
        tensor._ts_twin = values.detach().to("cpu", copy=True)


def on_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta tensor (small ones keep their values)."""

    def convert(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        copy = torch.empty_like(tensor, device="meta")
        keep_values(copy, tensor)
        return copy

    return tree_map(convert, value)


def _inputs_on_meta(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's inputs on meta, each tensor marked with its name (``args.<i>`` or its key)."""
    meta_args, meta_kwargs = on_meta((tuple(args), dict(kwargs)))
    named = [(f"args.{i}", v) for i, v in enumerate(meta_args)] + list(meta_kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor):
            value._ts_from = frozenset({name})
    return meta_args, meta_kwargs


def estimate(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    returning: Returning,
    limits: Limits,
    runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None = None,
    backward: Graph | None = None,
) -> Cost:
    """The cost of ``run(model, *args, **kwargs)`` reduced by ``returning``, on meta tensors.

    ``model`` is a structure-only view (every tensor on the meta device); ``args`` and
    ``kwargs`` are the real inputs. :class:`ApiError` (422) names the limit a request goes
    over (``max_activation_bytes``, ``max_tensor_ops``, ``max_result_bytes``), or the error
    the run would fail with (``run_failed``, ``bad_returning``), before anything is
    allocated for real.
    """
    meta_args, meta_kwargs = _inputs_on_meta(args, kwargs)
    meter = _Meter(limits)
    phase = "steps"  # where a refusal with no field of its own happened: the plan's layers
    try:
        with torch.set_grad_enabled(backward is not None), _ListIndexes(), meter:
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
    return Cost(meter.peak, size, meter.ops, frozenset(meter.consulted), recorded, records)


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (tuple, list)):  # torch.return_types.topk is a tuple
        return [t for v in value for t in _tensors_in(v)]
    return []


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
