"""``torchsurgeon serve``: run a host from the command line.

    torchsurgeon serve --model gpt2=/ckpt/gpt2 --model llama=/ckpt/llama \\
        --host 127.0.0.1 --port 8000 --api-keys keys.txt --state-dir /var/lib/ts \\
        [--convert | --attn-implementation eager] [--ray --replicas 2]

``--model NAME=PATH`` (repeatable) names a local checkpoint directory, served as its
``transformers`` model (with ``--attn-implementation`` ``eager`` or ``sdpa``, or
``transformers``' default) or, with ``--convert``, as its explicit-dataflow conversion
``ts.load(PATH)``, whose attention pattern, queries, keys, values and per-head outputs a
plan can select (see :class:`~torchsurgeon.remote.checkpoints.LocalCheckpoint`); ``--api-keys`` is a
file with one key per line (blank lines and ``#`` comments ignored); ``--state-dir`` is
where jobs and results persist (a host started again on it finishes what was queued or
running); ``--processes`` runs the ``--workers`` as processes the host spawns and kills at a
run's deadline (:mod:`torchsurgeon.remote.spawned`); ``--ray --replicas N`` runs N model
replicas as Ray actors on a local Ray cluster; ``--tp N`` shards each model over N ranks
(with ``--ray``, N Ray actors in one placement group: :mod:`torchsurgeon.remote.ray_tp`;
with ``--ray-address HOST:PORT`` too, in an operator's token-authenticated cluster, spread
over its machines as ``--tp-placement`` says:
:class:`~torchsurgeon.remote.ray_pool.RayCluster`).
The connection limits
(``--max-connections``, ``--header-timeout``, ...) are
:class:`~torchsurgeon.remote.server.ServerLimits`. SIGTERM stops the host within about
``--shutdown-timeout`` seconds plus a few, even with jobs running (they run again on restart).
The parser is added to the ``torchsurgeon`` command by :func:`add_serve_parser`;
:func:`serve_main` runs it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchsurgeon.remote.checkpoints import ATTN_IMPLEMENTATIONS, LocalCheckpoint
from torchsurgeon.remote.ray_pool import PLACEMENTS, RayCluster
from torchsurgeon.remote.server import ServerLimits

__all__ = ["add_serve_parser", "read_api_keys", "serve_main"]

DESCRIPTION = """Serve models to remote plans over HTTP.

  torchsurgeon serve --model gpt2=/ckpt/gpt2 --model llama=/ckpt/llama \\
      --host 127.0.0.1 --port 8000 --api-keys keys.txt --state-dir /var/lib/ts \\
      [--convert | --attn-implementation eager] [--ray --replicas 2]

