"""Workers as processes this host spawns, and can kill: ``serve --processes N`` / ``--tp N``.

A *group* is ``size`` processes serving together (``torch.multiprocessing``, *spawn*): with
``size=1`` one process holding every model whole, with ``size=N`` the N ranks of a
tensor-parallel group — gloo on CPU, NCCL with one GPU per rank — joined over a
``TCPStore`` on a loopback port the operating system picks
(:mod:`torchsurgeon.remote.sharded_models`). Every process is a
:class:`~torchsurgeon.remote.worker.Worker`. The HTTP process holds no weights: it checks
and estimates requests against structure-only stand-ins built from what rank 0 describes.

**A request.** :meth:`Spawned.run` takes an idle live group (the least used), sends the
request bytes to each of its processes (each has its own inbox, so an idle rank waits on
its queue, never inside a collective that would time out) and waits for every process to
answer (rank 0's outcomes are the answer; a rank that died while rank 0 finished fails the
job instead of passing). A group serves one request (or one merged batch) at a time.

**Deadlines and deaths.** The queue hands each run its deadline. A group that has not
answered by then is killed — a run stuck inside one long kernel included — and the job
ends ``timeout``; a group with a dead process ends its job ``replica_died``, which runs once
more on another live group if there is one. Either way a fresh group starts in the
background and joins the set once it describes the very models the others do. With
``spares`` (default: one for whole-model processes) the set holds more groups than runs
can occupy, so a killed group's place is taken at once.
"""

from __future__ import annotations

import contextlib
import os
import queue as queues
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch.multiprocessing as mp

from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.worker import overran, settled

__all__ = ["Spawned"]

_START_SECONDS = 600.0
_STOP_GRACE = 5.0


