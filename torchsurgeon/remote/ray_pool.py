"""Scale-out on Ray: model replicas as Ray actors, in a private Ray cluster bound to loopback.

With ``--ray --replicas N`` the host process keeps the HTTP side (keys, limits, queue) and
holds no weights: each of N :class:`~torchsurgeon.remote.ray_owner.ModelWorker` actors loads
every checkpoint once (as its :class:`~torchsurgeon.remote.checkpoints.LocalCheckpoint` says: the
``transformers`` model, or its conversion) and runs requests. The host validates each plan
against a structure-only stand-in built from what the replicas report (for a converted
model, its conversion built on the meta device), then hands the *request bytes*
(safetensors) to the pool and gets *result bytes* back — only ``bytes`` and JSON cross to
Ray, never a module or a plan object. (Ray moves those with its own serializer; torchsurgeon
itself never pickles anything.)

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
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import IO, Any

import torch

from torchsurgeon.distributed.launch import check_ranks
from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.worker import Outcome, settled

__all__ = ["PLACEMENTS", "RayCluster", "RayPool"]

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


_OWNER = "from torchsurgeon.remote.ray_owner import _owner_main; _owner_main()"
_HEALTH_TIMEOUT = 5.0
_DROPPED_ENV = frozenset({"RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"})  # never join, own token


class RayPool:
    """Ray replicas (or a Ray rank group) driven by the owner process
    (:mod:`torchsurgeon.remote.ray_owner`); the host's executor with ``ray_replicas``."""

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
