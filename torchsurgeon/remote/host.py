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

__all__ = ["ANONYMOUS", "Host", "HostConfig"]

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class HostConfig:
    """Where and how a host runs its jobs: the options of ``create_app`` / ``serve``.

    Args:
        workers: job worker threads (with ``processes``, worker processes).
        processes: run the workers in processes this host spawns (each loads the
            checkpoints; a run past its deadline is killed with its process,
            :mod:`torchsurgeon.remote.spawned`).
        co_batch: merge compatible requests of different keys into one forward pass
            (:mod:`torchsurgeon.remote.batching`).
        state_dir: where jobs and results persist (None: a temporary directory).
        tensor_parallel: serve each model sharded over that many ranks (gloo on ``"cpu"``,
            NCCL on ``"cuda"``: ``tensor_parallel_device``), or with ``ray_replicas``, as
            Ray actors.
        tensor_parallel_device: the ranks' device.
        ray_replicas: run that many Ray replicas (or, with ``tensor_parallel``, one group
            of Ray ranks).
        ray_threads: torch threads per Ray actor (default: this machine's shared out).
        ray_cluster: a :class:`~torchsurgeon.remote.ray_pool.RayCluster`: which Ray cluster,
            and how a rank group is placed in it (default: the host's private one).
    """

    workers: int = 2
    processes: bool = False
    co_batch: bool = False
    state_dir: str | Path | None = None
    tensor_parallel: int | None = None
    tensor_parallel_device: str = "cpu"
    ray_replicas: int | None = None
    ray_threads: int | None = None
    ray_cluster: Any = None

    def __post_init__(self) -> None:
        if self.ray_cluster is not None and self.ray_replicas is None:
            raise ValueError("ray_cluster says where Ray actors run: it needs ray_replicas")
        if self.processes and self.ray_replicas is not None:
            raise ValueError("processes and ray_replicas are two executors: choose one")


class Host:
    """Served models, API keys, limits, the job queue and the executor of one host."""

    def __init__(
        self,
        models: Mapping[str, nn.Module | str | Path],
        config: HostConfig | None = None,
        *,
        api_keys: Iterable[str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        """Args:
        models: each served model by name: a module, or a local checkpoint directory
            (checkpoints only when the workers are processes or Ray actors).
        config: where and how jobs run (:class:`HostConfig`).
        api_keys: the keys that may submit (None: no keys needed).
        limits: what one request may cost (:class:`~torchsurgeon.remote.limits.Limits`).
        """
        if not models:
            raise ValueError("a host needs at least one model")
        config = config or HostConfig()
        workers = config.workers
        self.limits = fitted(limits or Limits(), workers)  # each run's share of memory
        self._keys = None if api_keys is None else {_digest(k): _digest(k)[:16] for k in api_keys}
        if self._keys is not None and not self._keys:
            raise ValueError("api_keys is empty: pass None to serve without keys")
        self.executor = _executor(models, self.limits, config)
        self.models = self.executor.hosted()
        if config.tensor_parallel is not None and config.ray_replicas is None:
            workers = 1  # one group of ranks: one request at a time
        self._co_batch = config.co_batch
        store = JobStore(config.state_dir)
        try:
            batcher = self._batch if config.co_batch else None
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
    models: Mapping[str, nn.Module | str | Path], limits: Limits, config: HostConfig
) -> Executor:
    """Where jobs run: threads of this process, spawned processes (whole models or
    tensor-parallel ranks), or Ray replicas or ranks."""
    device = config.tensor_parallel_device
    if config.ray_replicas is not None:
        from torchsurgeon.remote.ray_pool import RayPool

        if config.tensor_parallel is not None and device != "cpu":
            raise ValueError(
                "tensor-parallel ranks on Ray run on CPU (gloo) here; for NCCL leave Ray out "
                "(the ranks are then this machine's processes, one GPU each)"
            )
        sources = _checkpoints(models, "with Ray, each replica loads its own copy")
        return RayPool(
            sources,
            config.ray_replicas,
            limits,
            config.ray_threads,
            tensor_parallel=config.tensor_parallel,
            cluster=config.ray_cluster,
        )
    if config.tensor_parallel is not None:
        from torchsurgeon.distributed.launch import check_ranks

        check_ranks(config.tensor_parallel, device, name="tensor_parallel", least=2)
        sources = _checkpoints(models, "with tensor_parallel, each rank loads its shards")
        return Spawned(sources, limits, size=config.tensor_parallel, device=device)
    if config.processes:
        sources = _checkpoints(models, "with processes, each worker process loads its own copy")
        return Spawned(sources, limits, replicas=config.workers)
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
