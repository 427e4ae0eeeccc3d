"""Linear probes: at which layer is a property linearly readable from the residual stream?

A probe is a logistic-regression classifier trained on a layer's activations to predict a
label (the part of speech of the token, whether a sequence repeats, a token's identity...).
High held-out accuracy at layer ``l`` says the information is there, linearly, after block
``l`` — not that the model uses it (for that, intervene: patch, ablate, steer).

:func:`train_probe` saves the residual stream after every block (``Save`` layers, one
forward pass per ``batch_size`` prompts) and fits one probe per layer with
:func:`fit_probe`: features standardised with the training split's mean and deviation,
weights trained full-batch with Adam and a little weight decay, a seeded train/test split
shared by every layer. Labels are one per prompt (read at ``position``) or one per token
(``position=None``, labels ``[batch, pos]``). On a padded batch (``attention_mask=``) each
prompt is read at its own ``position`` (``-1``: its last real token) and, per token, the
padding positions are no examples at all: their labels are ignored.

With ``backend=client`` the features are collected on a host (one request per
``batch_size`` prompts, only the features travel) and the probes are fitted here. With
``fit_on_host=True`` as well the probes are fitted on the host too, in one request, and
only the probes come back (see :func:`_fit_on_host`). That is an option, not the default,
because a fit there is a ``ts.train`` loop: each of its ``steps`` optimizer steps is one
forward pass of every prompt through the model (up to the last probed block), where the
local fit runs the model once and iterates on the features. And it needs
``weight_decay=0``: :func:`fit_probe` uses ``torch.optim.Adam``'s *coupled* weight decay
(the gradient plus ``weight_decay * weight``, one fused multiply-add), which no
``ts.optim`` optimizer computes (``AdamW``'s is decoupled), and a loss term in its place
cannot read the probe's weight (a loss reads the run, not a layer's tensors) — nor would
it round the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.compute import Compute, Stop
from torchsurgeon.layers.expr import Expr, as_expr, saved
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.layers.training import AdamW, trained, training
from torchsurgeon.methods.batching import rewrite_at
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.remote import plan_of, run_plan, run_plans
from torchsurgeon.methods.tokens import forward_kwargs, inputs, token_index
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at
from torchsurgeon.surgery.progress import progress as show_progress
from torchsurgeon.surgery.sites import AFTER, site_layers

__all__ = ["Probe", "ProbeResult", "fit_probe", "residual_features", "train_probe"]


@dataclass(frozen=True)
class Probe:
    """One fitted probe: ``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    train_accuracy: float
    test_accuracy: float

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted class of each row of ``features``."""
        standard = (features.float() - self.mean) / self.std
        return (standard @ self.weight.T + self.bias).argmax(-1)


@dataclass(frozen=True)
class ProbeResult:
    """One probe per layer: held-out accuracy ``[layer]`` and the probes themselves."""

    accuracy: torch.Tensor
    train_accuracy: torch.Tensor
    chance: float
    probes: tuple[Probe, ...]
    layer_labels: tuple[str, ...]
    n_train: int
    n_test: int


def _split(count: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < test_fraction < 1:
        raise ArgumentError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(count * test_fraction))
    if n_test >= count:
        raise ArgumentError(f"{count} examples are too few to hold out {test_fraction:.0%} of them")
    return order[n_test:], order[:n_test]


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    test_fraction: float = 0.25,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> Probe:
    """Fit a logistic-regression probe on ``features [n, d]`` for ``labels [n]``."""
    x, y = features.detach().float(), torch.as_tensor(labels).long().reshape(-1)
    if x.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ArgumentError(
            f"features {tuple(x.shape)} and labels {tuple(y.shape)} must be [n, d] and [n]"
        )
    if bool((y < 0).any()):
        raise ArgumentError("labels must be class indices >= 0")
    train, test = _split(x.shape[0], test_fraction, seed)
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1e-6)
    standard = (x - mean) / std
    classes = int(y.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(classes, x.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = standard[train] @ weight.T + bias
            loss = torch.nn.functional.cross_entropy(logits, y[train])
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = (standard @ weight.T + bias).argmax(-1)
        correct = (predicted == y).float()
    return Probe(
        weight.detach(),
        bias.detach(),
        mean,
        std,
        float(correct[train].mean()),
        float(correct[test].mean()),
    )


def residual_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    position: int | None = -1,
    batch_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    backend: Backend | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """The residual stream after each block: ``[layer, example, d_model]``.

    Examples are the prompts (read at ``position``) or, with ``position=None``, every token
    (every real token, row by row, when ``attention_mask`` marks padding).

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs each
    forward pass on that host — one request per ``batch_size`` prompts, one in all without
    it — and only the features (the states at the read positions) come back. ``progress``
    shows a bar over the batches (default: on a terminal; ``False`` never).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    picked = pick_layers(layers, n_layers(model, layout))
    probe = model
    for layer in picked:
        probe = rewrite_at(probe, layout.block(layer), "insert_after", Save(f"resid{layer}"))
    step = batch_size or ids.shape[0]
    chunks: list[torch.Tensor] = []
    starts = range(0, ids.shape[0], step)
    for start in show_progress(starts, desc="residual_features", enabled=progress, unit="batch"):
        part = slice(start, start + step)
        rows = ids[part]
        part_mask = None if mask is None else mask[part]
        if backend is not None:
            chunks.append(_host_features(backend, probe, rows, part_mask, picked, position))
            continue
        with torch.no_grad():
            records = run(probe, rows, **forward_kwargs(part_mask)).records
        resid = torch.stack([records[f"resid{layer}"][0] for layer in picked]).float()
        if position is None:
            if part_mask is not None:
                resid = resid[:, part_mask.bool().to(resid.device)]
            chunks.append(resid.reshape(len(picked), -1, resid.shape[-1]))
        else:
            columns = token_index(part_mask, position, ids.shape[1], rows.shape[0])
            everyone = torch.arange(rows.shape[0])
            chunks.append(resid[:, everyone, columns.to(everyone.device)])
    return torch.cat(chunks, dim=1)


