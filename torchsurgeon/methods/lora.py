"""LoRA: train a low-rank adapter on chosen Linear modules while the base stays frozen.

:class:`~torchsurgeon.layers.LowRankAdapter` layers are inserted after the chosen modules
(by default every block's attention output projection and MLP down-projection; any selector
``at`` pattern works, e.g. ``"model.layers.*.self_attn.q_proj"``). Each starts with ``B = 0``,
so the adapted model computes exactly what the base does until training moves it.

Training runs on the pure-function view (``ts.functional``): the adapter tensors are the
only leaves that require grad and the base model's tensors go in detached, so the optimiser
sees the adapters alone, no gradient is ever computed for (or stored on) a base parameter,
and the base — shared with every other model made from it — is never written. The result
holds a new model, the base plus adapters with the trained tensors, which is an ordinary
rewrite: it runs, generates and saves as a plan.

A target is any module whose (primary) input and output are tensors mapping the last
dimension ``in -> out``: an ``nn.Linear``, GPT-2's ``Conv1D``, a converted model's
``Projection`` (widths read from the weight), or a whole MLP — ``GPT2MLP``, ``LlamaMLP``,
a converted ``mlp`` — whose widths are measured once, on one row of the input, with
``Save`` layers on its input and output.

The loss is next-token cross-entropy on ``input_ids`` (``loss_mask [batch, pos]`` marks
the positions whose token counts as a target). A padded batch comes with its
``attention_mask``: the model is called with it (and with position ids that skip padding),
and a token counts as a target only when it and the token before it are real. The model
runs in its current train/eval mode; call ``.eval()`` on it first for no dropout.

With ``backend=client`` the loop runs on the host, in one request (a session: the loss
before training, ``ts.training`` and the loss after it, see :func:`_train_on_host`); the
model may be ``client.meta(name)``, and a whole-MLP target's widths are then measured on
the meta device. The result is the same :class:`LoraResult`, with the same tensors and
losses as a local run on the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.expr import Expr, as_expr, input, out
from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.layers.training import AdamW, trained, training
from torchsurgeon.methods.batching import logits_of, rewrite_at
from torchsurgeon.methods.layout import ModelLayout, features, layout_of, n_layers
from torchsurgeon.methods.remote import logits_entry, plan_of, run_plans
from torchsurgeon.methods.tokens import forward_kwargs, inputs
from torchsurgeon.selectors.selection import select
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at
from torchsurgeon.surgery.progress import progress as show_progress
from torchsurgeon.surgery.sites import AFTER, site_layers
from torchsurgeon.surgery.tree import functional

__all__ = ["LoraResult", "add_adapters", "lm_loss", "train_lora"]


@dataclass(frozen=True)
class LoraResult:
    """The adapted model, its adapters by site path, and the loss along training."""

    model: nn.Module
    adapters: dict[str, LowRankAdapter]
    losses: torch.Tensor
    initial_loss: float
    final_loss: float


def lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy; ``loss_mask [batch, pos]`` selects target positions."""
    prediction = logits[:, :-1].float()
    target = input_ids[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1), reduction="none"
    )
    if loss_mask is None:
        return losses.mean()
    weights = loss_mask[:, 1:].reshape(-1).to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1)


def _targets(
    model: nn.Module, layout: ModelLayout | None, targets: str | Sequence[str] | None
) -> list[str]:
    if targets is None:
        layout = layout_of(model, layout)
        count = n_layers(model, layout)
        roles = ("attn_out", "mlp_down")
        return [layout.in_block(layer, role) for layer in range(count) for role in roles]
    patterns = [targets] if isinstance(targets, str) else list(targets)
    paths: list[str] = []
    for pattern in patterns:
        paths.extend(p for p in select(model).at(pattern).paths if p not in paths)
    return paths


