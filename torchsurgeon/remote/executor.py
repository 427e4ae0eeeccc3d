"""Where a queued job runs: the :class:`Executor` protocol every host uses.

One request path: HTTP → admission (read, check, estimate — once, in the HTTP process,
the same for every executor; :mod:`torchsurgeon.remote.host`) → the queue
(:mod:`torchsurgeon.remote.jobs`, whose watchdog is the one timeout authority and hands
every run its deadline) → :meth:`Executor.run` → a :class:`~torchsurgeon.remote.worker.Worker`
→ the wire format. Requests cross as bytes, answers as
:data:`~torchsurgeon.remote.worker.Outcome` records, whatever the executor:

- :class:`InProcess` — worker threads of this process over models loaded here. A run
  checks its deadline between module calls; a run stuck inside one kernel cannot be
  stopped (a thread cannot be killed): the watchdog gives up on it and its result is
  dropped.
- :class:`~torchsurgeon.remote.spawned.Spawned` — spawned processes, each a whole model
  or one rank of a tensor-parallel group; a run past its deadline is killed with its
  process, and a spare takes its place at once.
- :class:`~torchsurgeon.remote.ray_pool.RayPool` — Ray replicas or Ray ranks.

Co-batching is a scheduling step of the queue, open to every executor: the queue hands
:meth:`Executor.run` several requests of one batch key, and the worker runs them in one
merged pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.worker import Worker, settled

__all__ = ["Executor", "InProcess"]


class Executor(Protocol):
    """What the host asks of wherever its jobs run."""

    def hosted(self) -> dict[str, HostedModel]:
        """The models the HTTP process checks requests against (stand-ins or the models)."""
        ...

    def run(self, name: str, requests: Sequence[bytes], deadline: float) -> list[Any]:
        """Run ``requests`` on model ``name`` by ``deadline`` (``time.monotonic()``): per
        request its result bytes, its :class:`ApiError` or ``RUN_ALONE``. Raises
        :class:`ApiError` when the run as a whole failed (timeout, a worker died)."""
        ...

    def health(self) -> dict[str, Any] | None:
        """``{"state": "ok" | "degraded" | "down", ...}``, or ``None`` (always ok)."""
        ...

    def close(self) -> None:
        """Stop every worker and process this executor started."""
        ...


class InProcess:
    """Jobs run in the queue's worker threads, on models loaded in this process."""

    def __init__(self, models: Mapping[str, HostedModel], limits: Limits) -> None:
        self._models = dict(models)
        self.worker = Worker(models, limits)

    def hosted(self) -> dict[str, HostedModel]:
        return self._models

    def run(self, name: str, requests: Sequence[bytes], deadline: float) -> list[Any]:
        del deadline  # each run checks its own (max_run_seconds); the watchdog backs it up
        return [settled(o) for o in self.worker.serve(name, requests)]

    def health(self) -> None:
        return None

    def close(self) -> None:
        return None


def single(outcomes: list[Any]) -> bytes:
    """The one request's result bytes; raises its :class:`ApiError`."""
    (outcome,) = outcomes
    if isinstance(outcome, ApiError):
        raise outcome
    if not isinstance(outcome, bytes):
        raise ApiError(500, "internal", "a run asked to run alone returned no result")
    return outcome
