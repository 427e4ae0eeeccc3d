"""Scale-out on Ray: model replicas as Ray actors, requests spread over them.

With ``--ray --replicas N`` the host process keeps the HTTP side (keys, limits, queue) and
holds no weights: each of N :class:`ModelWorker` actors loads every checkpoint once and
runs requests. The host validates each plan against a structure-only stand-in built from
what the first actor reports, then sends the *request bytes* (safetensors) to the least
busy replica and gets *result bytes* back — only ``bytes`` and ``str`` cross to Ray, never
a module or a plan object. (Ray moves those with its own serializer; torchsurgeon itself
never pickles anything.)

``ray.init()`` starts a local Ray cluster when none is running (or joins the one in
``RAY_ADDRESS``). Each replica runs torch with ``threads`` intra-op threads (default: this
process's thread count divided among the replicas, at least 1), so N replicas on one machine
do not oversubscribe its cores. A CPU matmul split over another number of threads sums in
another order: results equal a local run bit for bit when the thread counts match.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from torchsurgeon.plans.identity import identity_of
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.structure import Structure
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.execution import run_request
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import decode_request

__all__ = ["ModelWorker", "RayPool"]


class ModelWorker:
    """A Ray actor holding every served model; runs requests given as bytes."""

    def __init__(self, sources: Mapping[str, str], limits: Mapping[str, Any], threads: int) -> None:
        # Ray starts workers with OMP_NUM_THREADS=1; set the count we were given instead.
        torch.set_num_threads(threads)
        self.models = {name: HostedModel.load(name, path) for name, path in sources.items()}
        self.limits = Limits.from_json(dict(limits))
        self.served = 0

    def structures(self) -> dict[str, dict[str, Any]]:
        """Each model's structure, and whether it takes text."""
        return {
            name: {"structure": m.structure.to_json(), "takes_text": m.takes_text}
            for name, m in self.models.items()
        }

    def fingerprints(self) -> dict[str, str | None]:
        """Each base's weight fingerprint, computed now (to check nothing changed it)."""
        return {name: identity_of(m.base).fingerprint for name, m in self.models.items()}

    def run(self, name: str, request: bytes) -> tuple[bytes, dict[str, Any] | None]:
        """``(result bytes, None)``, or ``(b"", error)`` with the error as JSON."""
        self.served += 1
        try:
            hosted = self.models[name]
            plan_bytes, inputs = decode_request(request, self.limits)
            plan = Plan.from_bytes(plan_bytes, self.limits.plan_limits())
            view = hosted.prepare(plan, self.limits)
            return run_request(hosted, plan, view, inputs, self.limits), None
        except ApiError as error:
            return b"", {"status": error.status, **error.to_json()["error"]}
        except Exception as error:  # reported to the client as the job's error
            return b"", {"status": 500, "code": "internal", "message": repr(error), "field": ""}

    def count(self) -> int:
        return self.served


class RayPool:
    """N replicas of :class:`ModelWorker`; :meth:`run` picks the least busy one."""

    def __init__(
        self,
        sources: Mapping[str, str],
        replicas: int,
        limits: Limits,
        threads: int | None = None,
    ) -> None:
        import ray

        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._ray = ray
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        actor = ray.remote(num_cpus=0)(ModelWorker)
        if threads is None:
            threads = max(1, torch.get_num_threads() // replicas)
        self.threads = threads
        self.actors = [
            actor.remote(dict(sources), limits.to_json(), threads) for _ in range(replicas)
        ]
        self._busy = [0] * replicas
        self._lock = threading.Lock()
        replies = ray.get([a.structures.remote() for a in self.actors])  # waits for loading
        self.described = replies[0]

    def hosted(self, sources: Mapping[str, str]) -> dict[str, HostedModel]:
        """Structure-only stand-ins the host validates plans against."""
        return {
            name: HostedModel.from_structure(
                name,
                Structure.from_json(self.described[name]["structure"]),
                sources[name],
                self.described[name]["takes_text"],
            )
            for name in sources
        }

    def fingerprints(self) -> list[dict[str, str | None]]:
        """Every replica's fingerprint of every base, computed now."""
        return list(self._ray.get([a.fingerprints.remote() for a in self.actors]))

    def run(self, name: str, request: bytes) -> bytes:
        with self._lock:
            replica = min(range(len(self.actors)), key=self._busy.__getitem__)
            self._busy[replica] += 1
        try:
            result, error = self._ray.get(self.actors[replica].run.remote(name, request))
        finally:
            with self._lock:
                self._busy[replica] -= 1
        if error is not None:
            raise ApiError(error["status"], error["code"], error["message"], error["field"])
        return result

    def served(self) -> list[int]:
        """How many requests each replica has run."""
        return list(self._ray.get([a.count.remote() for a in self.actors]))

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        if self._started_ray:
            self._ray.shutdown()
