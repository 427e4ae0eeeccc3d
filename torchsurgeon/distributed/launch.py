"""Ranks on one machine: ``launch`` a function on N processes, ``run_plan`` a plan on them.

:func:`launch` starts ``world_size`` processes (``torch.multiprocessing``, *spawn*: fresh
interpreters, nothing inherited), joins them into a process group — gloo on CPU, NCCL on
GPUs (one per rank) — and runs ``fn(*args)`` on every one; it returns what rank 0 returned.
The rendezvous is a ``TCPStore`` the launching process opens on a free loopback port (the
operating system picks it: no port is guessed, so two launches never collide; it listens on
127.0.0.1 only), and the ranks' own connections use the loopback interface. The whole
launch is bounded in time: past ``timeout`` seconds, or as soon as one rank fails, every
rank is stopped (terminated, then killed) and the error names the rank and carries its
traceback. Each rank runs with ``torch.set_num_threads(threads)`` (1 by default: N ranks
share the machine's cores).

Rank 0 hands its return value back through a file in a private temporary directory the
launching process made (``torch.save``/``torch.load``: a value made by our own child
process, on this machine — nothing from outside is unpickled). The directory is removed
when the launch ends, however it ends.

:func:`run_plans` is what a tensor-parallel host does with requests: every rank builds the
model (a picklable factory, or a local Hugging Face checkpoint directory), shards it with
:func:`~torchsurgeon.distributed.parallelize.parallelize`, and for each plan — sent to the
ranks as bytes (``Plan.to_bytes``) and read back with every check a host makes — replays it
with :func:`~torchsurgeon.distributed.localize.apply`, runs it with ``ts.run`` (no
gradients) and applies the plan's reductions. Rank 0's results come back.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchsurgeon.distributed.collectives import settled
from torchsurgeon.distributed.localize import apply
from torchsurgeon.distributed.parallelize import parallelize
from torchsurgeon.layers.results import Result, run
from torchsurgeon.plans.identity import Match
from torchsurgeon.plans.plan import Plan
from torchsurgeon.surgery.errors import SurgeryError

__all__ = ["LaunchError", "LaunchTimeout", "RankFailed", "launch", "run_plan", "run_plans"]

_RESULT = "rank0.pt"
_STOP_GRACE = 5.0


class LaunchError(SurgeryError, RuntimeError):
    """A launch of ranks did not finish with a result."""


class RankFailed(LaunchError):
    """A rank raised (or died); the message carries its traceback."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


class LaunchTimeout(LaunchError, TimeoutError):
    """The ranks ran past the launch's ``timeout``; all of them were stopped."""


