"""What the benchmark scripts share: the machine's name and the spread of a list of times."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

__all__ = ["cpu_name", "quartiles"]


def cpu_name() -> str:
    """The CPU model, for the header of a benchmark's output."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """``(first quartile, median, third quartile)`` of ``times``."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[0], statistics.median(times), q[2]
