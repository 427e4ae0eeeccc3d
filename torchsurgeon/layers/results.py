"""Running a rewritten model and reading what it recorded: ``ts.run`` and ``ts.Result``.

Calling a rewritten model is plain PyTorch: edits apply and nothing is kept. ``ts.run``
calls it with its recording layers switched on and hands back the output with everything
they recorded, by key. It takes the model, a compiled model, or a bound method such as
``model.generate`` (every generation step is recorded, in order). Given ``backend=``, the
same call runs elsewhere — e.g. on a remote host through ``ts.remote.Client`` — and returns
the same kind of :class:`Result`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from torchsurgeon.layers.base import Recorder
from torchsurgeon.surgery.frozen import is_frozen
from torchsurgeon.surgery.paths import iter_nodes

__all__ = ["Backend", "Result", "run"]

_RECORDERS: weakref.WeakKeyDictionary[nn.Module, tuple[Recorder, ...]] = weakref.WeakKeyDictionary()


@dataclass
class Result:
    """What one run gave back: the model's output and the recorded tensors by key.

    ``saved[key]`` is a tensor when the recording layer ran once, and a list of tensors (in
    call order) when it ran several times, as in ``generate``. Gradients recorded by
    ``SaveGrad`` appear once ``backward`` has run.
    """

    output: Any
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def saved(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        return {
            key: values[0] if len(values) == 1 else list(values)
            for key, values in self.records.items()
            if values
        }


class Backend(Protocol):
    """Anything that can run a rewritten model elsewhere (see ``ts.remote.Client``)."""

    def run(self, model: nn.Module, *args: Any, **kwargs: Any) -> Result: ...


def recorders(model: nn.Module) -> tuple[Recorder, ...]:
    """The recording layers of ``model`` (cached for frozen trees, which never change)."""
    found = _RECORDERS.get(model) if is_frozen(model) else None
    if found is None:
        found = tuple(m for _, m in iter_nodes(model) if isinstance(m, Recorder))
        by_key: dict[str, Recorder] = {}
        for layer in found:
            other = by_key.setdefault(layer.key, layer)
            if other is not layer:
                raise ValueError(
                    f"two recording layers use the key {layer.key!r} (at {other.site!r} and "
                    f"{layer.site!r}); give each its own name, e.g. Save('resid_{{n}}'), or "
                    "Save() to key each by its path"
                )
        if is_frozen(model):
            _RECORDERS[model] = found
    return found


def _module_of(target: Callable[..., Any]) -> nn.Module:
    if isinstance(target, nn.Module):
        return getattr(target, "_orig_mod", target)  # torch.compile's OptimizedModule
    owner = getattr(target, "__self__", None)
    if isinstance(owner, nn.Module):
        return getattr(owner, "_orig_mod", owner)
    raise TypeError(
        "ts.run expects a model, a compiled model or a bound method of one (model.generate), "
        f"got {type(target).__name__}"
    )


def run(
    target: nn.Module | Callable[..., Any],
    *args: Any,
    backend: Backend | None = None,
    **kwargs: Any,
) -> Result:
    """Call ``target(*args, **kwargs)`` with recording on; return a :class:`Result`."""
    model = _module_of(target)
    if backend is not None:
        if target is not model:
            raise TypeError("with backend=, pass the model itself, not a method of it")
        return backend.run(model, *args, **kwargs)
    layers = recorders(model)
    records: dict[str, list[torch.Tensor]] = {}
    # ``_ts_store`` is a plain attribute: writing the instance dict skips nn.Module's (and
    # the frozen class's) ``__setattr__`` checks, ~3 µs per layer per run.
    for layer in layers:
        layer.__dict__["_ts_store"] = records.setdefault(layer.key, [])
    try:
        output = target(*args, **kwargs)
    finally:
        for layer in layers:
            layer.__dict__["_ts_store"] = None
    return Result(output, records)
