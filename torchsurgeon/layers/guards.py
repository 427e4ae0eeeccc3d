"""A run as thread state: the run itself (its layers' records and counters, see
:mod:`torchsurgeon.layers.run_state`) and its limits — its deadline, a cancel flag, a guard
(a host's memory watch). Expressions check the limits before every node; a host checks them
before every module call of its base (``torchsurgeon.remote.deadline``). Outside a run
nothing is set and the checks return at once."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

__all__ = [
    "cancelled_by",
    "current_deadline",
    "current_guard",
    "current_run",
    "deadline",
    "run_guard",
    "running",
]

_THREAD = threading.local()


@contextmanager
def _set(name: str, value: object) -> Iterator[None]:
    """This thread's ``name`` is ``value`` while the block runs (nested blocks restore)."""
    before = getattr(_THREAD, name, None)
    setattr(_THREAD, name, value)
    try:
        yield
    finally:
        setattr(_THREAD, name, before)


def deadline(at: float | None) -> AbstractContextManager[None]:
    """While the block runs, this thread's graphs stop at ``time.monotonic() > at`` (checked
    before every node: a host's run time applies inside an expression too)."""
    return _set("at", at)


def cancelled_by(flag: threading.Event) -> AbstractContextManager[None]:
    """While the block runs, setting ``flag`` (from any thread) stops this thread's run at
    its next deadline check, as if its deadline had passed (a host cancelling a job)."""
    return _set("cancel", flag)


def run_guard(check: Callable[[], None] | None) -> AbstractContextManager[None]:
    """While the block runs, ``check()`` runs before every expression node (and, on a host,
    every module call of its base): a host's memory watch stops a run with its own error."""
    return _set("guard", check)


def running(context: Any) -> AbstractContextManager[None]:
    """While the block runs, ``context`` (a :class:`~torchsurgeon.layers.run_state.RunContext`)
    is this thread's current run; a nested run's block restores the outer one after it."""
    return _set("run", context)


def current_run() -> Any:
    """This thread's current run context (see :func:`running`), or None outside a run."""
    return getattr(_THREAD, "run", None)


def current_guard() -> Callable[[], None] | None:
    """This thread's :func:`run_guard` check, if any."""
    return getattr(_THREAD, "guard", None)


def current_deadline() -> float | None:
    """This thread's deadline (a ``time.monotonic()`` value), or None outside :func:`deadline`;
    ``-inf`` once the run was cancelled (:func:`cancelled_by`)."""
    cancel = getattr(_THREAD, "cancel", None)
    if cancel is not None and cancel.is_set():
        return -math.inf
    return getattr(_THREAD, "at", None)
