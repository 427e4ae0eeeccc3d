"""Scale-out on Ray: model replicas as Ray actors, in a private Ray cluster bound to loopback.

With ``--ray --replicas N`` the host process keeps the HTTP side (keys, limits, queue) and
holds no weights: each of N :class:`ModelWorker` actors loads every checkpoint once (as its
:class:`~torchsurgeon.remote.hosted.LocalCheckpoint` says: the ``transformers`` model, or
its conversion) and runs requests. The host validates each plan against a structure-only
stand-in built from what the replicas report (for a converted model, its conversion built
on the meta device), then hands the *request bytes* (safetensors) to the pool and gets
*result bytes* back — only ``bytes`` and JSON cross to Ray, never a module or a plan object.
(Ray moves those with its own serializer; torchsurgeon itself never pickles anything.)

**A private cluster, owned by one process.** An unauthenticated Ray cluster runs code for
anyone who reaches one of its ports, and API keys do not guard those ports. So by default
the host joins no cluster (``RAY_ADDRESS`` is ignored) and never calls ``ray.init`` itself: it
starts one child process, the *pool owner*, which starts a fresh single-node cluster of its
own (``ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)``)
and speaks to the host through its stdin and stdout. The owner runs with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` — Ray's single-machine mode, which makes the node's
address the loopback address, where Ray then binds its GCS, raylet, object manager, agents
and workers — and with a fresh random ``RAY_AUTH_TOKEN`` (Ray versions with token
authentication check it; nothing is written to ``~/.ray``). After starting, the owner lists
every socket of every process of its cluster and refuses to serve if one is bound to any
address but loopback. Usage statistics are off (a private host does not phone home), and
so is Ray's auto-connect (no Ray call after shutdown may start a cluster again).

**An operator's cluster, when asked.** Given :class:`RayCluster` ``(address=...)`` (``serve
--ray --ray-address HOST:PORT``), the owner joins that running cluster instead — so a
tensor-parallel group can span its machines — and only if this process is configured for
Ray's token authentication (``RAY_AUTH_MODE=token`` and the cluster's token); a token the
cluster refuses fails the start within two minutes (Ray itself would retry for ever). The
cluster's sockets are on its network by design, so the loopback check is skipped; the owner
still kills only what it started (the cluster's processes are the operator's).

Why our own replacement rather than Ray's ``max_restarts``: a restarted actor reloads the
checkpoints by itself and would run the retried job before anyone could check that it
loaded the same weights, and the host could not tell a restarting replica from a live one.

**Dying together.** The owner reads requests until its stdin closes, which happens when
the host process exits in any way, a SIGKILL included. Then it shuts Ray down and kills
every process its cluster started that is still alive (it keeps a list, refreshed twice a
second — Ray's agents outlive a killed raylet), removes its temporary directory and exits.
If the owner itself is killed, the host kills what the owner last reported.

**Dead replicas.** Twice a second the owner pings every replica (a ping queued behind a
long job simply waits: only an actor's death fails it). A replica whose process died is
replaced by a fresh actor that loads the checkpoints again and must report the very
structure and identity the others do. A job whose replica died under it runs once more on
another live (or the fresh) replica — a job is a forward pass, it has no side effects to
repeat; if that replica dies too, the job fails with ``replica_died``. :meth:`RayPool.health`
(``/v1/health``) says how many replicas are live and how many were replaced.

**Tensor-parallel ranks.** With ``tensor_parallel=N`` the owner starts no replicas: it
reserves a placement group of N CPUs and runs one group of N rank actors in it
(:class:`~torchsurgeon.remote.ray_tp.RankGroup`), every job on all N; the rest — the private
cluster, dying together, the process list — is the same.

Each replica runs torch with ``threads`` intra-op threads (default: this process's thread
count divided among the replicas, at least 1), so N replicas on one machine do not
oversubscribe its cores. A CPU matmul split over another number of threads sums in another
order: results equal a local run bit for bit when the thread counts match.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import IO, Any

import torch

from torchsurgeon.distributed.launch import check_ranks
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel, LocalCheckpoint
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.ray_tp import RankGroup
from torchsurgeon.remote.worker import Outcome, Worker, overran, settled

__all__ = ["PLACEMENTS", "ModelWorker", "RayCluster", "RayPool"]

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray's placement-group strategies, for the bundles of a tensor-parallel rank group."""
_ADDRESS = re.compile(r"(auto|[A-Za-z0-9.-]{1,253}:[0-9]{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5})")


