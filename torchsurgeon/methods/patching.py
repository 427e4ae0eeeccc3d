"""Activation patching: which activations carry the difference between two prompts?

Run a *clean* prompt (the model gets it right) and a *corrupted* one (a minimal change that
flips the answer). For each site — the residual stream after block ``l`` at position ``p``,
or head ``h`` of block ``l`` — run the corrupted prompt again with the clean activation
copied in at that site, and measure a metric (typically the logit difference between the
right and the wrong answer). A site whose patch moves the metric back toward the clean value
carries information the model uses.

Written as a rewrite, every patched run of the sweep goes into one batch (see
:mod:`torchsurgeon.methods.batching`): one ``Patch(source_rows=clean rows, target_rows=that
site's rows, index=position or head slice)`` per site — combined into one ``Patch`` table
per block — and one forward pass (or a few, with ``max_rows``) instead of one per site.
Heads are patched at the input of the attention output projection, head ``h`` being the
slice ``h * d_head : (h + 1) * d_head`` of its last dimension, at every position.

Over the residual stream, a site where the clean and the corrupted activations are equal
(bit for bit, in every pair) is not run: patching it writes the values already there, so
the patched run *is* the corrupted run and its effect is exactly 0. One forward pass of the
clean and corrupted prompts finds those sites — in a causal model, every position before
the first token where the prompts differ, at every layer.

    grid = activation_patching(model, clean, corrupted, LogitDiff(correct=7, wrong=9))
    plots.heatmap(grid)

``clean`` and ``corrupted`` are ``[pos]`` prompts or ``[n, pos]`` batches of pairs of equal
length (no padding); the metric is averaged over the pairs. The result's values are
``metric(patched) - metric(corrupted)``.

With ``backend=client`` the sweep runs on a host, one request for one batch (see
:mod:`torchsurgeon.methods.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.layers.index import idx
from torchsurgeon.layers.patch import Patch
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import Edit, insert_all, run_variants
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, d_head, layout_of, n_layers
from torchsurgeon.methods.metrics import Metric, check_answers, vocab_size
from torchsurgeon.methods.tokens import Decoder, as_batch, position_labels
from torchsurgeon.surgery.errors import ArgumentError, OutOfRangeError
from torchsurgeon.surgery.frozen import wrap

__all__ = ["activation_patching", "pick_layers", "pick_positions"]

MEASURE = "metric(patched) - metric(corrupted)"


def pick_layers(layers: Sequence[int] | None, total: int) -> list[int]:
    """``layers`` checked against ``total`` (all of them when None; negative from the end)."""
    if layers is None:
        return list(range(total))
    picked = []
    for layer in layers:
        if not -total <= layer < total:
            raise OutOfRangeError(f"layer {layer} is out of range for a model of {total} blocks")
        picked.append(layer % total)
    return picked


def pick_positions(positions: Sequence[int] | None, length: int) -> list[int]:
    """``positions`` checked against ``length`` (all of them when None; negative from the end)."""
    if positions is None:
        return list(range(length))
    picked = []
    for position in positions:
        if not -length <= position < length:
            raise OutOfRangeError(
                f"position {position} is out of range for prompts of length {length}"
            )
        picked.append(position % length)
    return picked


def pair(clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both prompts as ``[n, pos]`` batches, checked to pair up."""
    clean, corrupted = as_batch(clean, "clean"), as_batch(corrupted, "corrupted")
    if clean.shape != corrupted.shape:
        raise ArgumentError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} prompts must "
            "have the same shape: one corrupted prompt per clean prompt, of the same length"
        )
    return clean, corrupted


