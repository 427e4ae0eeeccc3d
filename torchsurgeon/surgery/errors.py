"""The errors torchsurgeon raises, in one place.

Every error names what was wrong and, where there is one, the nearest valid choice: a
researcher who types ``layer.12`` instead of ``layers.12`` should be told so, not handed a
``KeyError``. All of them derive from :class:`SurgeryError`, so one ``except`` catches the lot.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "FrozenModuleError",
    "KeyNotFoundError",
    "OutOfRangeError",
    "PathError",
    "SelectionError",
    "SerializationError",
    "SiteError",
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


class KeyNotFoundError(SurgeryError, KeyError):
    """A key that names nothing where it is looked up: a key no recording layer saved in the
    run (``result.saved["mlp"]``), a tensor a module does not hold; the message names the key
    and the nearest ones there are. Also a ``KeyError``, the error it replaces."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class SelectionError(SurgeryError, ValueError):
    """A selection that cannot serve the operation asked of it (empty, ambiguous, ...)."""


class SerializationError(SurgeryError, ValueError):
    """Something that was asked to become data but cannot (a Python callable, ...)."""


class ArgumentError(SurgeryError, ValueError):
    """An argument (or a field of one) with a value it cannot take; the message names it and
    the valid choices."""


class ArgumentTypeError(SurgeryError, TypeError):
    """An argument of the wrong kind: text where token ids go, float token ids, a number
    where a tensor goes; the message names the argument and what it takes."""


class OutOfRangeError(SurgeryError, IndexError):
    """An index, position, layer, head or row outside what the tensor or model has; the
    message names the argument and the valid range."""


class SiteError(SurgeryError, ValueError, RuntimeError):
    """An intervention layer that does not fit its site or cannot act there (a vector of
    another width, a value of a dtype that cannot be cast, no tensor where ``on=`` points, a
    tensor no gradient reaches, ``steps=`` outside a ``ts.run``, a ``Save`` name using
    ``{layer}`` at a path without one); the message names the site. Also a ``ValueError`` and
    a ``RuntimeError``: the errors it replaces (torch's broadcasting ``RuntimeError``, the
    site's ``ValueError``)."""


def nearest_note(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``"; nearest: 'a', 'b'"`` (the :func:`closest` choices), or ``""`` when there are none."""
    found = closest(word, choices, n)
    return "; nearest: " + ", ".join(repr(c) for c in found) if found else ""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` that look most like ``word`` (best first)."""
    pool = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if not found:
        found = difflib.get_close_matches(word, pool, n=n, cutoff=0.0)
    return found