@dataclass(frozen=True)
class RayCluster:
    """Where the Ray actors run, and how a tensor-parallel group's ranks are placed.

    ``address=None`` (the default): the host's own private cluster on loopback, one machine.
    ``address="host:port"`` (or ``"auto"``): an operator's running cluster, joined so a rank
    group can span its machines. Joining is refused unless this process is configured for
    Ray's token authentication (``RAY_AUTH_MODE=token`` and a token in ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``): an unauthenticated cluster runs code
    for anyone who reaches its ports. ``placement`` is the placement group's strategy
    (:data:`PLACEMENTS`): ``"PACK"`` fills as few nodes as it can, ``"STRICT_SPREAD"`` puts
    every rank on a node of its own.
    """

    address: str | None = None
    placement: str = "PACK"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.address is not None and (
            not isinstance(self.address, str) or not _ADDRESS.fullmatch(self.address)
        ):
            raise ValueError(
                "the Ray address must be 'host:port' of a running cluster's head (or 'auto'), "
                f"got {self.address!r}"
            )

    @property
    def private(self) -> bool:
        """Whether this is the host's own loopback-only cluster."""
        return self.address is None


def token_configured(env: Mapping[str, str]) -> bool:
    """Whether ``env`` configures Ray's token authentication, with a token to present."""
    if env.get("RAY_AUTH_MODE") != "token":
        return False
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
        os.path.expanduser("~"), ".ray", "auth_token"
    )
    return os.path.isfile(path) and os.path.getsize(path) > 0


_OWNER = "from torchsurgeon.remote.ray_pool import _owner_main; _owner_main()"
_MONITOR_SECONDS = 0.5
_REPLACE_ATTEMPTS = 3
_WAIT_FOR_REPLICA = 600.0
_HEALTH_TIMEOUT = 5.0
_LOOPBACK_PREFIXES = ("127.", "::1", "::ffff:127.")
_DROPPED_ENV = frozenset({"RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"})  # never join, own token


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


