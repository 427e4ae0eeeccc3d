"""Training the tensors of intervention layers: ``ts.train`` and ``ts.optim``.

A LoRA, a steering vector, a probe trained through the model: each is a few tensors of the
layers a rewrite inserted, trained against a loss while the base stays frozen and shared.
``ts.train(model, batches, loss=expr, params=..., optimizer=ts.optim.AdamW(lr=1e-3),
steps=N)`` is that loop as data:

- ``params`` names the tensors: selections of intervention layers (every floating-point
  tensor of each), or ``"path"`` / ``"path.field"`` strings (the layer at ``path`` of the
  rewritten model, and one of its tensors);
- ``loss`` is a scalar expression over each step's run: ``ts.out("logits")``,
  ``ts.input("input_ids")`` (the batch), ``ts.saved(key)``;
- ``optimizer`` is a value (:class:`AdamW`, :class:`SGD`): its settings travel in a plan, the
  ``torch.optim`` object is built where the loop runs, and its state lives in that loop only.

Each step puts the current tensors into the layers by one copy-on-write rewrite, runs the
step's batch (``batches[step % len(batches)]``), and takes the gradient of the loss with
respect to the trained tensors only (``torch.autograd.grad``: nothing is computed for the
base's weights). The result (:class:`TrainResult`) holds the trained tensors by name, the
loss of every step, and the model with the trained tensors in place — the same value a host
returns for the loop, which can then run the next run of a session with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import InterventionLayer
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.graph import Graph, RunValues, device_of
from torchsurgeon.layers.results import named_inputs, run_with
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, SelectionError
from torchsurgeon.surgery.lineage import lineage_of, with_lineage
from torchsurgeon.surgery.paths import child_path, get_at, iter_nodes
from torchsurgeon.surgery.progress import progress as progress_bar
from torchsurgeon.surgery.rewrite import rewrite, setting

__all__ = [
    "SGD",
    "AdamW",
    "Batch",
    "Optimizer",
    "TrainResult",
    "Trained",
    "Training",
    "call_of",
    "train",
    "trainable",
    "trained",
    "training",
    "with_tensors",
]

MAX_STEPS = 100_000


@dataclass(frozen=True)
class Optimizer:
    """An optimizer as data: its name and settings; :meth:`build` makes the torch one."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def build(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        maker = _OPTIMIZERS.get(self.name)
        if maker is None:
            raise ArgumentError(
                f"optimizer: unknown name {self.name!r}; one of {', '.join(_OPTIMIZERS)} "
                "(ts.optim.AdamW(...), ts.optim.SGD(...))"
            )
        return maker(params, **self.settings)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, data: Any) -> Optimizer:
        """Checked: a known name and settings of the right kinds only (untrusted input)."""
        if not isinstance(data, Mapping) or set(data) != {"name", "settings"}:
            raise ArgumentError('optimizer: an optimizer is {"name": ..., "settings": {...}}')
        name, settings = data["name"], data["settings"]
        if name == "AdamW" and isinstance(settings, Mapping):
            return AdamW(**settings)
        if name == "SGD" and isinstance(settings, Mapping):
            return SGD(**settings)
        raise ArgumentError(
            f"optimizer: unknown optimizer {str(name)[:40]!r}; one of {', '.join(_OPTIMIZERS)}"
        )


def _number(name: str, value: Any, low: float, high: float) -> float:
    if type(value) not in (int, float) or not low <= value <= high:
        raise ArgumentError(
            f"optimizer: {name} must be a number from {low} to {high}, got {value!r}"
        )
    return float(value)


