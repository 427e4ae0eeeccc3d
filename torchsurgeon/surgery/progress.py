"""One progress bar for every long local loop (training steps, patching sweeps).

A research method that runs for a minute should say so. :func:`progress` wraps an iterable
in a ``tqdm`` bar — the same bar ``ts.load`` shows for a large checkpoint — on stderr. It
lives at the bottom of the package so that ``layers`` (``ts.train``) and ``methods`` can
both use it.

Whether a bar shows: an explicit ``enabled`` (a method's ``progress=`` argument) wins; else
the environment variable ``TORCHSURGEON_PROGRESS`` (``0``/``false``/``off`` switch bars off,
``1``/``true``/``on`` on); else only when the stream is a terminal, so logs, pipes and test
runs stay clean. A bar that shows by default waits a second before it appears, so quick
loops never flash one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["ENV", "Progress", "enabled", "progress"]

ENV = "TORCHSURGEON_PROGRESS"
"""The environment variable that switches bars off (``0``) or on (``1``) by default."""

DELAY = 1.0
"""Seconds a default (not forced) bar waits before it appears."""

T = TypeVar("T")

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


def enabled(choice: bool | None = None, stream: IO[str] | None = None) -> bool:
    """Whether a bar shows: ``choice`` if given, else ``TORCHSURGEON_PROGRESS``, else
    whether ``stream`` (default: stderr) is a terminal."""
    if choice is not None:
        return bool(choice)
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    file: IO[str] | None = None,
    leave: bool = True,
    unit: str = "it",
) -> Progress[T]:
    """``iterable``, with a progress bar on ``file`` (default: stderr) while it is consumed.

    Args:
        iterable: what to loop over.
        total: its length, when ``len(iterable)`` does not say.
        desc: the bar's label (``"activation_patching"``).
        enabled: ``True``/``False`` force the bar on/off; ``None`` decides as the module
            docstring says.
        file: where the bar is written.
        leave: keep the finished bar on screen (``False`` for an inner loop).
        unit: what one item is (``"step"``, ``"pass"``).

    The returned iterator's ``set_postfix(loss=...)`` updates the text after the bar (it
    does nothing when no bar shows).
    """
    stream = sys.stderr if file is None else file
    chosen = enabled
    show = _enabled(chosen, stream)
    if not show:
        return Progress(iterable)
    from tqdm import tqdm

    bar = tqdm(
        iterable,
        total=total,
        desc=desc,
        file=stream,
        leave=leave,
        unit=unit,
        delay=0.0 if chosen else DELAY,
        dynamic_ncols=True,
    )
    return _Bar(bar)


_enabled = enabled  # the parameter of ``progress`` shadows the function


class Progress(Iterator[T]):
    """What :func:`progress` returns: the loop's items, and ``set_postfix``."""

    def __init__(self, iterable: Iterable[T]) -> None:
        self._it = iter(iterable)

    def __next__(self) -> T:
        return next(self._it)

    def set_postfix(self, **values: Any) -> None:
        """Nothing to show."""


class _Bar(Progress[T]):
    """A tqdm bar as an iterator, closed when the loop ends or stops early."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self._it = iter(bar)

    def __next__(self) -> T:
        try:
            return next(self._it)
        except BaseException:
            self.bar.close()
            raise

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the bar; numbers (and one-element tensors, read
        only here, when a bar shows) to four significant digits."""
        shown = {k: _short(v) for k, v in values.items()}
        self.bar.set_postfix(shown)

    def __del__(self) -> None:
        bar = self.__dict__.get("bar")
        if bar is not None:
            bar.close()


def _short(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else value
