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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from torchsurgeon.layers.results import Result, run_with
from torchsurgeon.layers.training import Trained, Training, TrainResult, with_tensors
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError

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
            raise ArgumentError(f"a session run's name is an identifier, got {name!r}")
        if any(r.name == name for r in self.runs):
            raise ArgumentError(f"the session already has a run named {name!r}")
        if len(self.runs) >= MAX_RUNS:
            raise ArgumentError(f"a session has at most {MAX_RUNS} runs")
        return Session((*self.runs, SessionRun(name, target, tuple(args), dict(kwargs))))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def run_locally(self, resolve: Resolve | None = None) -> dict[str, Result]:
        """Each run in order on its own model; one :class:`Result` per run, by name.

        ``resolve(target)`` turns a run's target into ``(model or model.generate, returning,
        backward)``: how ``ts.plans.execute(session, base)`` runs plans (``returning`` and
        ``backward`` from the plan). Without it, every target must be a model (or a
        ``training`` / ``trained`` of one).
        """
        resolve = resolve or _as_model
        records: dict[str, Mapping[str, list[torch.Tensor]]] = {}
        results: dict[str, Result] = {}
        trained: dict[str, dict[str, torch.Tensor]] = {}
        for item in self.runs:
            target = item.target
            if isinstance(target, Training):
                model, _, _ = resolve(target.model)
                done = replace(target, model=model).run()
                trained[item.name] = done.tensors
                results[item.name] = training_result(done)
                records[item.name] = results[item.name].records
                continue
            tensors = None
            if isinstance(target, Trained):
                if target.run not in trained:
                    raise ArgumentError(
                        f"session run {item.name!r} uses the tensors trained by {target.run!r}, "
                        f"which is not an earlier training run (those: {sorted(trained)})"
                    )
                target, tensors = target.model, trained[target.run]
            call, returning, backward = resolve(target)
            if tensors is not None:
                call = _with_tensors_of_call(call, tensors)
            result = run_with(call, item.args, dict(item.kwargs or {}), records, backward)
            records[item.name] = result.records
            results[item.name] = (
                result if returning is None else returning.apply(result, _owner(call), records)
            )
        return results

    def __repr__(self) -> str:
        return f"Session({', '.join(self.names)})"


def training_result(done: TrainResult) -> Result:
    """A training run as a session's ``Result``: ``records["loss"]`` (one loss per step) and
    each trained tensor under its name."""
    records = {"loss": [torch.tensor(done.losses)], **{k: [t] for k, t in done.tensors.items()}}
    return Result(None, records)


Resolve = Callable[[Any], tuple[Any, Any, Any]]
"""A run's target -> ``(model or model.generate, returning or None, backward or None)``."""


def _owner(call: Any) -> nn.Module:
    return call if isinstance(call, nn.Module) else call.__self__


def _as_model(target: Any) -> tuple[Any, Any, Any]:
    if isinstance(target, nn.Module) or isinstance(getattr(target, "__self__", None), nn.Module):
        return target, None, None
    raise ArgumentTypeError(
        f"a session run is a {type(target).__name__}, which has no model here; run a session "
        "of plans with ts.plans.execute(session, base) or on a host (backend=client)"
    )


def _with_tensors_of_call(call: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """``call`` (a model or its ``generate``) on the model with ``tensors`` put in."""
    if isinstance(call, nn.Module):
        return with_tensors(call, tensors)
    model = with_tensors(call.__self__, tensors)
    return getattr(model, call.__name__)


def session(**runs: Any) -> Session:
    """A :class:`Session` from ``name=(model_or_plan, inputs[, kwargs])``, in order.

    ``inputs`` is one tensor (or text) or a tuple of positional arguments; ``kwargs`` a dict
    of keyword arguments (``attention_mask``, ...).
    """
    built = Session()
    for name, spec in runs.items():
        if isinstance(spec, Training):
            built = built.then(name, spec)
            continue
        if not isinstance(spec, Sequence) or isinstance(spec, str) or not 2 <= len(spec) <= 3:
            raise ArgumentTypeError(
                f"session run {name}=...: give (model_or_plan, inputs) or (model_or_plan, "
                "inputs, kwargs)"
            )
        target, inputs = spec[0], spec[1]
        kwargs = spec[2] if len(spec) == 3 else {}
        if not isinstance(kwargs, Mapping):
            raise ArgumentTypeError(
                f"session run {name}: the third item is a dict of keyword arguments"
            )
        args = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
        built = built.then(name, target, *args, **kwargs)
    return built
