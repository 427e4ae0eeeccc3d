"""The Ray pool's owner process: it starts (or joins) the Ray cluster, runs the replicas —
:class:`ModelWorker` actors, each a :class:`~torchsurgeon.remote.worker.Worker` — or the
rank group, replaces the dead and kills a run still going at its deadline, and takes every
Ray process with it when the host goes. It speaks to the host
(:class:`~torchsurgeon.remote.ray_pool.RayPool`) over its stdin and stdout; see
:mod:`torchsurgeon.remote.ray_pool` for why it exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.ray_pool import (
    _kill_all,
    _packed,
    _receive,
    _send,
    _session_members,
    _split,
)
from torchsurgeon.remote.ray_tp import RankGroup
from torchsurgeon.remote.worker import Outcome, Worker, overran

__all__ = ["ModelWorker"]

_MONITOR_SECONDS = 0.5
_REPLACE_ATTEMPTS = 3
_WAIT_FOR_REPLICA = 600.0
_LOOPBACK_PREFIXES = ("127.", "::1", "::ffff:127.")


class ModelWorker(Worker):
    """A Ray actor: a :class:`~torchsurgeon.remote.worker.Worker` holding every served
    model whole."""

    def __init__(
        self, sources: Mapping[str, Mapping[str, Any]], limits: Mapping[str, Any], threads: int
    ) -> None:
        # Ray starts workers with OMP_NUM_THREADS=1; set the count we were given instead.
        loaded = Worker.load(sources, Limits.from_json(dict(limits)), threads)
        super().__init__(loaded.models, loaded.limits)

    def count(self) -> int:
        return self.served

    def ping(self) -> int:
        """This replica's process id (the monitor's sign of life)."""
        return os.getpid()


# --------------------------------------------------------------------------- the host's side


# --------------------------------------------------------------------------- the owner's side


@dataclass
class _Replica:
    actor: Any
    state: str = "starting"  # starting -> live -> dead (replaced) | failed
    pid: int | None = None
    busy: int = 0
    dispatched: int = 0
    ping: Any = None
    reason: str = ""


class _Owner:
    """The Ray driver: starts the cluster and the replicas, runs jobs, replaces the dead."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._temp = tempfile.mkdtemp(prefix="tsray-")
        self._lock = threading.Condition()
        self._stopping = False
        self.replaced = 0
        self.rerun = 0
        self.replicas: list[_Replica] = []
        self.group: RankGroup | None = None  # with tensor_parallel: the ranks, instead
        self.pids: list[tuple[int, float]] = []
        self.monitoring: threading.Thread | None = None

    def boot(self, start: dict[str, Any]) -> None:
        """Start the cluster and the replicas, and check both; raises if it cannot serve."""
        ray = self._ray
        address = start.get("address")
        if address is None:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                _temp_dir=self._temp,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                num_cpus=start.get("tensor_parallel") or start["replicas"],
            )
        else:
            _connect(ray, address)
        self.pids = self._descendants()
        self._args = (start["sources"], start["limits"], start["threads"])
        if start.get("tensor_parallel"):
            placement = start.get("placement", "PACK")
            group = RankGroup(
                ray,
                start["tensor_parallel"],
                *self._args,
                placement=placement,
                private=address is None,
            )
            self.group = group
            self.described = group.described
        else:
            self._start_replicas(start["replicas"])
        self.pids = self._descendants()
        if address is not None:  # an operator's cluster listens on its network by design
            return
        exposed = _exposed_sockets([os.getpid(), *(p for p, _ in self.pids)])
        if exposed:
            raise RuntimeError(
                f"Ray {ray.__version__} listens beyond loopback ({'; '.join(exposed[:3])}); "
                "torchsurgeon serves only from a loopback-only Ray cluster"
            )

    def _start_replicas(self, count: int) -> None:
        ray = self._ray
        self._actor = ray.remote(num_cpus=0)(ModelWorker)
        self.replicas = [_Replica(self._actor.remote(*self._args)) for _ in range(count)]
        described = ray.get([r.actor.describe.remote() for r in self.replicas])
        pids = ray.get([r.actor.ping.remote() for r in self.replicas])
        if any(d != described[0] for d in described):
            raise RuntimeError("the replicas loaded different models from the same paths")
        self.described = described[0]
        for replica, pid in zip(self.replicas, pids, strict=True):
            replica.state, replica.pid = "live", pid

    # ----------------------------------------------------------------- jobs

    def run(self, name: str, requests: list[bytes], seconds: float) -> list[Outcome]:
        """Run requests on the least busy live replica within ``seconds``; a replica that
        died runs them once more on another; one past the deadline is killed and replaced."""
        from ray.exceptions import GetTimeoutError, RayActorError

        if self.group is not None:
            return self.group.run(name, requests, seconds)
        by = time.monotonic() + seconds
        for attempt in range(2):
            replica = self._pick()
            if replica is None:
                failed = ApiError(503, "no_replica", self._no_replica_reason())
                return [("error", failed.to_record())] * len(requests)
            try:
                ref = replica.actor.serve.remote(name, requests)
                left = max(0.0, by - time.monotonic())
                return [tuple(o) for o in self._ray.get(ref, timeout=left)]
            except GetTimeoutError:
                self._lost(replica)  # the only way to stop a run stuck in one kernel
                late = overran("its replica was stopped and replaced")
                return [("error", late.to_record())] * len(requests)
            except RayActorError:
                self._lost(replica)
                if attempt == 0:
                    with self._lock:
                        self.rerun += 1
            finally:
                with self._lock:
                    replica.busy -= 1
        died = ApiError(
            503,
            "replica_died",
            "the replica running this job died, and so did the one it was retried on; the "
            "host is replacing them (see /v1/health)",
        )
        return [("error", died.to_record())] * len(requests)

    def _pick(self) -> _Replica | None:
        """The least busy live replica (waiting while replacements start), or None."""
        deadline = time.monotonic() + _WAIT_FOR_REPLICA
        with self._lock:
            while True:
                live = [r for r in self.replicas if r.state == "live"]
                if live:
                    chosen = min(live, key=lambda r: (r.busy, r.dispatched))
                    chosen.busy += 1
                    chosen.dispatched += 1
                    return chosen
                starting = any(r.state == "starting" for r in self.replicas)
                left = deadline - time.monotonic()
                if not starting or left <= 0 or self._stopping:
                    return None
                self._lock.wait(left)

    def _no_replica_reason(self) -> str:
        reasons = sorted({r.reason for r in self.replicas if r.reason})
        return "no replica is live" + (f": {'; '.join(reasons)}" if reasons else "")

    def each_live(self, method: str) -> list[Any]:
        if self.group is not None:
            return self.group.each(method)
        with self._lock:
            live = [r for r in self.replicas if r.state == "live"]
        return self._ray.get([getattr(r.actor, method).remote() for r in live])

    # ----------------------------------------------------------------- replicas

    def _lost(self, replica: _Replica) -> None:
        """``replica``'s actor died: take it out of rotation and start a fresh one."""
        with self._lock:
            if replica.state != "live" or self._stopping:
                return
            replica.state = "dead"
            index = self.replicas.index(replica)
            fresh = _Replica(self._actor.remote(*self._args))
            self.replicas[index] = fresh
        with contextlib.suppress(Exception):
            self._ray.kill(replica.actor, no_restart=True)
        threading.Thread(target=self._start, args=(fresh,), daemon=True).start()

    def _start(self, replica: _Replica) -> None:
        """Wait for a fresh replica to load; it goes live only if it loaded the same models."""
        from ray.exceptions import RayError

        reason = ""
        for attempt in range(_REPLACE_ATTEMPTS):
            try:
                described = self._ray.get(replica.actor.describe.remote())
                pid = self._ray.get(replica.actor.ping.remote())
            except RayError as error:
                reason = f"a replacement replica failed to start: {type(error).__name__}"
                if attempt + 1 < _REPLACE_ATTEMPTS and not self._stopping:
                    with self._lock:
                        replica.actor = self._actor.remote(*self._args)
                    continue
                break
            if described != self.described:
                reason = "a replacement replica loaded a different model from the same path"
                with contextlib.suppress(Exception):
                    self._ray.kill(replica.actor, no_restart=True)
                break
            with self._lock:
                replica.state, replica.pid = "live", pid
                self.replaced += 1
                self._lock.notify_all()
            return
        with self._lock:
            replica.state, replica.reason = "failed", reason
            self._lock.notify_all()

    def monitor(self, report: Any) -> None:
        """Ping the live replicas, replace dead ones, keep (and report) the process list."""
        while not self._stopping:
            time.sleep(_MONITOR_SECONDS)
            try:
                self._check(report)
            except Exception as error:  # keep watching; a failed round is retried
                if not self._stopping:
                    print(f"torchsurgeon ray pool monitor: {error!r}", file=sys.stderr)

    def _check(self, report: Any) -> None:
        """One round of :meth:`monitor`."""
        from ray.exceptions import RayActorError

        if self.group is not None:
            self.group.check()
        with self._lock:
            live = [r for r in self.replicas if r.state == "live"]
        pending = [r.ping for r in live if r.ping is not None]
        done, _ = (
            self._ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        )
        for replica in live:
            if replica.ping is not None and replica.ping in done:
                ref, replica.ping = replica.ping, None
                try:
                    self._ray.get(ref)
                except RayActorError:
                    self._lost(replica)
                    continue
            if replica.ping is None:
                replica.ping = replica.actor.ping.remote()
        pids = self._descendants()
        if pids != self.pids:
            self.pids = pids
            report(pids)

    def health(self) -> dict[str, Any]:
        if self.group is not None:
            return self.group.health()
        with self._lock:
            members = [
                {"state": r.state, "pid": r.pid, "busy": r.busy, "reason": r.reason}
                for r in self.replicas
            ]
            replaced, rerun = self.replaced, self.rerun
        live = sum(m["state"] == "live" for m in members)
        state = "ok" if live == len(members) else "degraded" if live else "down"
        return {
            "state": state,
            "live": live,
            "replicas": len(members),
            "replaced": replaced,
            "rerun": rerun,
            "members": members,
        }

    def _descendants(self) -> list[tuple[int, float]]:
        import psutil

        found = []
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found.append((process.pid, process.create_time()))
        return sorted(found)

    def close(self) -> None:
        """Shut Ray down and kill whatever of its processes outlives that."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self.monitoring is not None:
            self.monitoring.join(10)
        started = self._descendants()
        if self.group is not None:
            with contextlib.suppress(Exception):
                self.group.close()
        with contextlib.suppress(Exception):
            self._ray.shutdown()
        _kill_all(sorted({*self.pids, *started}))
        _kill_all(_session_members(os.getsid(0)))  # anything started since (ours: setsid)
        shutil.rmtree(self._temp, ignore_errors=True)


_CONNECT_SECONDS = 120.0


def _connect(ray: Any, address: str) -> None:
    """Join the operator's cluster at ``address``, or raise within :data:`_CONNECT_SECONDS`
    (a token the cluster refuses makes Ray retry for ever)."""
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except BaseException as error:  # reported below
            failed.append(error)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(_CONNECT_SECONDS)
    if failed:
        raise RuntimeError(f"could not join the Ray cluster at {address}: {failed[0]}")
    if thread.is_alive():
        raise RuntimeError(
            f"could not join the Ray cluster at {address} within {_CONNECT_SECONDS:g} s (is it "
            "running, and is this process's RAY_AUTH_TOKEN the cluster's?)"
        )


def _exposed_sockets(pids: list[int]) -> list[str]:
    """``"address:port (process)"`` of every socket of ``pids`` bound beyond loopback."""
    import psutil

    exposed = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            sockets = getattr(process, "net_connections", None) or process.connections
            for connection in sockets(kind="inet"):
                address = connection.laddr
                if address and not str(address.ip).startswith(_LOOPBACK_PREFIXES):
                    exposed.append(f"{address.ip}:{address.port} ({process.name()})")
    return exposed


def _owner_main() -> None:
    """The pool owner's process: requests on stdin, replies on stdout, until stdin closes."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)  # Ray's processes inherit neither end of the host's pipe
    os.dup2(2, 1)  # and whatever anything prints goes to stderr, not into the replies
    lock = threading.Lock()
    message = _receive(requests)
    if message is None:
        return
    owner = _Owner()
    try:
        owner.boot(message[0])
    except Exception as error:
        with contextlib.suppress(OSError, ValueError):
            _send(replies, lock, {"id": 0, "failed": f"{type(error).__name__}: {error}"})
        owner.close()
        os._exit(1)
    _send(replies, lock, {"id": 0, "described": owner.described, "pids": owner.pids})

    def report(pids: list[tuple[int, float]]) -> None:
        with contextlib.suppress(OSError, ValueError):
            _send(replies, lock, {"op": "pids", "pids": pids})

    def answer(header: dict[str, Any], payload: bytes) -> None:
        reply: dict[str, Any] = {"id": header["id"]}
        result = b""
        try:
            if header["op"] == "run":
                requests = _split(payload, header["sizes"])
                outcomes = owner.run(header["model"], requests, header["seconds"])
                reply["outcomes"], result = _packed(outcomes)
            elif header["op"] == "health":
                reply["value"] = owner.health()
            elif header["op"] == "fingerprints":
                reply["value"] = owner.each_live("fingerprints")
            elif header["op"] == "served":
                reply["value"] = owner.each_live("count")
        except Exception as error:  # reported to the caller, the owner keeps serving
            reply["error"] = ApiError(
                500, "internal", f"{type(error).__name__}: {error}"
            ).to_record()
        with contextlib.suppress(OSError, ValueError):
            _send(replies, lock, reply, result)

    owner.monitoring = threading.Thread(target=owner.monitor, args=(report,), daemon=True)
    owner.monitoring.start()
    try:
        while (message := _receive(requests)) is not None:
            header, payload = message
            if header.get("op") == "health":
                answer(header, payload)  # cheap: no Ray call
            else:
                threading.Thread(target=answer, args=message, daemon=True).start()
    finally:  # the host closed our stdin or died (or we were told to stop): nothing stays
        owner.close()
        os._exit(0)
