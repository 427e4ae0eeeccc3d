"""The errors torchsurgeon raises, in one place.

Every error names what was wrong and, where there is one, the nearest valid choice: a
researcher who types ``layer.12`` instead of ``layers.12`` should be told so, not handed a
``KeyError``. All of them derive from :class:`SurgeryError`, so one ``except`` catches the lot.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "FrozenModuleError",
    "PathError",
    "SelectionError",
    "SerializationError",
    "SurgeryError",
    "closest",
]


class SurgeryError(Exception):
    """Base class of every error raised by torchsurgeon."""


class FrozenModuleError(SurgeryError, AttributeError):
    """A structural mutation (a submodule or parameter assignment) on a frozen module."""


class PathError(SurgeryError, KeyError):
    """A path that does not name a module of the tree."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class SelectionError(SurgeryError, ValueError):
    """A selection that cannot serve the operation asked of it (empty, ambiguous, ...)."""


class SerializationError(SurgeryError, ValueError):
    """Something that was asked to become data but cannot (a Python callable, ...)."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` that look most like ``word`` (best first)."""
    pool = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if not found:
        found = difflib.get_close_matches(word, pool, n=n, cutoff=0.0)
    return found
