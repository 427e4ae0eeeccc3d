"""A host serving tensor-parallel models: N ranks, each holding one shard of every model.

``torchsurgeon serve --model NAME=PATH --tp N`` (``create_app(..., tensor_parallel=N)``)
starts N rank processes on this machine (``torch.multiprocessing``, *spawn*), joined in one
process group — gloo on CPU, NCCL with one GPU per rank — over a ``TCPStore`` on a loopback
port the operating system picks (the rendezvous of :func:`torchsurgeon.distributed.launch`).
Every rank loads every model from its local checkpoint and shards it with
:func:`~torchsurgeon.distributed.parallelize.parallelize` (the model's own
``base_model_tp_plan``; a checkpoint served converted, by the conversion's heads and MLP
features); rank 0 also describes each model — its structure and identity,
computed from the unsharded model before sharding — so the HTTP process validates plans and
estimates their cost against a structure-only stand-in, exactly as a single-process host
does, and a plan made against one runs on the other.

**A request on N ranks.** The HTTP process holds no weights. For each job it sends the
request's bytes to every rank (each rank has its own inbox, so an idle rank waits on its
queue, never inside a collective that would time out) and waits until every rank has
answered (only rank 0 with the result: a rank that died while the others finished, which
rank 0 may see only as a broken connection, fails the job instead of passing). Every
rank reads the request with the host's limits, replays the plan on its shards with
:func:`torchsurgeon.distributed.localize.apply` — recording layers gather the full
activation once, edits act on each shard, see ``docs/distributed.md`` — and runs it without
gradients (unless the plan asks for ``backward=``) as a single-process host runs it — a
session's runs in order, a generation step by step, a training loop (each rank's gradients
made whole before every step: :mod:`torchsurgeon.distributed.training`); rank 0's encoded
result is the answer. Requests run one at a time (the ranks' collectives must come in the
same order everywhere).

**Failures.** An error in a request (a plan that does not fit, a bad input) is the same on
every rank, so every rank reports it and stays in step; rank 0's is the job's error. A rank
that dies, or a run past ``max_run_seconds`` + ``watchdog_grace_seconds``, fails the job
(``replica_died`` / ``timeout``) and the pool starts all N ranks afresh before the next
job: a process group that lost a member cannot be repaired in place.
"""

from __future__ import annotations

import contextlib
import os
import queue as queues
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from torchsurgeon.distributed.launch import _loopback_store, check_ranks, join_group
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel, LocalCheckpoint
from torchsurgeon.remote.limits import Limits

__all__ = ["TensorParallelPool"]

_START_SECONDS = 600.0
_STOP_GRACE = 5.0


