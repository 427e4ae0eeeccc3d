"""``benchmarks/load.py --small`` runs end to end and prints its table.

This checks that the benchmark works (both loads agree before anything is measured, the
table comes out with both methods), not its figures: on a 1 MB checkpoint they mean nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


@pytest.mark.slow
def test_load_benchmark_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | load s")
    assert {row.split("|")[1].strip() for row in rows[2:]} == {"torchsurgeon", "transformers"}
    assert "logits of the two loads agree" in done.stdout
