"""Tensor-parallel ranks as Ray actors: ``serve --tp N --ray``.

The ranks of :mod:`torchsurgeon.remote.spawned` need not be this process's children. With
``--ray`` they are N :class:`TensorParallelRank` actors in one Ray *placement group* of N
bundles (one CPU each): Ray decides where each rank runs and keeps the group's resources
reserved while it lives; ``torch.distributed`` does the communicating — rank 0 opens the
rendezvous store, every rank joins one gloo process group through it, loads and shards every
model, and from then on serves each request exactly as a rank of the in-process pool does
(a :class:`~torchsurgeon.remote.worker.Worker` over its shards,
:mod:`torchsurgeon.remote.sharded_models`: replay with ``tsd.apply``, run, rank 0's outcome
is the answer). No home-made cluster: Ray schedules, torch communicates.

By default the actors live in the host's private, loopback-only Ray cluster (see
:mod:`torchsurgeon.remote.ray_pool`, whose pool owner drives this :class:`RankGroup`): the
group spans one machine's cores and the rendezvous listens on loopback. Given an
operator's cluster (``RayCluster(address=...)``, joined with token authentication) the
placement group's strategy decides where the ranks go — ``"PACK"`` as few nodes as
possible, ``"STRICT_SPREAD"`` one node each — so one model spans several machines: rank 0
opens the rendezvous on its node's address, and the ranks' gloo connections run over the
cluster's network, which must be trusted (``torch.distributed`` does not authenticate its
store or its connections).

**Failures.** One request runs at a time (collectives must come in the same order on every
rank). When a rank's actor dies, or the ranks do not answer within ``max_run_seconds`` +
``watchdog_grace_seconds``, the job fails (``replica_died`` / ``timeout``), every actor of
the group is killed, and a fresh group (in the same placement group) starts before the next
job; it must describe the very models the first one did.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.worker import overran

__all__ = ["RankGroup", "TensorParallelRank"]

_START_SECONDS = 600.0


class TensorParallelRank:
    """One rank of a tensor-parallel group, as a Ray actor in the group's placement group."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        sources: Mapping[str, Mapping[str, Any]],
        limits: Mapping[str, Any],
        threads: int,
    ) -> None:
        torch.set_num_threads(threads)  # Ray starts workers with OMP_NUM_THREADS=1
        self.rank, self.world_size, self.threads = rank, world_size, threads
        self.sources = {name: dict(source) for name, source in sources.items()}
        self.limits = Limits.from_json(dict(limits))
        self.worker: Any = None
        self._store: Any = None

    def rendezvous(self, private: bool) -> tuple[str, int]:
        """Rank 0: open the group's store on a port the OS picks: on loopback in the host's
        private cluster, else on this node's address (the other ranks may be elsewhere)."""
        from torchsurgeon.distributed.launch import _rendezvous_store

        host = "127.0.0.1" if private else self._node_address()
        self._store = _rendezvous_store(self.world_size, _START_SECONDS, host)
        return host, int(self._store.port)

    def _node_address(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())

    def join(self, host: str, port: int) -> dict[str, Any] | None:
        """Join the process group, load and shard every model; rank 0 describes them."""
        from torchsurgeon.distributed.launch import join_group
        from torchsurgeon.remote.sharded_models import load_sharded

        run_limit = self.limits.max_run_seconds + self.limits.watchdog_grace_seconds
        join_group(
            self.rank,
            self.world_size,
            port,
            "cpu",
            self.threads,
            _START_SECONDS,
            run_limit,
            host=host,
        )
        self.worker = load_sharded(self.sources, "cpu", self.limits)
        return self.worker.describe() if self.rank == 0 else None

    def run(self, name: str, requests: list[bytes]) -> list[Any] | None:
        """Rank 0's outcomes (:data:`~torchsurgeon.remote.worker.Outcome`); None elsewhere."""
        outcomes = self.worker.serve(name, requests)
        return outcomes if self.rank == 0 else None

    def ping(self) -> int:
        """This rank's process id."""
        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node this rank runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