class TensorParallelPool:
    """N ranks serving sharded models; the host's ``pool`` (as :class:`RayPool` is)."""

    def __init__(
        self,
        sources: Mapping[str, str | LocalCheckpoint],
        world_size: int,
        limits: Limits,
        *,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        check_ranks(world_size, device, name="tensor_parallel", least=2)
        self.sources = {name: LocalCheckpoint.of(s) for name, s in sources.items()}
        self.world_size, self.limits, self.device = world_size, limits, device
        self.threads = threads or max(1, (os.cpu_count() or 1) // world_size)
        self._context = mp.get_context("spawn")
        self._lock = threading.Lock()  # one request at a time: collectives come in order
        self._ranks: list[Any] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._store: Any = None
        self.described: dict[str, dict[str, Any]] = {}
        self.restarts = 0
        self._start()

    # ----------------------------------------------------------------- the host's side

    def hosted(self, sources: Mapping[str, Any]) -> dict[str, HostedModel]:
        """Structure-only stand-ins the host validates plans against."""
        from torchsurgeon.plans.structure import Structure

        return {
            name: HostedModel.from_structure(
                name,
                Structure.from_json(self.described[name]["structure"]),
                str(self.sources[name].path),
                self.described[name]["takes_text"],
                converted=self.described[name]["converted"],
                attn_implementation=self.described[name]["attn_implementation"],
            )
            for name in sources
        }

    def run(self, name: str, request: bytes) -> bytes:
        """Run one request on all ranks: rank 0's result bytes, or :class:`ApiError`."""
        limit = self.limits.max_run_seconds + self.limits.watchdog_grace_seconds
        with self._lock:
            if not self._ranks:
                self._start()
            for inbox in self._inboxes:
                inbox.put(("run", name, request))
            try:
                kind, value = self._answer(time.monotonic() + limit)
            except ApiError:
                self._restart()
                raise
        if kind == "error":
            raise ApiError.from_record(value)
        return value

    def health(self) -> dict[str, Any]:
        live = sum(1 for rank in self._ranks if rank.is_alive())
        state = "ok" if live == self.world_size else "down"
        return {"state": state, "live": live, "ranks": self.world_size, "restarts": self.restarts}

    def shutdown(self) -> None:
        with self._lock:
            self._stop()

    # ----------------------------------------------------------------- ranks

    def _start(self) -> None:
        self._store = _loopback_store(self.world_size, _START_SECONDS)
        self._inboxes = [self._context.Queue() for _ in range(self.world_size)]
        self._outbox = self._context.Queue()
        sources = {name: c.to_json() for name, c in self.sources.items()}
        config = (self.world_size, self._store.port, self.device, self.threads, self.limits)
        self._ranks = [
            self._context.Process(
                target=_rank_main,
                args=(rank, config, sources, self._inboxes[rank], self._outbox),
                name=f"torchsurgeon-tp-rank-{rank}",
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for process in self._ranks:
            process.start()
        try:
            kind, value = self._answer(time.monotonic() + _START_SECONDS)
        except ApiError as error:
            self._stop()
            raise RuntimeError(
                f"the tensor-parallel ranks did not start: {error.message}"
            ) from None
        if kind == "error":
            self._stop()
            raise RuntimeError(f"the tensor-parallel ranks did not start: {value['message']}")
        self.described = value

    def _answer(self, deadline: float) -> tuple[str, Any]:
        """Rank 0's answer, once every rank has answered (a rank that died while rank 0
        finished, e.g. with a broken-connection error, fails the job); :class:`ApiError`
        when a rank died or time ran out."""
        answers: dict[int, tuple[str, Any]] = {}
        while len(answers) < self.world_size:
            try:
                rank, kind, value = self._outbox.get(timeout=0.2)
                answers[rank] = (kind, value)
                continue
            except queues.Empty:
                pass
            dead = [r for r, process in enumerate(self._ranks) if not process.is_alive()]
            if dead:
                raise ApiError(
                    500,
                    "replica_died",
                    f"tensor-parallel rank {dead[0]} died (exit code "
                    f"{self._ranks[dead[0]].exitcode}); the ranks are started again",
                )
            if time.monotonic() > deadline:
                raise ApiError(
                    408,
                    "timeout",
                    "the tensor-parallel ranks did not answer within max_run_seconds + "
                    "watchdog_grace_seconds; they are started again",
                )
        return answers[0]

    def _restart(self) -> None:
        self._stop()
        self.restarts += 1

    def _stop(self) -> None:
        for inbox in self._inboxes:
            with contextlib.suppress(OSError, ValueError):  # a queue already closed
                inbox.put(("stop", None, None))
        stop_by = time.monotonic() + _STOP_GRACE
        for process in self._ranks:
            process.join(max(0.0, stop_by - time.monotonic()))
        for process in self._ranks:
            if process.is_alive():
                process.terminate()
                process.join(_STOP_GRACE)
            if process.is_alive():
                process.kill()
                process.join()
        for box in (*self._inboxes, *([self._outbox] if self._outbox is not None else [])):
            box.close()
            box.join_thread()
        self._ranks, self._inboxes, self._outbox, self._store = [], [], None, None


# --------------------------------------------------------------------- in a rank


def _rank_main(
    rank: int, config: tuple[Any, ...], sources: dict[str, Any], inbox: Any, outbox: Any
) -> None:
    """One rank: join the group, load and shard every model, then serve the inbox."""
    import torch.distributed as dist

    world_size, port, device, threads, limits = config
    run_limit = limits.max_run_seconds + limits.watchdog_grace_seconds
    join_group(rank, world_size, port, device, threads, _START_SECONDS, run_limit)
    try:
        try:
            models = _load(sources, device)
        except Exception as error:  # the host reports it and does not start
            outbox.put((rank, "error", {"message": f"{type(error).__name__}: {error}"}))
            return
        described = {name: m[2] for name, m in models.items()} if rank == 0 else None
        outbox.put((rank, "ready", described))
        while True:
            op, name, request = inbox.get()
            if op == "stop":
                break
            kind, value = _serve(models, name, request, limits)
            outbox.put((rank, kind, value if rank == 0 else None))  # rank 0's is the answer
    finally:
        dist.destroy_process_group()
    outbox.close()
    outbox.join_thread()
    os._exit(0)  # past the group's teardown; see torchsurgeon.distributed.launch


def _load(sources: dict[str, Any], device: str) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """Every model: its stand-in (for the call's schema), its shards, and its description."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchsurgeon.distributed.parallelize import parallelize
    from torchsurgeon.plans.identity import identity_of
    from torchsurgeon.plans.structure import structure_of
    from torchsurgeon.remote.hosted import _attn_implementation, load_checkpoint
    from torchsurgeon.surgery.frozen import wrap

    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    models = {}
    for name, data in sources.items():
        checkpoint = LocalCheckpoint.from_json(dict(data))
        module, tokenizer = load_checkpoint(checkpoint)
        module = module.eval()
        whole = wrap(module)
        structure = structure_of(whole, identity_of(whole))
        described = {
            "structure": structure.to_json(),
            "takes_text": tokenizer is not None,
            "attn_implementation": _attn_implementation(whole),
            "converted": checkpoint.convert,
        }
        standin = HostedModel.from_structure(
            name,
            structure,
            str(Path(checkpoint.path)),
            tokenizer is not None,
            converted=checkpoint.convert,
            attn_implementation=described["attn_implementation"],
        )
        del whole
        if device == "cuda":
            module = module.to(torch.device("cuda", torch.cuda.current_device()))
        models[name] = (standin, parallelize(module, mesh, "auto"), described)
    return models


def _serve(
    models: dict[str, tuple[Any, Any, dict[str, Any]]], name: str, request: bytes, limits: Limits
) -> tuple[str, Any]:
    """One request on this rank: ``("result", bytes)`` (rank 0's is sent) or an error."""
    from torchsurgeon.remote.execution import prepare_submission, run_submission

    try:
        standin, sharded, _ = models[name]
        # the checks a single host makes (the HTTP process estimated the cost already)
        runs = prepare_submission(_OnShards(standin, sharded), request, limits, estimate=False)
        return "result", run_submission(standin, runs, limits)  # as a single host runs it
    except ApiError as error:
        return "error", error.to_record()
    except Exception as error:  # the same on every rank
        message = f"{type(error).__name__}: {error}"
        return "error", ApiError(500, "internal", message).to_record()


class _OnShards:
    """The stand-in's checks, with each plan replayed on this rank's shards (``tsd.apply``)
    where a single host would rewrite its weights."""

    def __init__(self, standin: HostedModel, sharded: Any) -> None:
        self._standin, self._sharded = standin, sharded

    def __getattr__(self, name: str) -> Any:  # read_plan, call_arguments, name, takes_text
        return getattr(self._standin, name)

    def prepare(self, plan: Any, limits: Limits, *_: Any) -> tuple[Any, None]:
        from torchsurgeon.distributed.localize import apply
        from torchsurgeon.distributed.parallelize import TensorParallelError
        from torchsurgeon.plans.errors import IdentityMismatchError, PlanError

        try:
            return apply(plan, self._sharded), None
        except IdentityMismatchError as error:
            message = f"model {self._standin.name!r}: {error}"
            raise ApiError(409, "identity_mismatch", message) from None
        except (PlanError, TensorParallelError) as error:  # e.g. a site inside a TP region
            raise ApiError(422, "plan_does_not_fit", str(error), "steps") from None
