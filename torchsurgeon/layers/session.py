"""Sessions: several runs on one base in one request, later runs reading earlier ones.

An experiment is often more than one forward pass: run the clean prompt and keep an
activation, then patch it into the corrupted prompt at another position; average a value
over a batch, then add it in a second run. A :class:`Session` is that sequence as one
value — ordered, named runs, each with its own rewritten model (or plan) and inputs — so it
can be sent to a host as one request. A later run's expressions read an earlier run's
records with ``ts.saved(key, run="clean")``.

    session = ts.session(
        clean=(clean_probe, clean_ids),
        patched=(patch_probe, corrupt_ids, {"attention_mask": mask}),
    )
    results = ts.run(session)                     # {"clean": Result, "patched": Result}
    results = ts.run(session, backend=client)     # the same, on a host, in one request

Locally every run must be a model; a run given as a :class:`~torchsurgeon.plans.Plan`
needs a base: ``ts.plans.execute(session, base)`` or a host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from torchsurgeon.layers.results import Result, run_with

__all__ = ["MAX_RUNS", "Session", "SessionRun", "session"]

MAX_RUNS = 16
"""Runs in one session."""


@dataclass(frozen=True)
class SessionRun:
    """One run of a session: its name, a model or a plan, and the call's arguments."""

    name: str
    target: Any
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Session:
    """Named runs in order; build with :func:`session` or :meth:`then`."""

    runs: tuple[SessionRun, ...] = ()
    ts_session: ClassVar[bool] = True
    """Marks sessions for ``ts.run`` (which sits below this module)."""

    def then(self, name: str, target: Any, *args: Any, **kwargs: Any) -> Session:
        """This session with one more run, ``target(*args, **kwargs)``, named ``name``."""
        if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
            raise ValueError(f"a session run's name is an identifier, got {name!r}")
        if any(r.name == name for r in self.runs):
            raise ValueError(f"the session already has a run named {name!r}")
        if len(self.runs) >= MAX_RUNS:
            raise ValueError(f"a session has at most {MAX_RUNS} runs")
        return Session((*self.runs, SessionRun(name, target, tuple(args), dict(kwargs))))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def run_locally(self) -> dict[str, Result]:
        """Each run in order on its own model; one :class:`Result` per run, by name."""
        records: dict[str, Mapping[str, list[torch.Tensor]]] = {}
        results: dict[str, Result] = {}
        for item in self.runs:
            if not isinstance(item.target, nn.Module):
                raise TypeError(
                    f"session run {item.name!r} is a {type(item.target).__name__}, which has "
                    "no model here; run a session of plans with ts.plans.execute(session, "
                    "base) or on a host (backend=client)"
                )
            result = run_with(item.target, item.args, dict(item.kwargs or {}), records)
            records[item.name] = result.records
            results[item.name] = result
        return results

    def __repr__(self) -> str:
        return f"Session({', '.join(self.names)})"


def session(**runs: Any) -> Session:
    """A :class:`Session` from ``name=(model_or_plan, inputs[, kwargs])``, in order.

    ``inputs`` is one tensor (or text) or a tuple of positional arguments; ``kwargs`` a dict
    of keyword arguments (``attention_mask``, ...).
    """
    built = Session()
    for name, spec in runs.items():
        if not isinstance(spec, Sequence) or isinstance(spec, str) or not 2 <= len(spec) <= 3:
            raise TypeError(
                f"session run {name}=...: give (model_or_plan, inputs) or (model_or_plan, "
                "inputs, kwargs)"
            )
        target, inputs = spec[0], spec[1]
        kwargs = spec[2] if len(spec) == 3 else {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"session run {name}: the third item is a dict of keyword arguments")
        args = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
        built = built.then(name, target, *args, **kwargs)
    return built
