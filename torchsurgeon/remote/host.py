"""The host's state and operations, apart from HTTP: models, keys, the queue, submissions.

:class:`Host` is what the web app (:mod:`torchsurgeon.remote.app`) calls into. It loads
each model once, knows the API keys (stored as SHA-256 digests; a job belongs to the key
that submitted it), and turns a submission into a queued job only after it passed every
check that can be made up front — container and plan validation, identity, replaying the
plan onto the base (cheap: copy-on-write), the save count — so a bad request is refused
with a 4xx at once and never occupies a worker.

Jobs run in worker threads in this process, or, with ``ray_replicas``, in Ray actors
(:mod:`torchsurgeon.remote.ray_pool`) while this process validates against a
structure-only stand-in and holds no weights. Jobs and results live in ``state_dir``
(:mod:`torchsurgeon.remote.store`); a job read back after a restart is validated again from
its stored bytes before it runs. A client's request id (``Idempotency-Key``) is looked up
before any validation, so a retried submission costs the host almost nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from torchsurgeon.remote.batching import BatchPart, batch_key, run_batch
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.execution import prepare_submission, run_submission
from torchsurgeon.remote.hosted import HostedModel, LocalCheckpoint
from torchsurgeon.remote.jobs import JobQueue, JobRecord
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.memory import fitted
from torchsurgeon.remote.store import JobStore
from torchsurgeon.remote.tp_pool import TensorParallelPool

__all__ = ["ANONYMOUS", "Host"]

ANONYMOUS = "anonymous"


class Host:
    """Served models, API keys, limits and the job queue of one host."""

    def __init__(
        self,
        models: Mapping[str, nn.Module | str | Path],
        *,
        api_keys: Iterable[str] | None = None,
        limits: Limits | None = None,
        workers: int = 2,
        ray_replicas: int | None = None,
        ray_threads: int | None = None,
        state_dir: str | Path | None = None,
        co_batch: bool = False,
        tensor_parallel: int | None = None,
        tensor_parallel_device: str = "cpu",
        ray_cluster: Any = None,
    ) -> None:
        """``co_batch``: merge compatible requests of different keys into one forward pass
        (:mod:`torchsurgeon.remote.batching`; in-process workers, not with Ray).
        ``tensor_parallel``: serve each model sharded over that many ranks on this machine
        (:mod:`torchsurgeon.remote.tp_pool`; gloo on ``"cpu"``, NCCL on ``"cuda"``), or with
        ``ray_replicas``, as Ray actors. ``ray_cluster`` (a
        :class:`~torchsurgeon.remote.ray_pool.RayCluster`): which Ray cluster, and how a rank
        group is placed in it (default: the host's private one)."""
        if not models:
            raise ValueError("a host needs at least one model")
        self.limits = fitted(limits or Limits(), workers)  # each run's share of memory
        self._keys = None if api_keys is None else {_digest(k): _digest(k)[:16] for k in api_keys}
        if self._keys is not None and not self._keys:
            raise ValueError("api_keys is empty: pass None to serve without keys")
        self.pool: Any = None
        if tensor_parallel is not None and co_batch:
            raise ValueError("co_batch merges passes of in-process workers, not of sharded ranks")
        if ray_cluster is not None and ray_replicas is None:
            raise ValueError("ray_cluster says where Ray actors run: it needs ray_replicas")
        if tensor_parallel is not None or ray_replicas is not None:
            why = (
                "with tensor_parallel, each rank loads its shards"
                if tensor_parallel is not None
                else "with Ray, each replica loads its own copy"
            )
            sources = _checkpoints(models, why)
            self.pool = _pool(
                sources,
                self.limits,
                ray_replicas,
                ray_threads,
                tensor_parallel,
                tensor_parallel_device,
                ray_cluster,
            )
            self.models = self.pool.hosted(sources)
        else:
            self.models = {name: HostedModel.load(name, src) for name, src in models.items()}
        store = JobStore(state_dir)
        try:
            batcher = None
            if co_batch and self.pool is None:
                limits = self.limits

                def batcher(parts: list[Any]) -> list[tuple[bytes | None, Any]]:
                    return run_batch(parts, limits)

            self.queue = JobQueue(workers, self.limits, store, revive=self._rerun, batcher=batcher)
        except BaseException:
            store.close()
            raise

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        if self.pool is not None:
            self.pool.shutdown()

    # ----------------------------------------------------------------- lookups

    def owner(self, key: str | None) -> str:
        """Who is asking: the key's owner id; 401 when keys are required and this is not one."""
        if self._keys is None:
            return ANONYMOUS
        owner = self._keys.get(_digest(key)) if key else None
        if owner is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid API key is required (header 'Authorization: Bearer <key>')"
                if not key
                else "this API key is not valid here",
            )
        return owner

    def model(self, name: str) -> HostedModel:
        found = self.models.get(name)
        if found is None:
            raise ApiError(
                404,
                "not_found",
                f"no model {name!r}; serving: {', '.join(sorted(self.models))}",
                "model",
            )
        return found

    # ----------------------------------------------------------------- submissions

    def submit(
        self,
        owner: str,
        name: str,
        body: bytes,
        request_key: str | None = None,
        hand_over: bool = False,
    ) -> JobRecord:
        """Check a submission completely, then queue it; :class:`ApiError` if refused.

        With ``request_key``, the job this key already made with it is returned as it is.
        ``hand_over``: the caller waits for the result and forgets the job (a blocking run;
        see :meth:`~torchsurgeon.remote.jobs.JobQueue.take`).
        """
        digest = hashlib.sha256(body).hexdigest()
        if request_key is not None:
            found = self.queue.find(owner, request_key, digest)
            if found is not None:
                return found
        self.queue.admit(owner)  # refuse before paying for validation
        work, key, part = self._prepare(name, body)
        self.queue.start()
        return self.queue.submit(
            owner,
            name,
            work,
            request=body,
            request_key=request_key,
            digest=digest,
            batch_key=key,
            part=part,
            hand_over=hand_over,
        )

    def _rerun(self, name: str, body: bytes) -> bytes:
        """Validate and run a job read back from the store (in a worker thread)."""
        return self._prepare(name, body)[0]()

    def _prepare(self, name: str, body: bytes) -> tuple[Callable[[], bytes], Any, Any]:
        """The job's work, once every up-front check passed, and what co-batching needs (its
        batch key, None when it runs alone; its part); :class:`ApiError` if a check fails."""
        hosted = self.model(name)
        runs = prepare_submission(hosted, body, self.limits)  # inputs checked, cost estimated
        key = batch_key(hosted, runs, runs[0].inputs.alone) if self.pool is None else None
        if self.pool is not None:
            pool = self.pool

            def work() -> bytes:
                return pool.run(name, body)
        else:
            limits = self.limits

            def work() -> bytes:
                return run_submission(hosted, runs, limits)

        return work, key, BatchPart(hosted, runs[0]) if key is not None else None

    def models_json(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.models.values()]


