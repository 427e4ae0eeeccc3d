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

With ``backend=client`` the sweep runs on a host, one request for one batch (the reference
batch of ``mode="mean"`` in the same request; see :mod:`torchsurgeon.methods.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.compute import Compute
from torchsurgeon.layers.edit import MeanAblate, Zero
from torchsurgeon.layers.expr import Expr, as_expr, here, saved
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import Edit, PassEdits, RowLayout, rewrite_at
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, d_head, layout_of, n_layers
from torchsurgeon.methods.metrics import Metric, check_answers, vocab_size
from torchsurgeon.methods.padding import variants_with_mask
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.remote import Run, plan_of, run_plans
from torchsurgeon.methods.tokens import forward_kwargs, inputs
from torchsurgeon.surgery.errors import ArgumentError, OutOfRangeError
from torchsurgeon.surgery.frozen import wrap

__all__ = ["head_knockout", "head_means", "knockout_heads"]

Mode = Literal["zero", "mean"]


def head_means(
    model: nn.Module,
    reference_ids: torch.Tensor,
    layout: ModelLayout | None = None,
    *,
    reference_mask: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Each head's mean output over the batch and positions of ``reference_ids``.

    Shape ``[layer, head, d_head]``: what ``mode="mean"`` writes in place of a head. With
    ``reference_mask`` (a padded batch) the mean is over real tokens only. With
    ``backend`` the means are computed on that host (one request; only they come back).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(reference_ids, reference_mask, "reference_ids")
    count, width = n_layers(model, layout), d_head(model, layout)
    if backend is not None:
        result = run_plans(backend, [_reference_run(model, layout, ids, mask)])
        return result[_REFERENCE].saved["head_means"].reshape(count, -1, width)
    probe = _means_probe(model, layout)
    with torch.no_grad():
        records = run(probe, ids, **forward_kwargs(mask)).records
    means = []
    for layer in range(count):
        heads = records[f"h{layer}"][0].float()
        if mask is None:
            means.append(heads.mean((0, 1)))
        else:
            means.append(heads[mask.bool().to(heads.device)].mean(0))
    return torch.stack(means).reshape(count, -1, width)


_REFERENCE = "reference"


def _means_probe(model: nn.Module, layout: ModelLayout) -> nn.Module:
    """``model`` with ``Save(f"h{layer}")`` at the input of each attention output projection."""
    probe = model
    for layer in range(n_layers(model, layout)):
        site = layout.in_block(layer, "attn_out")
        probe = rewrite_at(probe, site, "insert_before", Save(f"h{layer}"))
    return probe


def _layer_mean(layer: int, mask: torch.Tensor | None, run: str | None = None) -> Expr:
    """Layer ``layer``'s head outputs averaged over the reference batch (real tokens only
    with ``mask``), as an expression — the operations :func:`head_means` makes."""
    heads = saved(f"h{layer}", run=run).float()
    if mask is None:
        return heads.mean([0, 1])
    rows, columns = mask.bool().cpu().nonzero(as_tuple=True)  # what heads[mask] reads, in order
    return heads[rows, columns].mean(0)


def _reference_run(
    model: nn.Module, layout: ModelLayout, ids: torch.Tensor, mask: torch.Tensor | None
) -> Run:
    """The reference batch's run of a session: its head outputs saved, their means returned."""
    means = ops.stack([_layer_mean(layer, mask) for layer in range(n_layers(model, layout))])
    plan = plan_of(_means_probe(model, layout)).returning(head_means=means)
    return (_REFERENCE, plan, (ids,), forward_kwargs(mask))


def _ablation(
    mode: Mode, means: torch.Tensor | None, layer: int, head: int, part: Index
) -> nn.Module:
    if mode == "zero":
        return Zero(part)
    if mode == "mean":
        if means is None:
            raise ArgumentError("mode='mean' needs reference_ids to take each head's mean over")
        return MeanAblate(means[layer, head], index=part)
    raise ArgumentError(f"mode must be 'zero' or 'mean', got {mode!r}")


def _host_ablations(
    mode: Mode,
    layout: ModelLayout,
    rows_of: Sequence[int],
    heads: int,
    width: int,
    reference_mask: torch.Tensor | None,
) -> PassEdits:
    """One pass's ablations on a host: one ``Compute`` per layer for all its heads.

    Locally each head of the pass is one ``Zero`` / ``MeanAblate`` layer — a plan step each,
    layers x heads of them, more than a host allows for a mid-sized model. Here each layer
    gets one ``Compute`` writing, in each ablated group's rows and its head's columns, what
    that layer would: zeros, or the layer's mean head outputs over the reference run of the
    same request (cast to the activation's dtype, as ``MeanAblate`` casts its mean).
    """
    column_heads = torch.arange(heads * width) // width

    def build(placed: Sequence[tuple[int, range]], rows: RowLayout) -> Sequence[Edit]:
        ablated: dict[int, torch.Tensor] = {}  # layer -> the head each row ablates (-1: none)
        for k, group in placed:
            layer, head = rows_of[k // heads], k % heads
            row_heads = ablated.setdefault(layer, torch.full((rows.batch,), -1))
            row_heads[group.start : group.stop] = head
        found: list[Edit] = []
        for layer, row_heads in ablated.items():
            where = as_expr(row_heads)[:, None, None] == column_heads
            if mode == "zero":
                value: Any = 0.0
            else:
                value = _layer_mean(layer, reference_mask, _REFERENCE).to(here)
            write = Compute(ops.where(where, value, here))
            found.append((layout.in_block(layer, "attn_out"), "insert_before", write))
        return found

    if mode not in ("zero", "mean"):
        raise ArgumentError(f"mode must be 'zero' or 'mean', got {mode!r}")
    return build


def knockout_heads(
    model: nn.Module,
    heads: Sequence[tuple[int, int]],
    *,
    mode: Mode = "zero",
    reference_ids: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    backend: Backend | None = None,
) -> nn.Module:
    """A new model with each ``(layer, head)`` in ``heads`` ablated at every position.

    ``mode="mean"`` needs ``reference_ids``, the batch each head's mean is taken over
    (``reference_mask`` marks its padding); with ``backend`` the means are taken on that
    host (one request, :func:`head_means`).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    width = d_head(model, layout)
    means = None
    if mode == "mean" and reference_ids is not None:
        means = head_means(
            model, reference_ids, layout, reference_mask=reference_mask, backend=backend
        )
    total = n_layers(model, layout)
    for layer, head in heads:
        layer = pick_layers([layer], total)[0]
        if not 0 <= head < (layout.n_heads or 0):
            raise OutOfRangeError(f"head {head} is out of range for {layout.n_heads} heads")
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
    backend: Backend | None = None,
    progress: bool | None = None,
) -> EffectGrid:
    """Ablate each head alone (all in one batch); ``metric(ablated) - metric(intact)``.

    ``mode="mean"`` ablates to each head's mean over ``reference_ids`` (default: the
    ``input_ids`` themselves, with ``attention_mask``). The grid is layer x head;
    ``clean_metric`` is the intact model's metric. On a padded batch (``attention_mask``)
    the metric reads each row's logits right-aligned, so ``-1`` is its last real token.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs each
    forward pass on that host, one request each — one for the sweep without ``max_rows``.
    With ``mode="mean"`` the reference batch runs first in the same request and each head's
    mean is taken there. A ``LogitDiff`` / ``AnswerProbability`` metric is computed on the
    host (one number a row comes back); any other metric reads the logits here.
    ``progress`` shows a bar over the forward passes (default: on a terminal; ``False``
    never).
    """
    check_answers(metric, vocab_size(model))  # before any forward pass
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    width = d_head(model, layout)
    rows_of = pick_layers(layers, n_layers(model, layout))
    heads = layout.n_heads or 0
    means = None
    before: list[Run] = []
    pass_edits = None
    if backend is not None:
        ref_mask = None
        if mode == "mean":
            if reference_ids is None:
                reference_ids, reference_mask = ids, mask
            ref_ids, ref_mask = inputs(reference_ids, reference_mask, "reference_ids")
            before.append(_reference_run(model, layout, ref_ids, ref_mask))
        pass_edits = _host_ablations(mode, layout, rows_of, heads, width, ref_mask)
    elif mode == "mean":
        if reference_ids is None:
            reference_ids, reference_mask = ids, mask
        means = head_means(model, reference_ids, layout, reference_mask=reference_mask)

    def edits(k: int, rows: range) -> Sequence[Edit]:
        layer, head = rows_of[k // heads], k % heads
        part = idx[rows.start : rows.stop, :, head * width : (head + 1) * width]
        ablation = _ablation(mode, means, layer, head, part)
        return [(layout.in_block(layer, "attn_out"), "insert_before", ablation)]

    (intact,), ablated = variants_with_mask(
        model,
        [ids],
        ids,
        len(rows_of) * heads,
        edits,
        metric,
        mask,
        max_rows=max_rows,
        backend=backend,
        before=before,
        pass_edits=pass_edits,
        progress=progress,
        desc="head_knockout",
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