def AdamW(
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Optimizer:
    """``torch.optim.AdamW`` with these settings (its defaults)."""
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ArgumentError(f"optimizer: betas must be two numbers (0.9, 0.999), got {betas!r}")
    settings = {
        "lr": _number("lr", lr, 0.0, 10.0),
        "betas": [_number("betas[0]", betas[0], 0.0, 1.0), _number("betas[1]", betas[1], 0.0, 1.0)],
        "eps": _number("eps", eps, 0.0, 1.0),
        "weight_decay": _number("weight_decay", weight_decay, 0.0, 10.0),
    }
    return Optimizer("AdamW", settings)


def SGD(lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """``torch.optim.SGD`` with these settings (``lr`` has a default here)."""
    settings = {
        "lr": _number("lr", lr, 0.0, 10.0),
        "momentum": _number("momentum", momentum, 0.0, 1.0),
        "weight_decay": _number("weight_decay", weight_decay, 0.0, 10.0),
    }
    return Optimizer("SGD", settings)


def _adamw(params: Sequence[torch.Tensor], **settings: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **{**settings, "betas": tuple(settings["betas"])})


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": _adamw,
    "SGD": lambda params, **settings: torch.optim.SGD(params, **settings),
}


@dataclass(frozen=True)
class Batch:
    """One step's call, positional and keyword arguments apart (what a host passes)."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Training:
    """A training loop as a value: a run of a session (``ts.training(...)``), run by
    :func:`train` locally or by a host."""

    model: nn.Module
    batches: Sequence[Any]
    loss: Expr
    params: Any
    optimizer: Optimizer
    steps: int

    def run(self) -> TrainResult:
        return train(
            self.model,
            self.batches,
            loss=self.loss,
            params=self.params,
            optimizer=self.optimizer,
            steps=self.steps,
        )


def training(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    loss: Expr,
    params: Any,
    optimizer: Optimizer,
    steps: int,
) -> Training:
    """:func:`train`'s arguments as a session run (``ts.session(fit=ts.training(...), ...)``):
    a later run given as ``ts.trained(model, run="fit")`` uses the trained tensors."""
    return Training(model, batches, loss, params, optimizer, steps)


@dataclass(frozen=True)
class Trained:
    """A session run's model with the tensors an earlier training run trained put in."""

    model: nn.Module
    run: str


def trained(model: nn.Module, run: str) -> Trained:
    """``model``, in a session, with the tensors trained by the session's run ``run``."""
    if not isinstance(run, str) or not run.isidentifier():
        raise ArgumentError(
            f"trained(..., run=) names an earlier run of the session (an identifier), got {run!r}"
        )
    return Trained(model, run)


@dataclass
class TrainResult:
    """The trained tensors by name (``"<layer path>.<field>"``), the loss at every step, and
    ``model`` with the trained tensors in its layers."""

    tensors: dict[str, torch.Tensor]
    losses: list[float]
    model: nn.Module | None = None


def trainable(model: nn.Module, params: Any) -> list[tuple[str, str]]:
    """``(layer path, tensor field)`` of each tensor ``params`` names in ``model``.

    ``params``: a selection (or a list of selections) of intervention layers, or strings
    ``"path"`` (every floating-point tensor of that layer) / ``"path.field"``.
    """
    entries = params if isinstance(params, (list, tuple)) else [params]
    found: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, str):
            found.extend(_named(model, entry))
        elif hasattr(entry, "paths") and hasattr(entry, "model"):  # a Selection
            if entry.model is not model:
                raise SelectionError("params: select the layers on the model being trained")
            for path in entry.paths:
                found.extend(_named(model, path))
        else:
            raise ArgumentTypeError(
                f"params: selections of layers or 'path' / 'path.field' strings, got "
                f"{type(entry).__name__}"
            )
    if not found:
        raise SelectionError("params names no tensor to train")
    if len(set(found)) != len(found):
        raise SelectionError("params names one tensor twice")
    return found