def launch(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    device: str = "cpu",
    timeout: float = 300.0,
    threads: int = 1,
) -> Any:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks in one process group; rank 0's value.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). Inside ``fn``,
    ``torch.distributed`` is initialised (``dist.get_rank()``, a device mesh with
    ``init_device_mesh(device, (world_size,))``). ``device="cuda"`` uses NCCL with one GPU
    per rank; ``"cpu"`` uses gloo.
    """
    check_ranks(world_size, device)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    store = _loopback_store(world_size, timeout)
    with tempfile.TemporaryDirectory(prefix="ts-launch-") as folder:
        result = Path(folder) / _RESULT
        config = (world_size, store.port, device, threads, timeout, str(result))
        context = mp.start_processes(
            _rank_main, args=(config, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        try:
            _wait(context, deadline, timeout)
        finally:
            _stop(context.processes)
        if not result.exists():
            raise LaunchError("rank 0 finished without handing back a result")
        return torch.load(result, weights_only=False)


def check_ranks(world_size: Any, device: str, *, name: str = "world_size", least: int = 1) -> None:
    """Refuse (``ValueError``) a rank count or device a process group cannot have here."""
    if not isinstance(world_size, int) or world_size < least:
        raise ValueError(f"{name} must be an int >= {least}, got {world_size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' (gloo) or 'cuda' (NCCL), got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"device='cuda' needs one GPU per rank: {world_size} ranks, "
            f"{torch.cuda.device_count()} GPU(s) visible; use device='cpu' (gloo)"
        )


def join_group(
    rank: int,
    world_size: int,
    port: int,
    device: str,
    threads: int,
    timeout: float,
    collective_timeout: float | None = None,
    *,
    host: str = "127.0.0.1",
) -> None:
    """In a spawned rank: ``threads`` torch threads, and the process group (gloo, or NCCL with
    GPU ``rank``) through the store at ``host:port``; collectives time out after
    ``collective_timeout`` seconds (default: ``timeout``). On loopback (the launcher, the
    host's own ranks) the ranks' sockets use the loopback interface, whatever the hostname
    resolves to; across machines gloo and NCCL pick theirs (``GLOO_SOCKET_IFNAME``)."""
    torch.set_num_threads(threads)
    loopback = _loopback_interface() if host == "127.0.0.1" else None
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    if device == "cuda":
        torch.cuda.set_device(rank)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout or timeout),
    )


def _loopback_store(world_size: int, timeout: float) -> dist.TCPStore:
    """The rendezvous: a ``TCPStore`` listening on 127.0.0.1 only, on a port the OS picks."""
    return _rendezvous_store(world_size, timeout, "127.0.0.1")


def _rendezvous_store(world_size: int, timeout: float, host: str) -> dist.TCPStore:
    """A ``TCPStore`` listening on ``host`` (an IPv4 address) only, on a port the OS picks.

    (Given a port, ``TCPStore`` listens on every interface; given a socket, on that one.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(4 * world_size)
        return dist.TCPStore(
            host,
            listener.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
            master_listen_fd=os.dup(listener.fileno()),  # the store owns (and closes) the copy
        )


def _loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` on Linux), for gloo's and NCCL's sockets."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((name for name in names if name.startswith("lo")), None)


def _wait(context: Any, deadline: float, timeout: float) -> None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchTimeout(
                f"the ranks ran past the launch's timeout of {timeout:g} s; all were stopped"
            )
        try:
            if context.join(timeout=min(left, 0.5)):
                return
        except mp.ProcessRaisedException as error:
            raise RankFailed(
                error.error_index, f"rank {error.error_index} failed:\n{error}"
            ) from None
        except mp.ProcessExitedException as error:
            raise RankFailed(
                error.error_index,
                f"rank {error.error_index} died (exit code {error.exit_code}, signal "
                f"{error.signal_name})",
            ) from None


def _stop(processes: Sequence[Any]) -> None:
    """Terminate every live process, then kill what did not stop in time; join them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    stop_by = time.monotonic() + _STOP_GRACE
    for process in processes:
        process.join(max(0.0, stop_by - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _rank_main(rank: int, config: tuple[Any, ...], fn: Callable[..., Any], args: Any) -> None:
    world_size, port, device, threads, timeout, result = config
    join_group(rank, world_size, port, device, threads, timeout)
    try:
        value = fn(*args)
        if rank == 0:
            partial = result + ".partial"
            torch.save(value, partial)
            os.replace(partial, result)
        # every rank done before any tears its connections down: gloo aborts a rank whose
        # peer closes a pair it still uses ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The rank's work is done and rank 0's value is on disk. Leave without the interpreter's
    # teardown: objects still holding a gloo process group (a device mesh, a DTensor in a
    # reference cycle) would be destroyed there, and gloo's worker threads then abort the
    # process (SIGABRT, "terminate called without an active exception"), which the launch
    # would report as a failed rank. A rank that raised takes the normal path (its traceback
    # is reported).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------- plans on ranks

ModelSource = Callable[[], nn.Module] | str | os.PathLike[str]


def run_plan(
    plan: Plan,
    model: ModelSource,
    *inputs: Any,
    tp_plan: Mapping[str, Any] | str = "auto",
    world_size: int = 2,
    record_on: str = "all",
    match: Match = "exact",
    device: str = "cpu",
    timeout: float = 300.0,
    threads: int = 1,
    **kwargs: Any,
) -> Result:
    """Run ``plan`` on ``model`` sharded over ``world_size`` ranks; rank 0's :class:`Result`.

    ``model`` is a picklable function building the plain model (called on every rank; it
    must build the same weights everywhere — seed it) or a local Hugging Face checkpoint
    directory (``AutoModelForCausalLM.from_pretrained``, nothing downloaded). ``tp_plan`` is
    the tensor-parallel plan (see :func:`~torchsurgeon.distributed.parallelize.parallelize`).
    ``inputs`` / ``kwargs`` are the model's arguments.
    """
    return run_plans(
        [plan],
        model,
        *inputs,
        tp_plan=tp_plan,
        world_size=world_size,
        record_on=record_on,
        match=match,
        device=device,
        timeout=timeout,
        threads=threads,
        **kwargs,
    )[0]


def run_plans(
    plans: Sequence[Plan],
    model: ModelSource,
    *inputs: Any,
    tp_plan: Mapping[str, Any] | str = "auto",
    world_size: int = 2,
    record_on: str = "all",
    match: Match = "exact",
    device: str = "cpu",
    timeout: float = 300.0,
    threads: int = 1,
    **kwargs: Any,
) -> list[Result]:
    """:func:`run_plan` for several plans on one sharded model (built once); one result each."""
    if isinstance(plans, Plan) or not all(isinstance(p, Plan) for p in plans) or not plans:
        raise TypeError("run_plans expects a non-empty list of ts.Plan values")
    if not callable(model) and not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "model must be a picklable function building the plain model, or a local "
            f"checkpoint directory; got {type(model).__name__}"
        )
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {str(model)!r}")
    job = _PlanJob(
        [p.to_bytes() for p in plans], model, tp_plan, record_on, match, device, inputs, kwargs
    )
    return launch(job, world_size=world_size, device=device, timeout=timeout, threads=threads)


class _PlanJob:
    """What every rank of :func:`run_plans` does (a picklable callable)."""

    def __init__(
        self,
        plans: list[bytes],
        model: ModelSource,
        tp_plan: Mapping[str, Any] | str,
        record_on: str,
        match: Match,
        device: str,
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.plans, self.model, self.tp_plan = plans, model, tp_plan
        self.record_on, self.match, self.device = record_on, match, device
        self.inputs, self.kwargs = inputs, kwargs

    def __call__(self) -> list[Result]:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device, (dist.get_world_size(),))
        plain = _build(self.model)
        if self.device == "cuda":
            plain = plain.to(torch.device("cuda", torch.cuda.current_device()))
        sharded = parallelize(plain, mesh, self.tp_plan)
        device = next(iter(sharded.parameters())).device
        inputs = tuple(_to(v, device) for v in self.inputs)
        kwargs = {k: _to(v, device) for k, v in self.kwargs.items()}
        results = []
        for data in self.plans:
            plan = Plan.from_bytes(data)
            view = apply(plan, sharded, match=self.match, record_on=self.record_on)
            with torch.no_grad():
                result = plan.outputs.apply(run(view, *inputs, **kwargs))
            results.append(_portable(result))
        return results


def _build(source: ModelSource) -> nn.Module:
    if callable(source):
        model = source()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the model factory returned {type(model).__name__}, not an nn.Module")
        return model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True).eval()


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _portable(result: Result) -> Result:
    """``result`` with plain CPU tensors only (collectives waited for), ready to hand back.

    What is neither a tensor, a container of them nor a plain scalar (a KV cache object,
    which would hold this rank's shard of the heads) comes back as ``None``.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return settled(value).detach().cpu()
        if isinstance(value, dict):  # includes ModelOutput
            for key in list(value.keys()):
                value[key] = plain(value[key])
            return value
        if type(value) in (tuple, list):
            return type(value)(plain(v) for v in value)
        if isinstance(value, tuple):  # a structseq: topk's (values, indices)
            return type(value)([plain(v) for v in value])
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return None

    records = {key: [plain(v) for v in values] for key, values in result.records.items()}
    return Result(plain(result.output), records)