def _host_features(
    backend: Backend,
    probe: nn.Module,
    rows: torch.Tensor,
    mask: torch.Tensor | None,
    picked: Sequence[int],
    position: int | None,
) -> torch.Tensor:
    """One chunk's features computed on the host, by the operations the local path makes."""
    resid = ops.stack([saved(f"resid{layer}") for layer in picked]).float()
    if position is None:
        if mask is not None:
            real_rows, real_columns = mask.bool().cpu().nonzero(as_tuple=True)
            resid = resid[:, real_rows, real_columns]
    else:
        columns = token_index(mask, position, rows.shape[1], rows.shape[0])
        resid = resid[:, torch.arange(rows.shape[0]), columns.cpu()]
    plan = plan_of(probe).returning(features=resid)
    features = run_plan(backend, plan, rows, **forward_kwargs(mask)).saved["features"]
    if position is None:
        return features.reshape(len(picked), -1, features.shape[-1])
    return features


def train_probe(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    position: int | None = -1,
    test_fraction: float = 0.25,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
    batch_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    backend: Backend | None = None,
    fit_on_host: bool = False,
) -> ProbeResult:
    """Train a linear probe on each layer's residual stream; held-out accuracy per layer.

    ``labels`` is ``[batch]`` (read at ``position``) or ``[batch, pos]`` with
    ``position=None`` (one example per token; with ``attention_mask``, per real token —
    the labels at padding are ignored).

    ``backend``: the features are collected on that host (:func:`residual_features`, one
    request per ``batch_size`` prompts); the probes are fitted here, on them.
    ``fit_on_host=True`` (with ``backend``, ``weight_decay=0`` and ``batch_size=None``) fits
    them on the host as well, in one request: the same probes, and only they travel back,
    at the price of one forward pass per optimizer step there (see the module docstring).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    labels = torch.as_tensor(labels).long()
    expected = tuple(ids.shape) if position is None else (ids.shape[0],)
    if tuple(labels.shape) != expected:
        raise ArgumentError(
            f"labels have shape {tuple(labels.shape)}; with position={position!r} and "
            f"input_ids {tuple(ids.shape)} they must be {expected}"
        )
    picked = pick_layers(layers, n_layers(model, layout))
    per_token = position is None and mask is not None
    flat = labels[mask.bool().to(labels.device)] if per_token else labels.reshape(-1)
    if fit_on_host:
        if backend is None:
            raise ArgumentError("fit_on_host=True fits on a host: give backend= too")
        if weight_decay != 0:
            raise ArgumentError(
                "fit_on_host=True needs weight_decay=0: the local fit's torch.optim.Adam "
                "weight decay (coupled: added to the gradient) has no ts.optim optimizer on "
                "a host (AdamW's decay is decoupled), so the probes would differ"
            )
        if batch_size is not None:
            raise ArgumentError(
                "fit_on_host=True trains on every prompt at each step (one forward pass on "
                "the host); leave batch_size=None"
            )
        probes = _fit_on_host(
            backend,
            model,
            layout,
            ids,
            mask,
            flat,
            picked,
            position,
            test_fraction,
            steps,
            lr,
            seed,
        )
    else:
        probes = _fit_here(
            model,
            layout,
            ids,
            mask,
            flat,
            picked,
            position,
            test_fraction,
            steps,
            lr,
            weight_decay,
            seed,
            batch_size,
            backend,
        )
    _, test = _split(flat.shape[0], test_fraction, seed)
    chance = float(torch.bincount(flat[test]).max()) / len(test)
    return ProbeResult(
        accuracy=torch.tensor([p.test_accuracy for p in probes]),
        train_accuracy=torch.tensor([p.train_accuracy for p in probes]),
        chance=chance,
        probes=probes,
        layer_labels=tuple(f"L{layer}" for layer in picked),
        n_train=flat.shape[0] - len(test),
        n_test=len(test),
    )


def _fit_here(
    model: nn.Module,
    layout: ModelLayout,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    flat: torch.Tensor,
    picked: Sequence[int],
    position: int | None,
    test_fraction: float,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    batch_size: int | None,
    backend: Backend | None,
) -> tuple[Probe, ...]:
    """The features (here or from the host), and one probe per layer fitted here on them."""
    features = residual_features(
        model,
        ids,
        layers=picked,
        position=position,
        batch_size=batch_size,
        attention_mask=mask,
        layout=layout,
        backend=backend,
    )
    return tuple(
        fit_probe(
            layer_features,
            flat,
            test_fraction=test_fraction,
            steps=steps,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
        )
        for layer_features in features
    )


def _fit_on_host(
    backend: Backend,
    model: nn.Module,
    layout: ModelLayout,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    flat: torch.Tensor,
    picked: Sequence[int],
    position: int | None,
    test_fraction: float,
    steps: int,
    lr: float,
    seed: int,
) -> tuple[Probe, ...]:
    """One probe per layer fitted on the host, as :func:`fit_probe` fits it, in one request.

    Each probe is a ``Compute`` layer after the last probed block whose expression holds
    its ``weight`` and ``bias``: it reads its layer's saved residual stream at the examples'
    positions, standardises it with the training split's mean and deviation, and gives the
    logits of the training rows and then of every row; a ``Save`` keeps them and a ``Stop``
    ends the pass there. The session's ``fit`` run trains every probe's tensors at once
    (``ts.training``: the loss is the sum of the probes' cross-entropies on the training
    rows, so each probe's gradient is its own; ``ts.optim.AdamW(lr, weight_decay=0)`` is
    ``torch.optim.Adam(lr)``, step for step), and ``final`` (``ts.trained``) returns each
    probe's mean, deviation and predictions. Same initial weights, same operations: the
    same probes as locally.
    """
    targets_all = flat.long()
    if bool((targets_all < 0).any()):
        raise ArgumentError("labels must be class indices >= 0")
    train, test = _split(targets_all.shape[0], test_fraction, seed)
    n_train, classes = len(train), int(targets_all.max()) + 1
    rows, columns = _example_index(ids, mask, position)
    generator = torch.Generator().manual_seed(seed)
    d_model = _width_of(model, layout, picked[0], ids)
    first_weight = torch.randn(classes, d_model, generator=generator) * 0.01

    probe = model
    for layer in picked:
        probe = rewrite_at(probe, layout.block(layer), "insert_after", Save(f"resid{layer}"))
    last = layout.block(picked[-1])
    names: list[str] = []
    reads: dict[str, Expr] = {}
    loss: Expr | None = None
    for layer in picked:
        x = saved(f"resid{layer}").float()[rows, columns]  # [examples, d_model]
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        standard = (x - mean) / std
        weight, bias = as_expr(first_weight.clone()), as_expr(torch.zeros(classes))
        logits = ops.cat(
            [
                standard[train] @ weight.transpose(0, 1) + bias,  # what the loss reads
                standard @ weight.transpose(0, 1) + bias,  # every row, for the accuracy
            ]
        )
        probe = rewrite_at(probe, last, "insert_after", Compute(logits))
        names.append(f"{last}.{AFTER}.{len(site_layers(get_at(probe, last), AFTER)) - 1}")
        probe = rewrite_at(probe, last, "insert_after", Save(f"probe{layer}"))
        read = saved(f"probe{layer}")
        targets = targets_all[train][:, None]
        term = -read[:n_train].log_softmax(-1).gather(-1, targets)[:, 0].mean()
        loss = term if loss is None else loss + term
        reads |= {f"mean{layer}": mean, f"std{layer}": std}
        reads[f"predicted{layer}"] = read[n_train:].argmax(-1)
    probe = rewrite_at(probe, last, "insert_after", Stop())
    assert loss is not None
    kwargs = forward_kwargs(mask)
    fit = training(
        probe,
        [{"input_ids": ids, **kwargs}],
        loss=loss,
        params=names,
        optimizer=AdamW(lr, weight_decay=0.0),
        steps=steps,
    )
    final = trained(plan_of(probe).returning(**reads), run="fit")  # type: ignore[arg-type]
    results = run_plans(backend, [("fit", fit, (), {}), ("final", final, (ids,), kwargs)])
    done, found = results["fit"].saved, results["final"].saved
    probes = []
    for layer, name in zip(picked, names, strict=True):
        tensors = [done[f"{name}.{k}"] for k in _float_fields(get_at(probe, name))]
        fitted_weight = next(t for t in tensors if t.dim() == 2)  # [classes, d_model]
        fitted_bias = next(t for t in tensors if t.dim() == 1)  # [classes]
        correct = (found[f"predicted{layer}"] == targets_all).float()
        probes.append(
            Probe(
                fitted_weight.detach(),
                fitted_bias.detach(),
                found[f"mean{layer}"],
                found[f"std{layer}"],
                float(correct[train].mean()),
                float(correct[test].mean()),
            )
        )
    return tuple(probes)


def _float_fields(layer: nn.Module) -> list[str]:
    return [k for k, t in layer.tensors().items() if t.is_floating_point()]  # type: ignore[operator]


def _example_index(
    ids: torch.Tensor, mask: torch.Tensor | None, position: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)`` of the examples in ``[batch, pos]``, in :func:`residual_features`'s
    order: each prompt at ``position``, or every (real) token row by row."""
    batch, length = ids.shape
    if position is not None:
        return torch.arange(batch), token_index(mask, position, length, batch).cpu()
    if mask is None:
        return torch.arange(batch).repeat_interleave(length), torch.arange(length).repeat(batch)
    real_rows, real_columns = mask.bool().cpu().nonzero(as_tuple=True)
    return real_rows, real_columns


def _width_of(model: nn.Module, layout: ModelLayout, layer: int, ids: torch.Tensor) -> int:
    """The width of the residual stream after block ``layer``, from one row run on the meta
    device (structure only: no weight is read)."""
    from torchsurgeon.plans.structure import meta

    if not all(p.is_meta for p in model.parameters()):
        model = meta(model)
    probe = rewrite_at(model, layout.block(layer), "insert_after", Save("width"))
    with torch.no_grad():
        return int(run(probe, ids[:1].to("meta")).saved["width"].shape[-1])
