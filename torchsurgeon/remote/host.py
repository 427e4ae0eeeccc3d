"""The host's state and operations, apart from HTTP: models, keys, the queue, submissions.

:class:`Host` is what the web app (:mod:`torchsurgeon.remote.app`) calls into. It loads
each model once, knows the API keys (stored as SHA-256 digests; a job belongs to the key
that submitted it), and turns a submission into a queued job only after it passed every
check that can be made up front — container and plan validation, identity, replaying the
plan onto the base (cheap: copy-on-write), the save count — so a bad request is refused
with a 4xx at once and never occupies a worker.

Jobs run where its executor says (:mod:`torchsurgeon.remote.executor`): worker threads
of this process, processes it spawns (whole models, or tensor-parallel ranks), or Ray
actors — in the last two this process validates against structure-only stand-ins and holds
no weights. Jobs and results live in ``state_dir``
(:mod:`torchsurgeon.remote.store`); a job read back after a restart is validated again from
its stored bytes before it runs. A client's request id (``Idempotency-Key``) is looked up
before any validation, so a retried submission costs the host almost nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from torchsurgeon.remote.batching import batch_key
from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.execution import prepare_submission
from torchsurgeon.remote.executor import Executor, InProcess, single
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.jobs import JobQueue, JobRecord
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.memory import fitted
from torchsurgeon.remote.spawned import Spawned
from torchsurgeon.remote.store import JobStore

__all__ = ["ANONYMOUS", "Host"]

ANONYMOUS = "anonymous"


class Host:
    """Served models, API keys, limits, the job queue and the executor of one host."""

    def __init__(
        self,
        models: Mapping[str, nn.Module | str | Path],
        *,
        api_keys: Iterable[str] | None = None,
        limits: Limits | None = None,
        workers: int = 2,
        processes: bool = False,
        ray_replicas: int | None = None,
        ray_threads: int | None = None,
        state_dir: str | Path | None = None,
        co_batch: bool = False,
        tensor_parallel: int | None = None,
        tensor_parallel_device: str = "cpu",
        ray_cluster: Any = None,
    ) -> None:
        """``processes``: run the ``workers`` in processes this host spawns (each loads the
        checkpoints; a run past its deadline is killed with its process,
        :mod:`torchsurgeon.remote.spawned`). ``co_batch``: merge compatible requests of
        different keys into one forward pass (:mod:`torchsurgeon.remote.batching`).
        ``tensor_parallel``: serve each model sharded over that many ranks on
        this machine (gloo on ``"cpu"``, NCCL on ``"cuda"``), or with ``ray_replicas``, as Ray
        actors. ``ray_cluster`` (a :class:`~torchsurgeon.remote.ray_pool.RayCluster`): which
        Ray cluster, and how a rank group is placed in it (default: the host's private one)."""
        if not models:
            raise ValueError("a host needs at least one model")
        self.limits = fitted(limits or Limits(), workers)  # each run's share of memory
        self._keys = None if api_keys is None else {_digest(k): _digest(k)[:16] for k in api_keys}
        if self._keys is not None and not self._keys:
            raise ValueError("api_keys is empty: pass None to serve without keys")
        if ray_cluster is not None and ray_replicas is None:
            raise ValueError("ray_cluster says where Ray actors run: it needs ray_replicas")
        if processes and ray_replicas is not None:
            raise ValueError("processes and ray_replicas are two executors: choose one")
        self.executor = _executor(
            models,
            self.limits,
            workers,
            processes,
            ray_replicas,
            ray_threads,
            tensor_parallel,
            tensor_parallel_device,
            ray_cluster,
        )
        self.models = self.executor.hosted()
        if tensor_parallel is not None and ray_replicas is None:
            workers = 1  # one group of ranks: one request at a time
        store = JobStore(state_dir)
        try:
            self._co_batch = co_batch
            batcher = self._batch if co_batch else None
            self.queue = JobQueue(workers, self.limits, store, revive=self._rerun, batcher=batcher)
        except BaseException:
            store.close()
            self.executor.close()
            raise

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.executor.close()

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
        key, part = self._admit(name, body)
        self.queue.start()
        return self.queue.submit(
            owner,
            name,
            self._work(name, body),
            request=body,
            request_key=request_key,
            digest=digest,
            batch_key=key,
            part=part,
            hand_over=hand_over,
        )

    def _rerun(self, name: str, body: bytes, deadline: float) -> bytes:
        """Check and run a job read back from the store (in a worker thread)."""
        self._admit(name, body)
        return self._work(name, body)(deadline)

    def _admit(self, name: str, body: bytes) -> tuple[Any, Queued | None]:
        """Every up-front check (inputs, plan, estimate); the request's batch key (None: it
        runs alone) and what the batcher takes. :class:`ApiError` if a check fails."""
        hosted = self.model(name)
        runs = prepare_submission(hosted, body, self.limits)  # inputs checked, cost estimated
        key = batch_key(hosted, runs, runs[0].inputs.alone) if self._co_batch else None
        return key, Queued(name, body, runs[0].cost) if key is not None else None

    def _work(self, name: str, body: bytes) -> Callable[[float], bytes]:
        executor = self.executor

        def work(deadline: float) -> bytes:
            return single(executor.run(name, [body], deadline))

        return work

    def _batch(self, parts: list[Queued], deadline: float) -> list[tuple[bytes | None, Any]]:
        """One merged pass of queued requests of one batch key (co-batching)."""
        outcomes = self.executor.run(parts[0].model, [p.body for p in parts], deadline)
        return [
            (o, None) if isinstance(o, bytes) else (None, o) for o in outcomes
        ]  # an ApiError, or RUN_ALONE

    def models_json(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.models.values()]


@dataclass(frozen=True)
class Queued:
    """A request as the batcher takes it: its model, its bytes and its estimate."""

    model: str
    body: bytes
    cost: Any


def _executor(
    models: Mapping[str, nn.Module | str | Path],
    limits: Limits,
    workers: int,
    processes: bool,
    ray_replicas: int | None,
    ray_threads: int | None,
    tensor_parallel: int | None,
    device: str,
    ray_cluster: Any,
) -> Executor:
    """Where jobs run: threads of this process, spawned processes (whole models or
    tensor-parallel ranks), or Ray replicas or ranks."""
    if ray_replicas is not None:
        from torchsurgeon.remote.ray_pool import RayPool

        if tensor_parallel is not None and device != "cpu":
            raise ValueError(
                "tensor-parallel ranks on Ray run on CPU (gloo) here; for NCCL leave Ray out "
                "(the ranks are then this machine's processes, one GPU each)"
            )
        sources = _checkpoints(models, "with Ray, each replica loads its own copy")
        return RayPool(
            sources,
            ray_replicas,
            limits,
            ray_threads,
            tensor_parallel=tensor_parallel,
            cluster=ray_cluster,
        )
    if tensor_parallel is not None:
        from torchsurgeon.distributed.launch import check_ranks

        check_ranks(tensor_parallel, device, name="tensor_parallel", least=2)
        sources = _checkpoints(models, "with tensor_parallel, each rank loads its shards")
        return Spawned(sources, limits, size=tensor_parallel, device=device)
    if processes:
        sources = _checkpoints(models, "with processes, each worker process loads its own copy")
        return Spawned(sources, limits, replicas=workers)
    loaded = {name: HostedModel.load(name, src) for name, src in models.items()}
    return InProcess(loaded, limits)


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