def _pool(
    sources: dict[str, Any],
    limits: Limits,
    ray_replicas: int | None,
    ray_threads: int | None,
    tensor_parallel: int | None,
    device: str,
    ray_cluster: Any,
) -> Any:
    """Where jobs run when not in this process: Ray replicas, tensor-parallel ranks (on this
    machine, or as Ray actors in a placement group)."""
    if ray_replicas is None:
        return TensorParallelPool(sources, tensor_parallel, limits, device=device)
    from torchsurgeon.remote.ray_pool import RayPool

    if tensor_parallel is not None and device != "cpu":
        raise ValueError(
            "tensor-parallel ranks on Ray run on CPU (gloo) here; for NCCL leave Ray out (the "
            "ranks are then this machine's processes, one GPU each)"
        )
    return RayPool(
        sources,
        ray_replicas,
        limits,
        ray_threads,
        tensor_parallel=tensor_parallel,
        cluster=ray_cluster,
    )


def _checkpoints(
    models: Mapping[str, nn.Module | str | Path], why: str
) -> dict[str, str | LocalCheckpoint]:
    """The models as checkpoint paths; a ``TypeError`` for an in-memory module."""
    sources: dict[str, str | LocalCheckpoint] = {}
    for name, source in models.items():
        if isinstance(source, nn.Module):
            raise TypeError(
                f"model {name!r}: {why}, so models are checkpoint paths, not in-memory modules"
            )
        sources[name] = source if isinstance(source, LocalCheckpoint) else str(source)
    return sources


def _digest(key: str | None) -> str:
    return hashlib.sha256((key or "").encode()).hexdigest()