def _layer_at(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """``(path as a plan names it, node)`` for ``path``. On a sharded model a layer sits
    inside a wrapper placed for its site (``Sharded``, see ``torchsurgeon.distributed``):
    the wrapper's path (the plan's) and the layer inside, whichever of the two was named."""
    node = get_at(model, path)
    if _is_wrapper(node):
        return path, node.layer
    parent, _, last = path.rpartition(".")
    if last == "layer" and parent and _is_wrapper(get_at(model, parent)):
        return parent, node
    return path, node


def _is_wrapper(node: nn.Module) -> bool:
    """Whether ``node`` is a sharded site's ``Sharded`` wrapper (marked, so no import)."""
    return bool(getattr(node, "ts_sharded", False))


def _named(model: nn.Module, name: str) -> list[tuple[str, str]]:
    head, _, tail = name.rpartition(".")
    layer = None
    if head:
        try:
            head, candidate = _layer_at(model, head)
        except KeyError:
            candidate = None
        if isinstance(candidate, InterventionLayer) and tail in candidate.tensors():
            layer, fields = candidate, [tail]
            name = head
    if layer is None:
        name, node = _layer_at(model, name)
        if not isinstance(node, InterventionLayer):
            raise SelectionError(
                f"params: {name!r} is a {type(node).__name__}, not an intervention layer; the "
                "base's weights are never trained here (train the layers a rewrite inserted)"
            )
        layer = node
        fields = [
            k
            for k, t in node.tensors().items()
            if t.is_floating_point()
            and (node.trainable_fields is None or k in node.trainable_fields)
        ]
    return [(name, f) for f in fields]


def with_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model`` with ``"<layer path>.<field>"`` tensors put into its layers (copy-on-write)."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        path, _, tensor_field = name.rpartition(".")
        path = child_path(path, "layer") if _is_wrapper(get_at(model, path)) else path
        by_layer.setdefault(path, {})[tensor_field] = tensor
    new = rewrite(model, {path: setting(values) for path, values in by_layer.items()})
    return with_lineage(new, lineage_of(model)) if new is not model else new


def train(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    loss: Expr | Graph,
    params: Any,
    optimizer: Optimizer,
    steps: int,
    on_step: Callable[[int, float], None] | None = None,
    backend: Any = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train the ``params`` tensors of ``model``'s layers for ``steps`` steps of ``optimizer``.

    ``batches`` are the inputs of each step's run: a tensor (token ids), a tuple of
    positional arguments, or a dict of keyword arguments; step ``i`` runs batch
    ``i % len(batches)``. ``on_step(step, loss)`` sees each step. With ``backend=`` (a
    ``ts.remote.Client``) the host runs the loop in one request. On a rewrite of a model
    sharded by ``ts.distributed.parallelize`` (call it on every rank alike) each rank's
    gradients are made whole before every step (``torchsurgeon.distributed.training``), so
    the trained tensors are the unsharded model's, named as the plan names them.
    ``progress`` shows a local bar over the steps with the last loss (default: on a terminal,
    unless ``TORCHSURGEON_PROGRESS=0``; ``False`` never).
    """
    if backend is not None:
        return backend.train(
            model, batches, loss=loss, params=params, optimizer=optimizer, steps=steps
        )
    if not isinstance(optimizer, Optimizer):
        raise ArgumentTypeError(
            "optimizer= is ts.optim.AdamW(...) or ts.optim.SGD(...), got "
            f"{type(optimizer).__name__}"
        )
    if type(steps) is not int or not 1 <= steps <= MAX_STEPS:
        raise ArgumentError(f"steps must be an int from 1 to {MAX_STEPS}, got {steps!r}")
    if not batches:
        raise ArgumentError("batches: train needs at least one batch (a tensor of token ids, ...)")
    graph = loss if isinstance(loss, Graph) else Graph.of(loss)
    graph.check_leaves(here=False, output=True)
    names = [f"{path}.{f}" for path, f in trainable(model, params)]
    current = {
        name: _layer_at(model, name.rpartition(".")[0])[1]
        .tensors()[name.rpartition(".")[2]]
        .detach()
        .clone()
        .requires_grad_(True)
        for name in names
    }
    torch_optimizer = optimizer.build(list(current.values()))
    reduce = _grad_reduction(model, names, list(current.values()))
    losses: list[float] = []
    bar = progress_bar(range(steps), desc="train", enabled=progress, unit="step")
    for step in bar:
        args, kwargs = call_of(batches[step % len(batches)])
        value = _step_loss(with_tensors(model, current), graph, args, kwargs)
        grads = torch.autograd.grad(value, list(current.values()), allow_unused=True)
        if reduce is not None:  # a sharded model: each rank's shares summed over the ranks
            grads = reduce(grads)
        for tensor, grad in zip(current.values(), grads, strict=True):
            tensor.grad = grad
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        losses.append(float(value.detach()))
        bar.set_postfix(loss=losses[-1])
        if on_step is not None:
            on_step(step, losses[-1])
    trained = {name: t.detach() for name, t in current.items()}
    return TrainResult(trained, losses, with_tensors(model, trained))


def _grad_reduction(
    model: nn.Module, names: list[str], tensors: list[torch.Tensor]
) -> Callable[..., Any] | None:
    """For a sharded model with layers placed at its sharded sites, what makes each rank's
    gradients whole; None otherwise (elsewhere every rank has every gradient whole)."""
    if not any(_is_wrapper(node) for _, node in iter_nodes(model)):
        return None
    from torchsurgeon.distributed.training import grad_reduction

    return grad_reduction(model, names, tensors)


def call_of(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as ``(args, kwargs)``: a :class:`Batch`, a dict (keywords), a tuple
    (positional) or one value (the first positional argument)."""
    if isinstance(batch, Batch):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple):
        return batch, {}
    return (batch,), {}


def _step_loss(
    model: nn.Module, graph: Graph, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    with torch.enable_grad():
        result = run_with(model, args, kwargs)
        values = RunValues(
            records=result.records,
            output=result.output,
            has_output=True,
            model=lineage_of(model).base,
            inputs=named_inputs(model, args, kwargs),
            device=device_of(result.output, result.records),
        )
        value = graph.evaluate(None, values)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ExpressionError("loss= takes a scalar expression: reduce it with .mean() or .sum()")
    if not value.requires_grad:
        raise ExpressionError(
            "loss=: the loss does not depend on the trained tensors (is the layer on the path "
            "to the loss?)"
        )
    return value.reshape(())
