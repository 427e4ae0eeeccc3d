"""The ``torchsurgeon`` command: ``torchsurgeon demo`` and ``torchsurgeon serve`` (the host).

Every error a user can cause — a bad argument, a missing path, neurons the model does not
have, a checkpoint that will not load, a host that cannot start — is one line on stderr,
``torchsurgeon <command>: <what and what to do>``, and exit status 2; never a traceback.
An error nobody foresaw is reported the same way, naming its type, and
``TORCHSURGEON_TRACEBACK=1`` shows its traceback. ``serve`` checks that it can listen on
``--host``/``--port`` before it loads a model, so a busy port fails at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["build_parser", "main"]

USAGE_ERROR = 2


class CommandError(Exception):
    """A problem with the command's arguments, said in one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (its subcommands' too)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(USAGE_ERROR, f"{self.prog}: {' '.join(message.split())}{hint}\n")


def _finite(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return number


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {number}")
    return number


def _demo(args: argparse.Namespace) -> int:
    from torchsurgeon.demo import parse_neurons, run_demo

    neurons = parse_neurons(args.neurons) if args.neurons is not None else None
    if args.model is not None and args.retrain:
        raise CommandError("--retrain retrains the demo's own model; leave it out with --model")
    run_demo(
        model_path=args.model,
        neurons=neurons,
        value=args.value,
        target=args.target,
        html_path=args.html,
        png_path=args.png,
        top_k=args.top_k,
        retrain=args.retrain,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from torchsurgeon.remote.serve import serve_main

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(
            f"serve needs {' and '.join(missing)}: python -m pip install -e . (from a checkout; "
            f"they are core dependencies) or python -m pip install {' '.join(missing)}"
        )
    if args.ray and importlib.util.find_spec("ray") is None:
        raise CommandError("--ray needs ray: python -m pip install 'torchsurgeon[ray]'")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0-65535, got {args.port}")
    try:  # before loading any model: a busy port or a bad address fails at once
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as error:
        raise CommandError(
            f"cannot listen on {args.host}:{args.port} ({error.strerror or error}); pass "
            "another --port or --host"
        ) from None
    return int(serve_main(args))


def build_parser() -> argparse.ArgumentParser:
    """The ``torchsurgeon`` argument parser (``demo`` and ``serve``)."""
    parser = _Parser(
        prog="torchsurgeon",
        description="Functional model surgery for PyTorch: the demo, and a host for plans.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,serve}")
    demo = commands.add_parser(
        "demo",
        help="force the neurons that make a model say a word; clean vs forced answers",
        description=(
            "Train (once, cached) a small Llama on antonym questions, find by attribution "
            "the MLP neurons that push its answer toward --target, force them at the last "
            "position of the forced rows, and print clean vs forced answers; writes the "
            "rewritten tree as HTML and a PNG plot."
        ),
    )
    demo.add_argument(
        "--model", type=Path, metavar="PATH", help="a local causal-LM checkpoint directory"
    )
    demo.add_argument(
        "--neurons",
        metavar="SPEC",
        help="layers and neurons to force, e.g. '2:71,305;3:19' (default: by attribution)",
    )
    demo.add_argument(
        "--value",
        type=_finite,
        metavar="X",
        help="the value to force them to (default: estimated from the attribution)",
    )
    demo.add_argument(
        "--target", default="small", metavar="WORD", help="the answer to push toward (small)"
    )
    demo.add_argument(
        "--top-k", type=_positive, default=1, metavar="K", help="tokens per answer cell (1)"
    )
    demo.add_argument(
        "--html",
        type=Path,
        metavar="PATH",
        default=Path("torchsurgeon-demo.html"),
        help="where to write the rewritten tree (torchsurgeon-demo.html)",
    )
    demo.add_argument(
        "--png",
        type=Path,
        metavar="PATH",
        default=Path("torchsurgeon-demo.png"),
        help="where to write the plot (torchsurgeon-demo.png)",
    )
    demo.add_argument(
        "--retrain", action="store_true", help="train the demo model again, ignoring the cache"
    )
    demo.set_defaults(handler=_demo)

    from torchsurgeon.remote.serve import add_serve_parser

    add_serve_parser(commands)
    commands.choices["serve"].set_defaults(handler=_serve)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for any error, with one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or an error already printed (2)
        return int(stop.code or 0)
    name = f"torchsurgeon {args.command}"
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, OSError, ImportError) as error:
        _report(name, _one_line(error), error)
    except Exception as error:  # unforeseen: still one line, its type named
        _report(name, f"{type(error).__name__}: {_one_line(error)}", error)
    return USAGE_ERROR


def _report(name: str, message: str, error: BaseException) -> None:
    if os.environ.get("TORCHSURGEON_TRACEBACK"):
        import traceback

        traceback.print_exception(error)
    print(f"{name}: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
