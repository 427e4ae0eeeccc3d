"""Lines of code per parity experiment: the nnsight version against the torchsurgeon one.

    python benchmarks/parity_lines.py

Reads ``tests/parity/experiments/eNN_*.py`` (parsed with ``ast``, nothing imported, so
neither nnsight nor torch is needed) and prints a Markdown table: for each experiment the
lines of the body of ``nnsight_version`` and of ``ts_version``, then the totals. A line
counts when it holds code: blank lines, comment-only lines, the ``def`` line (the
signatures are the same shape on both sides) and the docstring do not. Module-level
constants an experiment shares between its two versions (a direction, SAE weights) count
for neither.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "tests" / "parity" / "experiments"
FUNCTIONS = ("nnsight_version", "ts_version")


def body_lines(function: ast.FunctionDef, source: list[str]) -> int:
    """Lines of ``function``'s body holding code (no blank, comment or docstring line)."""
    body = function.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    numbers: set[int] = set()
    for statement in body:
        numbers.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return sum(1 for n in numbers if (text := source[n - 1].strip()) and not text.startswith("#"))


def count(path: Path) -> dict[str, int]:
    """``{"nnsight_version": n, "ts_version": m}`` for one experiment file."""
    text = path.read_text()
    source = text.splitlines()
    found = {
        node.name: body_lines(node, source)
        for node in ast.parse(text, str(path)).body
        if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS
    }
    missing = [name for name in FUNCTIONS if name not in found]
    if missing:
        raise SystemExit(f"{path}: no top-level function {', '.join(missing)}")
    return found


def table(directory: Path = EXPERIMENTS) -> tuple[list[tuple[str, int, int]], int, int]:
    """Rows ``(experiment, nnsight lines, torchsurgeon lines)`` and the two totals."""
    rows = []
    for path in sorted(directory.glob("e[0-9]*.py")):
        counts = count(path)
        rows.append((path.stem, counts["nnsight_version"], counts["ts_version"]))
    return rows, sum(r[1] for r in rows), sum(r[2] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=EXPERIMENTS, help="the experiments folder")
    args = parser.parse_args(argv)
    rows, nnsight_total, ts_total = table(args.dir)
    if not rows:
        raise SystemExit(f"no experiments (eNN_*.py) in {args.dir}")
    print("| experiment | nnsight | torchsurgeon |")
    print("| --- | ---: | ---: |")
    for name, nnsight_lines, ts_lines in rows:
        print(f"| {name} | {nnsight_lines} | {ts_lines} |")
    print(f"| **total** | **{nnsight_total}** | **{ts_total}** |")
    longer = [name for name, n, t in rows if t > n]
    if longer:
        print(f"\ntorchsurgeon is longer in: {', '.join(longer)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
