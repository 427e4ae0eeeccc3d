"""A run's state, kept beside the model instead of on it.

``ts.run`` makes one :class:`RunContext` per run: for every layer of the model that takes
part (records, reads the run, counts its calls or marks a gradient site) a
:class:`LayerRun` holding that layer's record list, the run's values, its call counter and
the run's gradient sites, keyed by the layer's identity. The context is this thread's
current run while the model executes (:func:`~torchsurgeon.layers.guards.running`); a
nested run replaces it for its duration and the outer one is restored after. Layers find
their part with :func:`run_state`, which gives None outside a run. Nothing is written into
a layer, so trees that share layers — rewrites of one base, another thread's run of the
same model — never see each other's records.

The current run is a ``threading.local`` attribute, not a ``ContextVar``: TorchDynamo
traces attribute reads (and guards on them per thread), while ``ContextVar.get`` breaks a
``fullgraph=True`` compile.
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.layers.graph import RunValues
from torchsurgeon.layers.guards import current_run

__all__ = ["LayerRun", "RunContext", "run_state"]


class LayerRun:
    """One layer's part of one run: ``store`` (its record list, for a recording layer),
    ``values`` (the run's values, for a layer that reads the run), ``sites`` (the run's
    gradient sites, for ``SaveGrad`` / ``ComputeGrad``) and ``calls`` (``[n]``, its calls so
    far, for a layer with ``steps``)."""

    __slots__ = ("calls", "sites", "store", "values")

    def __init__(
        self,
        store: list[torch.Tensor] | None = None,
        values: RunValues | None = None,
        sites: list[torch.Tensor] | None = None,
        counted: bool = False,
    ) -> None:
        self.store = store
        self.values = values
        self.sites = sites
        self.calls = [0] if counted else None


class RunContext:
    """The state of one run: each taking part layer's :class:`LayerRun`, by identity.

    ``layers`` maps ``id(layer)`` to its part; ``held`` keeps the layers alive for the
    run, so no id is reused while it lasts.
    """

    __slots__ = ("held", "layers")

    def __init__(self) -> None:
        self.layers: dict[int, LayerRun] = {}
        self.held: list[nn.Module] = []

    def add(self, layer: nn.Module, part: LayerRun) -> None:
        """Give ``layer`` its part of the run (a layer placed twice keeps its first)."""
        if id(layer) not in self.layers:
            self.layers[id(layer)] = part
            self.held.append(layer)


def run_state(layer: nn.Module) -> LayerRun | None:
    """``layer``'s :class:`LayerRun` in this thread's current run; None outside a run or
    when the running model does not hold ``layer``."""
    context = current_run()
    if context is None:
        return None
    return context.layers.get(id(layer))
