"""The ``torchsurgeon`` command: ``torchsurgeon demo`` and ``torchsurgeon serve`` (the host)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from torchsurgeon.demo import SEED_NEURONS, parse_neurons, run_demo

    neurons = parse_neurons(args.neurons) if args.neurons else SEED_NEURONS
    run_demo(model_path=args.model, neurons=neurons, html_path=args.html, top_k=args.top_k)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchsurgeon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the seed experiment, clean vs intervened")
    demo.add_argument("--model", type=Path, help="local causal-LM checkpoint directory")
    demo.add_argument(
        "--neurons", help="layers and neurons to force, e.g. '12:7171,2519,1786;13:9469,7737'"
    )
    demo.add_argument("--html", type=Path, default=Path("torchsurgeon-demo.html"))
    demo.add_argument("--top-k", type=int, default=5)
    demo.set_defaults(handler=_demo)

    from torchsurgeon.remote.serve import add_serve_parser

    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"torchsurgeon {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