Each --model NAME=PATH names a local checkpoint directory, served as its transformers
model (--attn-implementation eager or sdpa: its attention; default: transformers' choice)
or, with --convert, as its explicit-dataflow conversion (ts.load), whose attention pattern,
queries, keys, values and per-head outputs plans can select. --api-keys is a file with one
key per line (blank lines and # comments ignored); clients send it as
'Authorization: Bearer KEY'. --state-dir keeps jobs and results (SQLite + files) so that a
restarted host finishes queued and interrupted jobs; without it they live in a temporary
directory. --ray --replicas N runs N model replicas as Ray actors on a local Ray cluster.
--tp N shards each model over N tensor-parallel ranks (with --ray: N Ray actors placed in
one placement group; with --ray-address HOST:PORT as well, in that running Ray cluster,
which must use token authentication, spread over its machines as --tp-placement says)."""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to an ``argparse`` subparsers object (sets ``handler``)."""
    parser = subparsers.add_parser(
        "serve",
        help="serve models to remote plans over HTTP",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a model to serve: its name and local checkpoint directory (repeatable)",
    )
    parser.add_argument(
        "--convert",
        action="store_true",
        help="serve each model as its explicit-dataflow conversion (ts.load), whose "
        "attention q/k/v, scores, pattern and per-head outputs plans can select",
    )
    parser.add_argument(
        "--attn-implementation",
        choices=ATTN_IMPLEMENTATIONS,
        default=None,
        help="the transformers attention of the models served unconverted "
        "(default: transformers' choice, sdpa where it can)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-keys", type=Path, help="file of API keys, one per line")
    parser.add_argument(
        "--workers",
        type=_number(1, 1024, whole=True),
        default=2,
        help="job worker threads (default 2)",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="run the workers as processes the host spawns, each loading the models; a run "
        "past its deadline is killed with its process (a spare takes its place)",
    )
    parser.add_argument("--ray", action="store_true", help="run model replicas as Ray actors")
    parser.add_argument(
        "--replicas", type=_number(1, 1024, whole=True), default=1, help="Ray replicas (with --ray)"
    )
    parser.add_argument(
        "--tp",
        type=_number(1, 4096, whole=True),
        default=None,
        metavar="N",
        help="serve each model sharded over N tensor-parallel ranks (gloo on CPU; with "
        "--tp-device cuda, NCCL and one GPU per rank; with --ray, Ray actors in a placement "
        "group)",
    )
    parser.add_argument(
        "--tp-device", choices=("cpu", "cuda"), default="cpu", help="the ranks' device (cpu)"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="with --ray: join this running Ray cluster (token authentication required: "
        "RAY_AUTH_MODE=token and its token) instead of starting a private one, so --tp ranks "
        "can span its machines",
    )
    parser.add_argument(
        "--tp-placement",
        choices=PLACEMENTS,
        default="PACK",
        help="with --tp and --ray: the placement group's strategy (PACK: as few nodes as "
        "possible; STRICT_SPREAD: one rank per node)",
    )
    parser.add_argument(
        "--threads-per-replica",
        type=_number(1, 4096, whole=True),
        default=None,
        help="torch threads in each Ray replica (default: this machine's, shared out)",
    )
    parser.add_argument(
        "--max-run-seconds",
        type=_number(0, 30 * 86_400, above=True),
        default=None,
        help="run-time limit per job",
    )
    parser.add_argument(
        "--max-running-per-key",
        type=_number(1, 1 << 20, whole=True),
        default=None,
        help="jobs of one API key running at once (default: every worker but one)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="directory for jobs and results, kept across restarts (default: a temporary one)",
    )
    parser.add_argument(
        "--co-batch",
        action="store_true",
        help="merge compatible requests of different keys into one forward pass",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=_number(0, 60_000),
        default=None,
        help="with --co-batch: how long a request waits for others to join (default 2)",
    )
    parser.add_argument(
        "--max-result-mb",
        type=_number(1 / 1024, 1 << 20),
        default=None,
        help="largest result one request may return, in MiB (default 64)",
    )
    parser.add_argument(
        "--max-work",
        type=_number(1, 1e24),
        default=None,
        help="arithmetic one run may do, as estimated, instead of the time the host's measured "
        "speed gives it (default: that time, half of --max-run-seconds)",
    )
    parser.add_argument(
        "--no-grad",
        action="store_true",
        help="refuse plans that run a backward pass (backward=, SaveGrad, ComputeGrad)",
    )
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="refuse training runs (ts.train with backend=, session training runs)",
    )
    server = ServerLimits()
    parser.add_argument(
        "--max-connections",
        type=_number(1, 1 << 20, whole=True),
        default=server.max_connections,
        help=f"open connections at most (default {server.max_connections})",
    )
    parser.add_argument(
        "--header-timeout",
        type=_number(1e-3, 86_400),
        default=server.header_timeout_seconds,
        help="seconds a client has to send a request's head "
        f"(default {server.header_timeout_seconds:g})",
    )
    parser.add_argument(
        "--max-unauthenticated-per-address",
        type=_number(1, 1 << 20, whole=True),
        default=server.max_unauthenticated_per_address,
        help="connections from one address without a valid key yet "
        f"(default {server.max_unauthenticated_per_address})",
    )
    parser.add_argument(
        "--unauthenticated-header-timeout",
        type=_number(1e-3, 86_400),
        default=server.unauthenticated_header_seconds,
        help="seconds a connection without a valid key yet has for a request's head "
        f"(default {server.unauthenticated_header_seconds:g})",
    )
    parser.add_argument(
        "--request-body-timeout",
        type=_number(1e-3, 86_400),
        default=server.request_body_seconds,
        help="seconds for a whole request body, plus its size at "
        f"{server.min_upload_bytes_per_second >> 10} KiB/s "
        f"(default {server.request_body_seconds:g})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_number(0, 86_400, whole=True),
        default=server.shutdown_seconds,
        help="seconds open requests get on SIGTERM before they are cancelled "
        f"(default {server.shutdown_seconds})",
    )
    parser.set_defaults(handler=serve_main)
    return parser


def _number(
    low: float, high: float, *, whole: bool = False, above: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (an integer if ``whole``) in ``[low, high]``
    (``(low, high]`` if ``above``), so a nonsense limit stops the command, naming the option."""

    def parse(text: str) -> float:
        try:
            value: float = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if whole else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < low or (above and value == low) or value > high:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if whole else 'a finite number'} "
                f"{'>' if above else '>='} {low:g} and <= {high:g}, got {text!r}"
            )
        return value

    return parse


def parse_models(specs: list[str]) -> dict[str, Path]:
    """``["gpt2=/ckpt"]`` -> ``{"gpt2": Path("/ckpt")}``, checking each directory exists."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {spec!r}: expected NAME=PATH")
        if name in models:
            raise ValueError(f"--model {name!r} is given twice")
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: {directory} has no config.json")
        models[name] = directory
    return models


def checkpoints_to_serve(args: argparse.Namespace) -> dict[str, Path | LocalCheckpoint]:
    """The ``--model`` checkpoints, to load as ``--convert`` and ``--attn-implementation`` say."""
    if args.convert and args.attn_implementation is not None:
        raise ValueError(
            "--attn-implementation picks the attention of a transformers model; --convert "
            "serves the conversion, which computes attention in its own layers: pass one of them"
        )
    models = parse_models(args.model)
    return {
        name: LocalCheckpoint(path, args.convert, args.attn_implementation)
        for name, path in models.items()
    }


def _ray_cluster(args: argparse.Namespace) -> RayCluster | None:
    """The Ray cluster ``--ray-address`` / ``--tp-placement`` name (None: the defaults)."""
    if args.ray_address is None and args.tp_placement == "PACK":
        return None
    if not args.ray:
        raise ValueError("--ray-address and --tp-placement place Ray actors: add --ray")
    return RayCluster(args.ray_address, args.tp_placement)


def read_api_keys(path: Path) -> list[str]:
    """The keys in ``path``: one per line, blank lines and ``#`` comments ignored."""
    keys = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise ValueError(f"--api-keys {path}: no keys in the file")
    return keys


def serve_main(args: argparse.Namespace) -> int:
    """Run the host until interrupted; returns the exit status."""
    import dataclasses

    import uvicorn

    from torchsurgeon.remote.app import create_app
    from torchsurgeon.remote.limits import Limits
    from torchsurgeon.remote.server import server_config

    if args.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    checkpoints = checkpoints_to_serve(args)
    limits = Limits()
    if args.max_run_seconds is not None:
        limits = dataclasses.replace(limits, max_run_seconds=args.max_run_seconds)
    if args.max_running_per_key is not None:
        limits = dataclasses.replace(limits, max_running_per_key=args.max_running_per_key)
    if args.batch_window_ms is not None:
        if not args.co_batch or args.batch_window_ms < 0:
            raise ValueError("--batch-window-ms goes with --co-batch and is >= 0")
        limits = dataclasses.replace(limits, batch_window_seconds=args.batch_window_ms / 1000)
    if args.max_result_mb is not None:
        if args.max_result_mb <= 0:
            raise ValueError("--max-result-mb must be > 0")
        limits = dataclasses.replace(limits, max_result_bytes=int(args.max_result_mb * 2**20))
    if args.max_work is not None:
        if args.max_work <= 0:
            raise ValueError("--max-work must be > 0")
        limits = dataclasses.replace(limits, max_work=args.max_work)
    if args.no_grad:
        limits = dataclasses.replace(limits, allow_grad=False)
    if args.no_train:
        limits = dataclasses.replace(limits, allow_train=False)
    app = create_app(
        checkpoints,
        api_keys=read_api_keys(args.api_keys) if args.api_keys else None,
        limits=limits,
        workers=max(args.workers, 2 * args.replicas if args.ray else 1),
        processes=args.processes,
        ray_replicas=args.replicas if args.ray else None,
        ray_threads=args.threads_per_replica,
        state_dir=args.state_dir,
        co_batch=args.co_batch,
        tensor_parallel=args.tp,
        tensor_parallel_device=args.tp_device,
        ray_cluster=_ray_cluster(args),
    )
    connections = ServerLimits(
        max_connections=args.max_connections,
        header_timeout_seconds=args.header_timeout,
        shutdown_seconds=args.shutdown_timeout,
        max_unauthenticated_per_address=args.max_unauthenticated_per_address,
        unauthenticated_header_seconds=args.unauthenticated_header_timeout,
        request_body_seconds=args.request_body_timeout,
    )
    config = server_config(app, host=args.host, port=args.port, limits=connections)
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m torchsurgeon.remote.serve ...``: the same command without ``torchsurgeon``."""
    parser = argparse.ArgumentParser(prog="torchsurgeon")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