class RayPool:
    """N replicas of :class:`ModelWorker` in a private Ray cluster; :meth:`run` runs a job."""

    def __init__(
        self,
        sources: Mapping[str, str | LocalCheckpoint],
        replicas: int,
        limits: Limits,
        threads: int | None = None,
        *,
        tensor_parallel: int | None = None,
        cluster: RayCluster | None = None,
    ) -> None:
        cluster = cluster or RayCluster()
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if tensor_parallel is not None:
            check_ranks(tensor_parallel, "cpu", name="tensor_parallel", least=2)
            if replicas != 1:
                raise ValueError(
                    "with tensor_parallel, Ray runs one group of ranks (replicas=1), got "
                    f"replicas={replicas}"
                )
        if importlib.util.find_spec("ray") is None:
            raise ImportError("serving with Ray needs Ray: pip install 'torchsurgeon[ray]'")
        actors = tensor_parallel or replicas
        if threads is None:
            threads = max(1, torch.get_num_threads() // actors)
        self.threads = threads
        self.sources = {name: LocalCheckpoint.of(s) for name, s in sources.items()}
        self.merges = tensor_parallel is None
        self.replicas = replicas
        self.tensor_parallel = tensor_parallel
        self.cluster = cluster
        if cluster.private:
            env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
            env.update(
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # one machine: every port on loopback
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN=secrets.token_hex(32),
            )
        else:
            if not token_configured(os.environ):
                raise ValueError(
                    f"joining the Ray cluster at {cluster.address} needs Ray's token "
                    "authentication: set RAY_AUTH_MODE=token and the cluster's token "
                    "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) for this "
                    "process; an unauthenticated cluster runs code for anyone who reaches it"
                )
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # ours: explicit
        env.update(
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_AUTO_CONNECT="0",  # a Ray call after shutdown must not start a cluster
        )
        self._owner = subprocess.Popen(
            [sys.executable, "-c", _OWNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # the terminal's Ctrl-C is the host's to handle
        )
        assert self._owner.stdin is not None and self._owner.stdout is not None
        self._to_owner: IO[bytes] = self._owner.stdin
        self._from_owner: IO[bytes] = self._owner.stdout
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Future[tuple[dict[str, Any], bytes]]] = {}
        self._waiting_lock = threading.Lock()
        self._pids: list[tuple[int, float]] = []
        self._closed = False
        start = {
            "sources": {name: c.to_json() for name, c in self.sources.items()},
            "replicas": replicas,
            "tensor_parallel": tensor_parallel,
            "limits": limits.to_json(),
            "threads": threads,
            "address": cluster.address,
            "placement": cluster.placement,
        }
        try:
            _send(self._to_owner, self._send_lock, {"id": 0, "op": "start", **start})
            ready = _receive(self._from_owner)
        except OSError:
            ready = None
        if ready is None or "failed" in ready[0]:
            self._stop_owner()
            why = ready[0]["failed"] if ready else f"it exited with status {self._owner.poll()}"
            raise RuntimeError(f"the Ray pool did not start: {why}")
        self.described: dict[str, dict[str, Any]] = ready[0]["described"]
        self._pids = [tuple(p) for p in ready[0].get("pids", [])]
        self.owner_pid = self._owner.pid
        self._reader = threading.Thread(
            target=self._read, name="torchsurgeon-ray-pool", daemon=True
        )
        self._reader.start()

    def hosted(self) -> dict[str, HostedModel]:
        """Structure-only stand-ins the host validates plans against."""
        return {
            name: HostedModel.standin(name, self.described[name], str(self.sources[name].path))
            for name in self.sources
        }

    def run(self, name: str, requests: list[bytes], deadline: float) -> list[Any]:
        """Run requests on a live replica (or the rank group) by ``deadline``: per request
        its result bytes, :class:`ApiError` or ``RUN_ALONE``."""
        seconds = deadline - time.monotonic()
        header = {"op": "run", "model": name, "sizes": [len(r) for r in requests]}
        reply, payload = self._call({**header, "seconds": seconds}, b"".join(requests))
        error = reply.get("error")
        if error is not None:
            raise ApiError.from_record(error)
        return [settled(o) for o in _unpacked(reply["outcomes"], payload)]

    def fingerprints(self) -> list[dict[str, str | None]]:
        """Every live replica's fingerprint of every base, computed now."""
        return list(self._call({"op": "fingerprints"})[0]["value"])

    def served(self) -> list[int]:
        """How many requests each live replica has run."""
        return list(self._call({"op": "served"})[0]["value"])

    def health(self, detail: bool = False) -> dict[str, Any]:
        """``state`` (``ok``, ``degraded``, ``down``), live / wanted replicas, replacements.

        With ``detail``, also each replica's state and process id (for operators and tests;
        ``/v1/health`` serves the summary only).
        """
        down = {"state": "down", "live": 0, "replicas": self.replicas}
        if self._closed:
            return down
        try:
            reply, _ = self._call({"op": "health"}, timeout=_HEALTH_TIMEOUT)
        except ApiError:
            return down
        except FutureTimeout:
            return {"state": "unresponsive", "live": None, "replicas": self.replicas}
        health = dict(reply["value"])
        if not detail:
            health.pop("members", None)
        return health

    def close(self) -> None:
        """Stop the owner (which stops Ray and every process it started), then check."""
        self._stop_owner()
        self._reader.join(10)

    # ----------------------------------------------------------------- plumbing

    def _call(
        self, header: dict[str, Any], payload: bytes = b"", timeout: float | None = None
    ) -> tuple[dict[str, Any], bytes]:
        future: Future[tuple[dict[str, Any], bytes]] = Future()
        with self._waiting_lock:
            if self._closed:
                raise _pool_down()
            call_id = next(self._ids)
            self._waiting[call_id] = future
        try:
            _send(self._to_owner, self._send_lock, {**header, "id": call_id}, payload)
        except (OSError, ValueError):  # the owner is gone (its pipe is closed)
            with self._waiting_lock:
                self._waiting.pop(call_id, None)
            raise _pool_down() from None
        try:
            return future.result(timeout)
        finally:
            with self._waiting_lock:
                self._waiting.pop(call_id, None)

    def _read(self) -> None:
        """Hand each reply to its caller; when the owner's pipe closes, fail the rest."""
        while True:
            try:
                message = _receive(self._from_owner)
            except (OSError, ValueError):
                message = None
            if message is None:
                break
            header, payload = message
            if header.get("op") == "pids":
                self._pids = [tuple(p) for p in header["pids"]]
                continue
            with self._waiting_lock:
                future = self._waiting.get(header.get("id", -1))
            if future is not None:
                future.set_result((header, payload))
        with self._waiting_lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for future in waiting:
            future.set_exception(_pool_down())
        if self._owner.poll() is None:  # stdout closed but alive: do not leave it behind
            self._stop_owner()
        else:
            _kill_all(self._pids)

    def _stop_owner(self) -> None:
        with contextlib.suppress(OSError):
            self._to_owner.close()  # end of input: the owner shuts its cluster down
        try:
            self._owner.wait(60)
        except subprocess.TimeoutExpired:
            self._owner.kill()
            self._owner.wait(10)
        _kill_all(self._pids)  # a no-op unless the owner could not clean up
        _kill_all(_session_members(self._owner.pid))  # and what it started after its last list


def _pool_down() -> ApiError:
    return ApiError(
        503,
        "pool_down",
        "the host's Ray pool has stopped (its owner process exited); restart the host",
    )


# --------------------------------------------------------------------------- the wire


def _send(
    stream: IO[bytes], lock: threading.Lock, header: dict[str, Any], payload: bytes = b""
) -> None:
    """One message: 4-byte header length, JSON header (with the payload's size), payload."""
    head = json.dumps({**header, "size": len(payload)}).encode()
    with lock:
        stream.write(struct.pack("<I", len(head)) + head)
        stream.write(payload)
        stream.flush()


def _receive(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next message, or None at the end of the stream."""
    prefix = stream.read(4)
    if len(prefix) < 4:
        return None
    (size,) = struct.unpack("<I", prefix)
    head = stream.read(size)
    if len(head) < size:
        return None
    header = json.loads(head)
    payload = stream.read(header["size"]) if header["size"] else b""
    if len(payload) < header["size"]:
        return None
    return header, payload


def _packed(outcomes: list[Outcome]) -> tuple[list[list[Any]], bytes]:
    """Outcomes as JSON (a result's size in place of its bytes) and the results' bytes."""
    heads, results = [], []
    for kind, value in outcomes:
        if kind == "result":
            heads.append([kind, len(value)])
            results.append(value)
        else:
            heads.append([kind, value])
    return heads, b"".join(results)


def _unpacked(heads: list[list[Any]], payload: bytes) -> list[Outcome]:
    outcomes: list[Outcome] = []
    at = 0
    for kind, value in heads:
        if kind == "result":
            outcomes.append((kind, payload[at : at + value]))
            at += value
        else:
            outcomes.append((kind, value))
    return outcomes


def _split(payload: bytes, sizes: list[int]) -> list[bytes]:
    at, parts = 0, []
    for size in sizes:
        parts.append(payload[at : at + size])
        at += size
    return parts


def _session_members(session: int) -> list[tuple[int, float]]:
    """``(pid, create_time)`` of the processes left in ``session`` (the owner's: it started a
    new session, and every Ray process it spawns stays in it)."""
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for process in psutil.process_iter(["pid", "create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid != os.getpid() and os.getsid(process.pid) == session:
                found.append((process.pid, process.info["create_time"]))
    return found


def _kill_all(pids: list[tuple[int, float]], grace: float = 3.0) -> None:
    """Kill the processes ``(pid, create_time)`` that still run (checked: no reused pid)."""
    if not pids:
        return
    try:
        import psutil
    except ImportError:
        try:
            importlib.import_module("ray")  # Ray ships psutil and puts it on sys.path
            import psutil
        except ImportError:
            return
    alive = []
    for pid, created in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 1e-3:
                alive.append(process)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=grace)


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