def _widths(
    model: nn.Module, paths: list[str], ids: torch.Tensor, mask: torch.Tensor | None
) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each target: from its weight if Linear-like, else measured."""
    widths = {}
    unknown = []
    for path in paths:
        found = features(get_at(model, path))
        if found is None:
            unknown.append(path)
        else:
            widths[path] = found
    if unknown:
        probe = model
        for i, path in enumerate(unknown):
            probe = rewrite_at(probe, path, "insert_before", Save(f"in{i}"))
            probe = rewrite_at(probe, path, "insert_after", Save(f"out{i}"))
        row, row_mask = ids[:1], None if mask is None else mask[:1]
        if any(p.is_meta for p in model.parameters()):  # structure only: shapes on meta
            row, row_mask = row.to("meta"), None  # (widths do not depend on the padding)
        with torch.no_grad():
            saved = run(probe, row, **forward_kwargs(row_mask)).records
        for i, path in enumerate(unknown):
            if not saved.get(f"in{i}") or not saved.get(f"out{i}"):
                raise ArgumentError(f"train_lora: the module at {path!r} did not run on input_ids")
            widths[path] = (int(saved[f"in{i}"][0].shape[-1]), int(saved[f"out{i}"][0].shape[-1]))
    return widths


def add_adapters(
    model: nn.Module,
    adapters: dict[str, LowRankAdapter],
) -> nn.Module:
    """A new model with each adapter inserted after the module at its path."""
    model = wrap(model)
    for path, adapter in adapters.items():
        model = rewrite_at(model, path, "insert_after", adapter)
    return model


def train_lora(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    targets: str | Sequence[str] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    batch_size: int | None = None,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int = 0,
    layout: ModelLayout | None = None,
    backend: Backend | None = None,
    progress: bool | None = None,
) -> LoraResult:
    """Train rank-``rank`` adapters after ``targets`` on ``input_ids``; the base stays frozen.

    ``targets`` are selector paths (``at`` patterns, ``*`` globs allowed) of Linear-like
    modules or whole sublayers (see the module docstring); by default every block's
    attention output projection and MLP down-projection. Adam with learning rate ``lr``
    runs ``steps`` steps over minibatches of ``batch_size`` rows (all rows when None),
    drawn with a generator seeded by ``seed``. ``attention_mask`` marks padding.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) trains on
    that host, in one request (see :func:`_train_on_host`): the same adapters, minibatches,
    losses and trained tensors as locally, and the same :class:`LoraResult`.

    ``progress`` shows a bar over the local training steps with the last loss (default: on
    a terminal, unless ``TORCHSURGEON_PROGRESS=0``; ``False`` never).
    """
    model = wrap(model)
    ids, mask = inputs(input_ids, attention_mask)
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(ids.shape):
        raise ArgumentError(
            f"loss_mask has shape {tuple(loss_mask.shape)}; it must match input_ids "
            f"{tuple(ids.shape)}"
        )
    given_loss_mask = loss_mask is not None
    if mask is not None:  # a target is real, and so is the token it is predicted from
        real = mask * torch.cat([mask[:, :1], mask[:, :-1]], dim=1)
        loss_mask = real if loss_mask is None else loss_mask * real
    paths = _targets(model, layout, targets)
    if not paths:
        raise ArgumentError(f"train_lora: targets {targets!r} select no module")
    dtype = next(model.parameters()).dtype
    widths = _widths(model, paths, ids, mask)
    fresh: dict[str, LowRankAdapter] = {}
    for i, path in enumerate(paths):
        width_in, width_out = widths[path]
        fresh[path] = LowRankAdapter.init(
            width_in, width_out, rank, alpha=alpha, seed=seed + i, dtype=dtype
        )
    adapted = add_adapters(model, fresh)

    # Each adapter went in last after its module: its tensors' names in the functional view.
    names = {
        path: f"{path}.{AFTER}.{len(site_layers(get_at(adapted, path), AFTER)) - 1}"
        for path in paths
    }
    if backend is not None:
        return _train_on_host(
            backend,
            model,
            adapted,
            fresh,
            names,
            ids,
            mask,
            loss_mask,
            given_loss_mask=given_loss_mask,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
        )
    fn, params = functional(adapted)
    trainable = {
        f"{name}.{field}": params[f"{name}.{field}"].detach().clone().requires_grad_(True)
        for name in names.values()
        for field in ("a", "b")
    }
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    optimizer = torch.optim.Adam(list(trainable.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def loss_on(rows: torch.Tensor | None) -> torch.Tensor:
        batch = ids if rows is None else ids[rows]
        targets = loss_mask if rows is None or loss_mask is None else loss_mask[rows]
        padding = mask if rows is None or mask is None else mask[rows]
        output = fn({**frozen, **trainable}, batch, **forward_kwargs(padding))
        return lm_loss(logits_of(output), batch, targets)

    with torch.no_grad():
        initial = float(loss_on(None))
    losses: list[float] = []
    with torch.enable_grad():
        bar = show_progress(range(steps), desc="train_lora", enabled=progress, unit="step")
        for _ in bar:
            rows = None
            if batch_size is not None and batch_size < ids.shape[0]:
                rows = torch.randperm(ids.shape[0], generator=generator)[:batch_size]
            optimizer.zero_grad()
            loss = loss_on(rows)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=losses[-1])
    with torch.no_grad():
        final = float(loss_on(None))

    trained = {
        path: LowRankAdapter(
            trainable[f"{names[path]}.a"].detach().clone(),
            trainable[f"{names[path]}.b"].detach().clone(),
            adapter.scale.clone(),
        )
        for path, adapter in fresh.items()
    }
    return LoraResult(add_adapters(model, trained), trained, torch.tensor(losses), initial, final)


def _train_on_host(
    backend: Backend,
    model: nn.Module,
    adapted: nn.Module,
    fresh: dict[str, LowRankAdapter],
    names: dict[str, str],
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    loss_mask: torch.Tensor | None,
    *,
    given_loss_mask: bool,
    steps: int,
    lr: float,
    batch_size: int | None,
    seed: int,
) -> LoraResult:
    """:func:`train_lora`'s loop on the host, as one session (one request).

    ``initial`` runs the adapted model on every row, ``fit`` is a ``ts.training`` run —
    the adapters' ``a`` and ``b``, ``ts.optim.AdamW(lr, weight_decay=0)`` (what
    ``torch.optim.Adam(lr)`` computes), one batch per step: every row, or the minibatches
    the local loop draws, drawn here with the same seeded generator — and ``final`` runs the
    trained model (``ts.trained``) on every row. The loss is :func:`lm_loss` as an
    expression; ``initial`` and ``final`` return each token's loss and the mean is taken
    here, by :func:`lm_loss`'s operations.

    The targets a step's loss counts are read from its batch where they can be: with an
    ``attention_mask`` only, from ``ts.input("attention_mask")``. A ``loss_mask`` travels
    as a constant; with minibatches each batch row finds its row of it by its tokens (and
    mask), so rows that are the same prompt must have the same ``loss_mask`` row.
    """
    entry = logits_entry(model)
    logits = out(entry)
    from_mask = mask is not None and not given_loss_mask  # the targets: from each batch
    weights = None if loss_mask is None else loss_mask.float()
    minibatches = batch_size is not None and batch_size < ids.shape[0]
    if weights is None:
        step_weights = None
    elif from_mask:
        padding = input("attention_mask")
        real = padding * ops.cat([padding[:, :1], padding[:, :-1]], dim=1)
        step_weights = real.float()
    elif minibatches:
        step_weights = as_expr(weights)[_row_of(ids, mask, weights)]
    else:
        step_weights = as_expr(weights)
    loss = _loss(logits, input("input_ids"), step_weights)

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps if minibatches else 1):
        rows = (
            torch.randperm(ids.shape[0], generator=generator)[:batch_size] if minibatches else None
        )
        batch = ids if rows is None else ids[rows]
        padding = mask if rows is None or mask is None else mask[rows]
        batches.append({"input_ids": batch, **forward_kwargs(padding)})
    params = [f"{name}.{field}" for name in names.values() for field in ("a", "b")]
    fit = training(
        adapted,
        batches,
        loss=loss,
        params=params,
        optimizer=AdamW(lr, weight_decay=0.0),
        steps=steps,
    )
    every = plan_of(adapted).returning(token_losses=_token_losses(logits, ids))
    kwargs = forward_kwargs(mask)
    results = run_plans(
        backend,
        [
            ("initial", every, (ids,), kwargs),
            ("fit", fit, (), {}),
            ("final", trained(every, run="fit"), (ids,), kwargs),  # type: ignore[arg-type]
        ],
    )
    done = results["fit"].saved

    def mean(run: str) -> float:
        losses = results[run].saved["token_losses"]
        if weights is None:
            return float(losses.mean())
        step = weights[:, 1:].reshape(-1).to(losses.dtype)
        return float((losses * step).sum() / step.sum().clamp_min(1))

    adapters = {
        path: LowRankAdapter(
            done[f"{names[path]}.a"].detach().clone(),
            done[f"{names[path]}.b"].detach().clone(),
            adapter.scale.clone(),
        )
        for path, adapter in fresh.items()
    }
    losses = done["loss"].detach().clone()
    return LoraResult(
        add_adapters(model, adapters), adapters, losses, mean("initial"), mean("final")
    )


def _token_losses(logits: Expr, target_ids: Expr | torch.Tensor) -> Expr:
    """Each target's cross-entropy, ``[batch * (pos - 1)]``, as :func:`lm_loss` computes it:
    ``cross_entropy`` is ``nll_loss(log_softmax(x))``, minus the log-probability gathered
    at the target."""
    prediction = logits[:, :-1].float().flatten(0, 1)
    target = as_expr(target_ids)[:, 1:].reshape([-1])
    return -prediction.log_softmax(-1).gather(-1, target[:, None])[:, 0]


def _loss(logits: Expr, target_ids: Expr, weights: Expr | None) -> Expr:
    """:func:`lm_loss` as an expression (``weights [batch, pos]``: the loss mask)."""
    losses = _token_losses(logits, target_ids)
    if weights is None:
        return losses.mean()
    step = weights[:, 1:].reshape([-1]).float()
    return (losses * step).sum() / step.sum().clamp(min=1)


def _row_of(ids: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor) -> Expr:
    """The row of ``ids`` each row of a step's batch is (``[batch]``): the first row with the
    same tokens (and mask). Rows that are the same prompt must have the same weights."""
    keys = ids if mask is None else torch.cat([ids, mask], dim=1)
    for row in range(ids.shape[0]):
        same = (keys == keys[row]).all(-1)
        if not bool((weights[same] == weights[row]).all()):
            raise ArgumentError(
                f"train_lora(backend=...) with minibatches and a loss_mask: rows "
                f"{same.nonzero().flatten().tolist()} are the same prompt with different "
                "loss_mask rows, which a step's batch cannot tell apart on the host; "
                "deduplicate them or train with batch_size=None"
            )
    batch = input("input_ids")[:, None, :] == as_expr(ids)[None]
    if mask is not None:
        batch = ops.cat([batch, input("attention_mask")[:, None, :] == as_expr(mask)[None]], dim=2)
    return batch.float().amin(-1).argmax(-1)
