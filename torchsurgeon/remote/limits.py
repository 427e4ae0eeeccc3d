"""What one request may cost a host — sizes, saves, memory, work, queue depth, run time.

A host shares one model among many users, so every request is bounded, and going over a
bound is a clear 4xx answer naming the limit (``413``/``422``/``429``) — never a crash or a
stuck worker.

Sizes a request *declares* are checked as it is read. What it would *cost* — the memory
its activations take, the bytes of its result, the number of tensor operations, its time —
is estimated on meta tensors before a byte is allocated (:mod:`torchsurgeon.remote.estimates`).

While a job runs, the run-time limit is checked before every module call of its view (a
job past it stops with a ``timeout`` error; see :mod:`torchsurgeon.remote.execution`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchsurgeon.layers.base import layer_types
from torchsurgeon.plans.schema import PlanLimits

if TYPE_CHECKING:
    from torchsurgeon.remote.estimates import Cost

__all__ = ["MIN_TIME_BUDGET", "TIME_FRACTION", "Limits"]


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