class RankGroup:
    """The pool owner's side: one placement group and the N rank actors placed in it."""

    def __init__(
        self,
        ray: Any,
        world_size: int,
        sources: Mapping[str, Any],
        limits: Mapping[str, Any],
        threads: int,
        *,
        placement: str = "PACK",
        private: bool = True,
    ) -> None:
        from ray.util.placement_group import placement_group

        self._ray = ray
        self.strategy, self.private = placement, private
        self.nodes: list[str] = []
        self.world_size = world_size
        self._args = (world_size, dict(sources), dict(limits), threads)
        self._lock = threading.Lock()  # one request at a time: collectives come in order
        self.ranks: list[Any] = []
        self.pids: list[int | None] = [None] * world_size
        self._pings: dict[int, Any] = {}
        self._dead: set[int] = set()
        self.restarts = 0
        self.reason = ""
        self.placement = placement_group([{"CPU": 1}] * world_size, strategy=placement)
        if not self.placement.wait(_START_SECONDS):
            raise RuntimeError(
                f"Ray could not reserve {world_size} CPUs for the tensor-parallel ranks "
                f"(placement {placement!r})"
            )
        self.described = self._start()

    def _start(self) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = self._ray.remote(num_cpus=1)(TensorParallelRank)
        self.ranks = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement, placement_group_bundle_index=rank
                ),
                name=None,
            ).remote(rank, *self._args)
            for rank in range(self.world_size)
        ]
        try:
            meeting = self.ranks[0].rendezvous.remote(self.private)
            host, port = self._ray.get(meeting, timeout=_START_SECONDS)
            joined = [r.join.remote(host, port) for r in self.ranks]
            described = self._ray.get(joined, timeout=_START_SECONDS)[0]
            self.pids = self._ray.get([r.ping.remote() for r in self.ranks], timeout=60)
            self.nodes = self._ray.get([r.node.remote() for r in self.ranks], timeout=60)
        except Exception:
            self._stop()
            raise
        return described

    def run(self, name: str, requests: list[bytes], seconds: float) -> list[Any]:
        """Run requests on every rank within ``seconds``: rank 0's outcomes (a failure of
        the group is every request's error)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        with self._lock:
            if not self.ranks:
                failed = self._restart()
                if failed is not None:
                    return [("error", failed)] * len(requests)
            refs = [rank.run.remote(name, requests) for rank in self.ranks]
            try:
                answers = self._ray.get(refs, timeout=max(0.0, seconds))
            except RayActorError:
                self._stop()
                died = "a tensor-parallel rank died during this job; the ranks are started again"
                return [("error", ApiError(500, "replica_died", died).to_record())] * len(requests)
            except GetTimeoutError:
                self._stop()
                late = overran("the tensor-parallel ranks are started again")
                return [("error", late.to_record())] * len(requests)
        return [tuple(o) for o in answers[0]]

    def _restart(self) -> dict[str, Any] | None:
        """A fresh group after a failure; the error to answer with if it cannot start."""
        started = time.monotonic()
        try:
            described = self._start()
        except Exception as error:
            self.reason = f"the ranks did not start again: {type(error).__name__}: {error}"
            return ApiError(503, "replica_died", self.reason).to_record()
        if described != self.described:
            self._stop()
            self.reason = "the restarted ranks loaded different models from the same paths"
            return ApiError(503, "replica_died", self.reason).to_record()
        self.restarts += 1
        self.reason = f"restarted in {time.monotonic() - started:.1f} s"
        return None

    def _stop(self) -> None:
        for rank in self.ranks:
            try:
                self._ray.kill(rank, no_restart=True)
            except Exception:  # already gone
                continue
        self.ranks, self.pids, self._pings, self._dead = [], [None] * self.world_size, {}, set()
        self.nodes = []

    def check(self) -> None:
        """One round of the owner's monitor: note ranks whose actor died (for health; the
        next job fails on them and restarts the group). A ping queued behind a long job
        simply waits: only an actor's death fails it."""
        from ray.exceptions import RayActorError

        ranks, pings, dead = self.ranks, dict(self._pings), set(self._dead)
        waiting = list(pings.values())
        ready = self._ray.wait(waiting, num_returns=len(waiting), timeout=0)[0] if waiting else []
        for index, rank in enumerate(ranks):
            ping = pings.get(index)
            if ping is not None and ping in ready:
                del pings[index]
                try:
                    self._ray.get(ping)
                except RayActorError:
                    dead.add(index)
            if index not in pings and index not in dead:
                pings[index] = rank.ping.remote()
        if ranks is self.ranks:  # not restarted meanwhile (a restart makes a new list)
            self._pings, self._dead = pings, dead

    def each(self, method: str) -> list[Any]:
        """``method()`` of every rank: ``ping`` (their process ids; for operators and tests)."""
        if method != "ping":
            raise ValueError(
                f"the tensor-parallel ranks answer 'ping' only, not {method!r} (a rank holds "
                "shards: no whole-model fingerprint, no per-replica count)"
            )
        with self._lock:
            return list(self._ray.get([getattr(r, method).remote() for r in self.ranks]))

    def health(self) -> dict[str, Any]:
        live = len(self.ranks) - len(self._dead)
        return {
            "state": "ok" if live == self.world_size else "down",
            "live": live,
            "ranks": self.world_size,
            "restarts": self.restarts,
            "members": [
                {"rank": i, "pid": pid, "node": node}
                for i, (pid, node) in enumerate(zip(self.pids, self._padded_nodes(), strict=True))
            ],
            "placement": self.strategy,
        }

    def _padded_nodes(self) -> list[str | None]:
        nodes: list[str | None] = list(self.nodes)
        return nodes + [None] * (len(self.pids) - len(nodes))

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self._stop()
        try:
            remove_placement_group(self.placement)
        except Exception:  # the cluster is going down anyway
            return
