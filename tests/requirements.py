"""Test dependencies that may be missing on a developer's machine, but never in CI.

``require("ray")`` imports a module a test needs. Outside CI a missing module skips the
test (with the reason), so a partial install still runs what it can; under ``CI=true`` —
which ``.ci/run`` sets, after installing the ``test`` extra — a missing module is a
failure, because a skipped test proves nothing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["in_ci", "require", "soak"]


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where nothing may be skipped for lack of it."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(module: str, reason: str | None = None) -> ModuleType:
    """``module`` imported; skipped outside CI when it is missing, failed in CI."""
    why = reason or f"{module} is not installed (pip install -e '.[test]')"
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if in_ci():
            pytest.fail(f"{why}: {error}")
        pytest.skip(why)


def soak(name: str, full: int, quick: int) -> int:
    """How many rounds a soak or fuzz loop runs: ``$name`` when set; else ``full`` where
    ``TORCHSURGEON_SOAK=full`` or in CI (``.ci/run`` sets both), else ``quick`` — so the
    README's test command stays quick on a contributor's machine and CI runs every round."""
    if os.environ.get(name):
        return int(os.environ[name])
    full_run = os.environ.get("TORCHSURGEON_SOAK", "").lower() == "full" or in_ci()
    return full if full_run else quick
