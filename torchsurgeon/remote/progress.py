"""Progress of the job a worker thread is running: a training run's step and loss.

The job queue (:mod:`torchsurgeon.remote.jobs`) names, per worker thread, where the job it
runs reports to; code deep in a run (a training loop) calls :func:`report` without knowing
about jobs. The report becomes the job's ``progress`` in its status, pushed to every client
long-polling it. Outside a worker (a local run, a Ray actor) a report goes nowhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["report", "reporting_to"]

_CURRENT = threading.local()


@contextmanager
def reporting_to(sink: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """While the block runs, this thread's :func:`report` calls go to ``sink``."""
    _CURRENT.sink = sink
    try:
        yield
    finally:
        _CURRENT.sink = None


def report(progress: dict[str, Any]) -> None:
    """Tell whoever waits on this thread's job how far it got (JSON values only)."""
    sink = getattr(_CURRENT, "sink", None)
    if sink is not None:
        sink(progress)
