"""Head knockout: what does the model lose when one attention head is silenced?

Ablating a head replaces its output — the slice ``h * d_head : (h + 1) * d_head`` of the
attention output projection's input — by zeros (``mode="zero"``) or by its mean over a
reference batch (``mode="mean"``, which keeps the head's constant contribution and removes
only what depends on the input). :func:`knockout_heads` returns a model with some heads
ablated, a rewrite like any other (it saves as a plan); :func:`head_knockout` measures every
head's ablation at once, one group of batch rows per head, with ``Zero`` / ``MeanAblate``
layers whose index starts with that group's rows (see :mod:`torchsurgeon.methods.batching`).

Padded batches come with their masks: ``reference_mask`` for the batch a head's mean is
taken over (the mean is over real tokens only) and ``attention_mask`` for the measured
prompts (the metric reads each row's own last real token, see
:func:`~torchsurgeon.methods.metrics.on_real_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from torchsurgeon.layers.edit import MeanAblate, Zero
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import run
from torchsurgeon.methods.batching import Edit, rewrite_at
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, d_head, layout_of, n_layers
from torchsurgeon.methods.metrics import Metric
from torchsurgeon.methods.padding import variants_with_mask
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.tokens import forward_kwargs, inputs
from torchsurgeon.surgery.frozen import wrap

__all__ = ["head_knockout", "head_means", "knockout_heads"]

Mode = Literal["zero", "mean"]


def head_means(
    model: nn.Module,
    reference_ids: torch.Tensor,
    layout: ModelLayout | None = None,
    *,
    reference_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each head's mean output over the batch and positions of ``reference_ids``.

    Shape ``[layer, head, d_head]``: what ``mode="mean"`` writes in place of a head. With
    ``reference_mask`` (a padded batch) the mean is over real tokens only.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(reference_ids, reference_mask, "reference_ids")
    count, width = n_layers(model, layout), d_head(model, layout)
    probe = model
    for layer in range(count):
        site = layout.in_block(layer, "attn_out")
        probe = rewrite_at(probe, site, "insert_before", Save(f"h{layer}"))
    with torch.no_grad():
        saved = run(probe, ids, **forward_kwargs(mask)).records
    means = []
    for layer in range(count):
        heads = saved[f"h{layer}"][0].float()
        if mask is None:
            means.append(heads.mean((0, 1)))
        else:
            means.append(heads[mask.bool().to(heads.device)].mean(0))
    return torch.stack(means).reshape(count, -1, width)


def _ablation(
    mode: Mode, means: torch.Tensor | None, layer: int, head: int, part: Index
) -> nn.Module:
    if mode == "zero":
        return Zero(part)
    if mode == "mean":
        if means is None:
            raise ValueError("mode='mean' needs reference_ids to take each head's mean over")
        return MeanAblate(means[layer, head], index=part)
    raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")


def knockout_heads(
    model: nn.Module,
    heads: Sequence[tuple[int, int]],
    *,
    mode: Mode = "zero",
    reference_ids: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
) -> nn.Module:
    """A new model with each ``(layer, head)`` in ``heads`` ablated at every position.

    ``mode="mean"`` needs ``reference_ids``, the batch each head's mean is taken over
    (``reference_mask`` marks its padding).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    width = d_head(model, layout)
    means = None
    if mode == "mean" and reference_ids is not None:
        means = head_means(model, reference_ids, layout, reference_mask=reference_mask)
    total = n_layers(model, layout)
    for layer, head in heads:
        layer = pick_layers([layer], total)[0]
        if not 0 <= head < (layout.n_heads or 0):
            raise IndexError(f"head {head} is out of range for {layout.n_heads} heads")
        ablation = _ablation(mode, means, layer, head, idx[..., head * width : (head + 1) * width])
        model = rewrite_at(model, layout.in_block(layer, "attn_out"), "insert_before", ablation)
    return model


def head_knockout(
    model: nn.Module,
    input_ids: torch.Tensor,
    metric: Metric,
    *,
    mode: Mode = "zero",
    reference_ids: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    max_rows: int | None = None,
    attention_mask: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
) -> EffectGrid:
    """Ablate each head alone (all in one batch); ``metric(ablated) - metric(intact)``.

    ``mode="mean"`` ablates to each head's mean over ``reference_ids`` (default: the
    ``input_ids`` themselves, with ``attention_mask``). The grid is layer x head;
    ``clean_metric`` is the intact model's metric. On a padded batch (``attention_mask``)
    the metric reads each row's logits right-aligned, so ``-1`` is its last real token.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    width = d_head(model, layout)
    rows_of = pick_layers(layers, n_layers(model, layout))
    heads = layout.n_heads or 0
    means = None
    if mode == "mean":
        if reference_ids is None:
            reference_ids, reference_mask = ids, mask
        means = head_means(model, reference_ids, layout, reference_mask=reference_mask)

    def edits(k: int, rows: range) -> Sequence[Edit]:
        layer, head = rows_of[k // heads], k % heads
        part = idx[rows.start : rows.stop, :, head * width : (head + 1) * width]
        ablation = _ablation(mode, means, layer, head, part)
        return [(layout.in_block(layer, "attn_out"), "insert_before", ablation)]

    (intact,), ablated = variants_with_mask(
        model, [ids], ids, len(rows_of) * heads, edits, metric, mask, max_rows=max_rows
    )
    return EffectGrid(
        values=(ablated - intact).reshape(len(rows_of), heads),
        row_labels=tuple(f"L{layer}" for layer in rows_of),
        col_labels=tuple(f"H{h}" for h in range(heads)),
        row_name="layer",
        col_name="head",
        title=f"head knockout ({mode} ablation)",
        measure="metric(ablated) - metric(intact)",
        clean_metric=intact,
    )