def activation_patching(
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    *,
    over: Literal["resid", "heads"] = "resid",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_rows: int | None = None,
    forward_kwargs: dict[str, Any] | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
    backend: Backend | None = None,
    progress: bool | None = None,
) -> EffectGrid:
    """Patch clean -> corrupted at every site, all in one batch; an :class:`EffectGrid`.

    ``over="resid"``: the residual stream after each block (layer x position; ``positions``
    restricts the columns). ``over="heads"``: each head's output at every position (layer x
    head). ``max_rows`` bounds the rows of one forward pass. ``forward_kwargs`` go to every
    forward call — ``{"logits_to_keep": 1}`` saves the unembedding of every position but the
    last when the metric reads only the last one. ``decoder`` labels positions.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs each
    forward pass on that host, one request each — one for the whole sweep without
    ``max_rows``. A ``LogitDiff`` / ``AnswerProbability`` metric is computed there (one
    number a row comes back), any other metric reads the logits here. Over the residual
    stream the host runs every site: finding the sites where clean and corrupted are equal
    would be a request of its own, and their effect is 0 all the same (their patched rows
    hold the corrupted rows' values), up to float rounding.

    ``progress`` shows a bar over the forward passes (default: on a terminal, unless
    ``TORCHSURGEON_PROGRESS=0``; ``False`` never).
    """
    check_answers(metric, vocab_size(model))  # before any forward pass
    model = wrap(model)
    layout = layout_of(model, layout)
    clean, corrupted = pair(clean, corrupted)
    n = clean.shape[0]
    rows_of = pick_layers(layers, n_layers(model, layout))
    sources = list(range(n))
    if over == "resid":
        cols = pick_positions(positions, clean.shape[1])
        col_labels = tuple(position_labels(clean[0], decoder)[p] for p in cols)
        col_name = "position"
        if backend is None:
            sites = _differing_sites(model, layout, clean, corrupted, rows_of, cols, forward_kwargs)
        else:  # one request: every site runs (an equal site's effect is 0 all the same)
            sites = list(range(len(rows_of) * len(cols)))

        def edits(k: int, rows: range) -> Sequence[Edit]:
            site = sites[k]
            layer, position = rows_of[site // len(cols)], cols[site % len(cols)]
            patch = Patch(sources, list(rows), index=idx[position])
            return [(layout.block(layer), "insert_after", patch)]

    elif over == "heads":
        if positions is not None:
            raise ArgumentError("over='heads' patches every position; leave positions=None")
        width = d_head(model, layout)
        cols = list(range(layout.n_heads or 0))
        col_labels = tuple(f"H{h}" for h in cols)
        col_name = "head"
        sites = list(range(len(rows_of) * len(cols)))

        def edits(k: int, rows: range) -> Sequence[Edit]:
            layer, head = rows_of[k // len(cols)], cols[k % len(cols)]
            part = idx[:, head * width : (head + 1) * width]
            patch = Patch(sources, list(rows), index=part)
            return [(layout.in_block(layer, "attn_out"), "insert_before", patch)]

    else:
        raise ArgumentError(f"over must be 'resid' or 'heads', got {over!r}")

    (clean_value, corrupted_value), patched = run_variants(
        model,
        [clean, corrupted],
        corrupted,
        len(sites),
        edits,
        metric,
        max_rows=max_rows,
        forward_kwargs=forward_kwargs,
        backend=backend,
        progress=progress,
        desc="activation_patching",
    )
    values = torch.full(
        (len(rows_of) * len(cols),), corrupted_value, dtype=patched.dtype, device=patched.device
    )
    if sites:
        values[sites] = patched
    return EffectGrid(
        values=(values - corrupted_value).reshape(len(rows_of), len(cols)),
        row_labels=tuple(f"L{layer}" for layer in rows_of),
        col_labels=col_labels,
        row_name="layer",
        col_name=col_name,
        title=f"activation patching ({'residual stream' if over == 'resid' else 'heads'})",
        measure=MEASURE,
        clean_metric=clean_value,
        corrupted_metric=corrupted_value,
    )


def _differing_sites(
    model: nn.Module,
    layout: ModelLayout,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    layers: Sequence[int],
    cols: Sequence[int],
    forward_kwargs: dict[str, Any] | None,
) -> list[int]:
    """The sites ``k`` (layer ``layers[k // len(cols)]``, position ``cols[k % len(cols)]``)
    where some pair's clean and corrupted residual streams differ: the ones worth running."""
    blocks = sorted(set(layers))
    probe = insert_all(
        model, [(layout.block(b), "insert_after", Save(f"resid{b}")) for b in blocks]
    )
    n = clean.shape[0]
    with torch.no_grad():
        saved = run(probe, torch.cat([clean, corrupted]), **(forward_kwargs or {})).saved
    moved: dict[int, list[bool]] = {}
    for b in blocks:
        resid = saved[f"resid{b}"]
        equal = (resid[:n] == resid[n:]).reshape(n, resid.shape[1], -1).all(-1).all(0)
        moved[b] = (~equal).tolist()
    return [
        k
        for k in range(len(layers) * len(cols))
        if moved[layers[k // len(cols)]][cols[k % len(cols)]]
    ]