class _Group:
    """``size`` processes serving together; ``rank 0``'s answer is the group's."""

    def __init__(self, config: dict[str, Any], number: int) -> None:
        self.size, self.number = config["size"], number
        context = mp.get_context("spawn")
        self._store = None
        port = 0
        if self.size > 1:
            from torchsurgeon.distributed.launch import _loopback_store

            self._store = _loopback_store(self.size, _START_SECONDS)
            port = self._store.port
        self._inboxes = [context.Queue() for _ in range(self.size)]
        self._outbox = context.Queue()
        args = (self.size, port, config["device"], config["threads"], config["limits"])
        self.processes = [
            context.Process(
                target=_process_main,
                args=(rank, args, config["sources"], self._inboxes[rank], self._outbox),
                name=f"torchsurgeon-worker-{number}-{rank}",
                daemon=True,
            )
            for rank in range(self.size)
        ]
        for process in self.processes:
            process.start()
        self.busy = False
        self.served = 0

    def ready(self) -> dict[str, Any]:
        """Rank 0's description of its models, once every process loaded them."""
        try:
            kind, value = self._answer(time.monotonic() + _START_SECONDS, "starting")
        except ApiError as error:
            raise RuntimeError(f"the worker processes did not start: {error.message}") from None
        if kind == "failed":
            raise RuntimeError(f"the worker processes did not start: {value}")
        return value

    def run(self, name: str, requests: Sequence[bytes], deadline: float) -> list[Any]:
        """Rank 0's outcomes; :class:`ApiError` when a process died or time ran out."""
        for inbox in self._inboxes:
            inbox.put(("run", name, list(requests)))
        self.served += 1
        return self._answer(deadline, "running")[1]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def _answer(self, deadline: float, doing: str) -> tuple[str, Any]:
        answers: dict[int, tuple[str, Any]] = {}
        while len(answers) < self.size:
            try:
                rank, kind, value = self._outbox.get(timeout=0.05)
                answers[rank] = (kind, value)
                continue
            except queues.Empty:
                pass
            dead = [r for r, p in enumerate(self.processes) if not p.is_alive()]
            if dead:
                code = self.processes[dead[0]].exitcode
                who = f"tensor-parallel rank {dead[0]}" if self.size > 1 else "worker process"
                raise ApiError(
                    500,
                    "replica_died",
                    f"the {who} died (exit code {code}) while {doing}; a fresh one is started",
                )
            if time.monotonic() > deadline:
                raise overran("its worker process was stopped and replaced")
        return answers[0]

    def stop(self, grace: float = _STOP_GRACE) -> None:
        """Ask every process to stop; terminate, then kill, what does not within ``grace``."""
        for inbox in self._inboxes:
            with contextlib.suppress(OSError, ValueError):
                inbox.put(("stop", None, None))
        by = time.monotonic() + grace
        for process in self.processes:
            process.join(max(0.0, by - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(_STOP_GRACE)
        for box in (*self._inboxes, self._outbox):
            box.close()
            box.cancel_join_thread()
        self._store = None


class Spawned:
    """Spawned worker groups: the executor of ``processes`` and ``tensor_parallel`` hosts."""

    def __init__(
        self,
        sources: Mapping[str, str | LocalCheckpoint],
        limits: Limits,
        *,
        replicas: int = 1,
        size: int = 1,
        device: str = "cpu",
        threads: int | None = None,
        spares: int | None = None,
    ) -> None:
        """Args:
        sources: each served model's checkpoint.
        limits: the host's limits.
        replicas: how many groups may run at once (the queue's workers).
        size: processes per group (1: a whole model each; N: a tensor-parallel group).
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, one GPU per rank), for ``size > 1``.
        threads: torch threads per process (default: this machine's cores shared out).
        spares: groups held beyond ``replicas`` to take a killed one's place at once
            (default: 1 for whole-model processes, 0 for tensor-parallel groups).
        """
        if size > 1:
            from torchsurgeon.distributed.launch import check_ranks

            check_ranks(size, device, name="tensor_parallel", least=2)
        elif device != "cpu":
            raise ValueError("worker processes of whole models run on 'cpu' here")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"processes must be an int >= 1, got {replicas!r}")
        spares = (1 if size == 1 else 0) if spares is None else spares
        self.sources = {name: LocalCheckpoint.of(s) for name, s in sources.items()}
        self.size = size
        self.target = replicas + spares
        threads = threads or max(1, (os.cpu_count() or 1) // (replicas * size))
        self._config = {
            "size": size,
            "device": device,
            "threads": threads,
            "limits": limits,
            "sources": {name: c.to_json() for name, c in self.sources.items()},
        }
        self._lock = threading.Condition()
        self._groups: list[_Group] = []
        self._starting = 0
        self._numbers = 0
        self.restarts = 0
        self.reason = ""
        self._closed = False
        first = [self._new_group() for _ in range(self.target)]
        try:
            described = [g.ready() for g in first]
        except BaseException:
            for group in first:
                group.kill()
            raise
        if any(d != described[0] for d in described):
            for group in first:
                group.kill()
            raise RuntimeError("the worker processes loaded different models from the same paths")
        self.described: dict[str, dict[str, Any]] = described[0]
        self._groups = first

    # ----------------------------------------------------------------- the executor

    def hosted(self) -> dict[str, HostedModel]:
        """Structure-only stand-ins the host validates plans against."""
        return {
            name: HostedModel.standin(name, self.described[name], str(self.sources[name].path))
            for name in self.sources
        }

    def run(self, name: str, requests: Sequence[bytes], deadline: float) -> list[Any]:
        """Per request its result bytes, :class:`ApiError` or ``RUN_ALONE`` (see the module)."""
        tried: set[int] = set()
        while True:
            group = self._acquire(deadline, tried)
            try:
                outcomes = group.run(name, requests, deadline)
            except ApiError as failure:
                self._replace(group)
                retry = failure.code == "replica_died" and not tried and self._has_idle()
                tried.add(group.number)
                if retry:
                    continue
                raise
            self._release(group)
            return [settled(o) for o in outcomes]

    def health(self) -> dict[str, Any]:
        with self._lock:
            live = sum(1 for g in self._groups if g.alive())
            starting, restarts = self._starting, self.restarts
        state = "ok" if live >= self.target else "degraded" if live else "down"
        health = {"state": state, "live": live, "replicas": self.target, "restarts": restarts}
        if self.size > 1:
            health["ranks"] = self.size
        if starting:
            health["starting"] = starting
        if self.reason:
            health["reason"] = self.reason
        return health

    def processes(self) -> list[list[Any]]:
        """Each live group's processes (for operators and tests)."""
        with self._lock:
            return [list(g.processes) for g in self._groups]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            groups, self._groups = self._groups, []
            self._lock.notify_all()
        for group in groups:
            group.stop()

    # ----------------------------------------------------------------- the set

    def _new_group(self) -> _Group:
        self._numbers += 1
        return _Group(self._config, self._numbers)

    def _acquire(self, deadline: float, tried: set[int]) -> _Group:
        """The least used idle live group; waits while all are busy or starting."""
        with self._lock:
            while True:
                if self._closed:
                    raise ApiError(503, "pool_down", "the host's worker processes have stopped")
                idle = [g for g in self._groups if not g.busy and g.number not in tried]
                if idle:
                    group = min(idle, key=lambda g: g.served)
                    group.busy = True
                    return group
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(
                        503,
                        "no_replica",
                        "no worker process became free before this run's deadline"
                        + (f" ({self.reason})" if self.reason else ""),
                    )
                self._lock.wait(min(left, 0.5))

    def _has_idle(self) -> bool:
        with self._lock:
            return any(not g.busy for g in self._groups)

    def _release(self, group: _Group) -> None:
        with self._lock:
            group.busy = False
            self._lock.notify_all()

    def _replace(self, group: _Group) -> None:
        """Kill ``group`` and start a fresh one in the background."""
        with self._lock:
            if group in self._groups:
                self._groups.remove(group)
            closed = self._closed
            if not closed:
                self._starting += 1
        group.kill()
        if not closed:
            threading.Thread(target=self._start_fresh, daemon=True).start()

    def _start_fresh(self) -> None:
        try:
            with self._lock:
                fresh = self._new_group()
            try:
                described = fresh.ready()
            except RuntimeError as error:
                fresh.kill()
                self.reason = str(error)
                return
            if described != self.described:
                fresh.kill()
                self.reason = "a restarted worker loaded a different model from the same path"
                return
            with self._lock:
                if self._closed:
                    fresh.stop()
                    return
                self._groups.append(fresh)
                self.restarts += 1
                self.reason = ""
                self._lock.notify_all()
        finally:
            with self._lock:
                self._starting -= 1
                self._lock.notify_all()


# --------------------------------------------------------------------- in a worker process


def _process_main(
    rank: int, config: tuple[Any, ...], sources: dict[str, Any], inbox: Any, outbox: Any
) -> None:
    """One process of a group: load every model (join the group first if sharded), serve."""
    size, port, device, threads, limits = config
    run_limit = limits.max_run_seconds + limits.watchdog_grace_seconds
    if size > 1:
        from torchsurgeon.distributed.launch import join_group

        join_group(rank, size, port, device, threads, _START_SECONDS, run_limit)
    try:
        try:
            if size > 1:
                from torchsurgeon.remote.sharded_models import load_sharded

                worker = load_sharded(sources, device, limits)
            else:
                from torchsurgeon.remote.worker import Worker

                worker = Worker.load(sources, limits, threads)
        except Exception as error:  # the host reports it and does not start
            outbox.put((rank, "failed", f"{type(error).__name__}: {error}"))
            return
        outbox.put((rank, "ready", worker.describe() if rank == 0 else None))
        while True:
            op, name, requests = inbox.get()
            if op == "stop":
                break
            outcomes = worker.serve(name, requests)
            outbox.put((rank, "done", outcomes if rank == 0 else None))  # rank 0's is the answer
    finally:
        if size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
        outbox.close()
        outbox.join_thread()
        os._exit(0)  # past the group's teardown; see torchsurgeon.distributed.launch
