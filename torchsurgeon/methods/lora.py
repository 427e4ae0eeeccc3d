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

The loss is next-token cross-entropy on ``input_ids`` (``loss_mask [batch, pos]`` marks
the positions whose token counts as a target). The model runs in its current train/eval
mode; call ``.eval()`` on it first for no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.methods.batching import logits_of, rewrite_at
from torchsurgeon.methods.layout import ModelLayout, features, layout_of, n_layers
from torchsurgeon.methods.tokens import as_batch
from torchsurgeon.selectors.selection import select
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at
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
    seed: int = 0,
    layout: ModelLayout | None = None,
) -> LoraResult:
    """Train rank-``rank`` adapters after ``targets`` on ``input_ids``; the base stays frozen.

    ``targets`` are selector paths (``at`` patterns, ``*`` globs allowed); by default every
    block's attention output projection and MLP down-projection. Adam with learning rate
    ``lr`` runs ``steps`` steps over minibatches of ``batch_size`` rows (all rows when None),
    drawn with a generator seeded by ``seed``.
    """
    model = wrap(model)
    ids = as_batch(input_ids)
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"loss_mask has shape {tuple(loss_mask.shape)}; it must match input_ids "
            f"{tuple(ids.shape)}"
        )
    paths = _targets(model, layout, targets)
    dtype = next(model.parameters()).dtype
    fresh: dict[str, LowRankAdapter] = {}
    for i, path in enumerate(paths):
        width_in, width_out = features(get_at(model, path))
        fresh[path] = LowRankAdapter.init(
            width_in, width_out, rank, alpha=alpha, seed=seed + i, dtype=dtype
        )
    adapted = add_adapters(model, fresh)

    # Each adapter went in last after its module: its tensors' names in the functional view.
    names = {
        path: f"{path}.{AFTER}.{len(site_layers(get_at(adapted, path), AFTER)) - 1}"
        for path in paths
    }
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
        mask = loss_mask if rows is None or loss_mask is None else loss_mask[rows]
        return lm_loss(logits_of(fn({**frozen, **trainable}, batch)), batch, mask)

    with torch.no_grad():
        initial = float(loss_on(None))
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(steps):
            rows = None
            if batch_size is not None and batch_size < ids.shape[0]:
                rows = torch.randperm(ids.shape[0], generator=generator)[:batch_size]
            optimizer.zero_grad()
            loss = loss_on(rows)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
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
