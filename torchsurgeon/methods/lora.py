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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import logits_of, rewrite_at
from torchsurgeon.methods.layout import ModelLayout, features, layout_of, n_layers
from torchsurgeon.methods.remote import local_only
from torchsurgeon.methods.tokens import forward_kwargs, inputs
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
        row_mask = None if mask is None else mask[:1]
        with torch.no_grad():
            saved = run(probe, ids[:1], **forward_kwargs(row_mask)).records
        for i, path in enumerate(unknown):
            if not saved.get(f"in{i}") or not saved.get(f"out{i}"):
                raise ValueError(f"train_lora: the module at {path!r} did not run on input_ids")
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
) -> LoraResult:
    """Train rank-``rank`` adapters after ``targets`` on ``input_ids``; the base stays frozen.

    ``targets`` are selector paths (``at`` patterns, ``*`` globs allowed) of Linear-like
    modules or whole sublayers (see the module docstring); by default every block's
    attention output projection and MLP down-projection. Adam with learning rate ``lr``
    runs ``steps`` steps over minibatches of ``batch_size`` rows (all rows when None),
    drawn with a generator seeded by ``seed``. ``attention_mask`` marks padding.

    ``backend=`` is refused (``NotImplementedError``): training on a host is the issue
    "Gradients, generation and training on the host".
    """
    local_only("train_lora", backend, "training (gradients and optimizer steps)")
    model = wrap(model)
    ids, mask = inputs(input_ids, attention_mask)
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"loss_mask has shape {tuple(loss_mask.shape)}; it must match input_ids "
            f"{tuple(ids.shape)}"
        )
    if mask is not None:  # a target is real, and so is the token it is predicted from
        real = mask * torch.cat([mask[:, :1], mask[:, :-1]], dim=1)
        loss_mask = real if loss_mask is None else loss_mask * real
    paths = _targets(model, layout, targets)
    if not paths:
        raise ValueError(f"train_lora: targets {targets!r} select no module")
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
