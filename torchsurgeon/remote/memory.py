"""The host's memory: how much the machine gives it, and a watch that stops a run before the
kernel kills the host with every other user's work.

Each request's peak is estimated before it is queued (``Limits.max_activation_bytes``), and a
host gives each worker an equal share of half the memory it may use, so that the estimates
of runs that run together fit (:func:`run_budget`). An estimate can still be wrong, so a run
is also watched while it runs: before every module call of the hosted base and every
expression node, at most every :data:`CHECK_SECONDS`, the process's resident memory is read
(``/proc/self/statm``); past ``Limits.max_host_memory_bytes`` (default: 90% of what the
machine, or its cgroup, allows) the run stops with ``507 host_memory`` and its memory is
given back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path

from torchsurgeon.remote.limits import Limits
from torchsurgeon.surgery.errors import SurgeryError

__all__ = [
    "CHECK_SECONDS",
    "HostMemoryExceeded",
    "MemoryWatch",
    "fitted",
    "machine_memory",
    "resident_bytes",
    "run_budget",
    "watch",
]

CHECK_SECONDS = 0.02
"""How often a running job reads the process's resident memory (a ~10 µs file read)."""
HOST_FRACTION = 0.9
"""The part of the machine's memory a host lets its process reach before it stops runs."""
ESTIMATE_FRACTION = 0.5
"""The part of the host's memory the estimates of its concurrent runs may take together."""
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class HostMemoryExceeded(SurgeryError, RuntimeError):
    """A run stopped because the host process went over its memory ceiling."""


def machine_memory() -> int | None:
    """The bytes this process may use: the cgroup's limit (v2 or v1) or the physical
    memory, whichever is smaller; ``None`` where neither can be read."""
    found = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            found.append(int(text))
    with contextlib.suppress(AttributeError, OSError, ValueError):
        found.append(os.sysconf("SC_PHYS_PAGES") * _PAGE)
    return min(found) if found else None


def resident_bytes() -> int | None:
    """This process's resident memory, or ``None`` where ``/proc`` is not there."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def run_budget(ceiling: int | None, workers: int) -> int | None:
    """The most one run's estimate may take so that ``workers`` of them fit together in
    :data:`ESTIMATE_FRACTION` of ``ceiling``; ``None`` without a ceiling."""
    if ceiling is None:
        return None
    return max(1, int(ceiling * ESTIMATE_FRACTION) // max(workers, 1))


class MemoryWatch:
    """Stops the calling run (:class:`HostMemoryExceeded`) once the process holds more than
    ``ceiling`` bytes; reads memory at most every :data:`CHECK_SECONDS` (shared by threads).
    """

    def __init__(self, ceiling: int | None) -> None:
        self.ceiling = ceiling
        self._next = 0.0
        self._over = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if self.ceiling is None:
            return
        now = time.monotonic()
        if now >= self._next:
            with self._lock:
                if now >= self._next:
                    used = resident_bytes()
                    self._over = used is not None and used > self.ceiling
                    self._next = now + CHECK_SECONDS
        if self._over:
            raise HostMemoryExceeded(
                f"the host went over its memory ceiling ({self.ceiling} bytes, the limit "
                "max_host_memory_bytes) while this run ran"
            )


_WATCHES: dict[int | None, MemoryWatch] = {}


def watch(ceiling: int | None) -> MemoryWatch:
    """The process's one watch for ``ceiling`` (its reads are shared by every run)."""
    found = _WATCHES.get(ceiling)
    if found is None:
        found = _WATCHES.setdefault(ceiling, MemoryWatch(ceiling))
    return found


def fitted(limits: Limits, workers: int) -> Limits:
    """``limits`` for a host of ``workers`` on this machine: its memory ceiling resolved
    (90% of :func:`machine_memory` unless set) and each run's estimate bounded by its share
    (:func:`run_budget`), so that runs estimated to fit do fit together."""
    ceiling = limits.max_host_memory_bytes
    if ceiling is None:
        machine = machine_memory()
        ceiling = None if machine is None else int(machine * HOST_FRACTION)
    budget = run_budget(ceiling, workers)
    activations = limits.max_activation_bytes
    if budget is not None and budget < activations:
        activations = budget
    return dataclasses.replace(
        limits, max_host_memory_bytes=ceiling, max_activation_bytes=activations
    )
