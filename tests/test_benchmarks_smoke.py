"""``benchmarks/overhead.py --quick`` runs end to end on a small GPT-2 and prints its table.

These check that the benchmark works (every method agrees before timing, the table comes
out), not any timing: on a tiny model with three repetitions the numbers mean nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from requirements import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"
SMALL = ["--quick", "--layers", "2", "--width", "64", "--heads", "4"]


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *SMALL, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | size | median ms"), stdout[-2000:]
    rows = {}
    for line in lines[2:]:  # past the header and the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells
    return rows


@pytest.mark.slow
def test_overhead_quick_prints_the_table() -> None:
    methods = ["bare", "hooks", "ts", "ts-compile", "ts-compile-fullgraph"]
    stdout = _run("--methods", ",".join(methods))
    assert "all methods agree" in stdout
    rows = _table_rows(stdout)
    assert set(rows) == {(m, s) for m in methods for s in ("1x8", "4x64")}
    for cells in rows.values():
        assert float(cells[2]) > 0
    assert rows[("bare", "1x8")][4] == "1.000"


@pytest.mark.slow
def test_overhead_quick_with_nnsight() -> None:
    require("nnsight", "nnsight is not installed (pip install -e '.[bench]')")
    stdout = _run("--methods", "bare,hooks,nnsight", "--sizes", "1x8")
    assert "all methods agree" in stdout
    assert set(_table_rows(stdout)) == {("bare", "1x8"), ("hooks", "1x8"), ("nnsight", "1x8")}


def test_the_gpu_check_compares_on_the_device_it_is_given() -> None:
    """``benchmarks/gpu_check.py`` is for a GPU; its dtype check runs the same on the CPU."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_check.check_dtypes(torch.device("cpu")) == []  # fp32, bf16, fp16: diff 0
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2  # says there is nothing to check, and exits 2
