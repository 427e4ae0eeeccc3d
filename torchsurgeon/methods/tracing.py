"""Causal tracing: where does the model recall what it knows about a subject?

Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT")
corrupts a prompt by adding Gaussian noise to the *subject* tokens' embeddings, which makes
the model lose the answer, then restores one hidden state at a time from the clean run: the
sites whose restoration brings the answer's probability back are where the fact flows.

As a rewrite: one batch holds the clean prompt (one row), the corrupted baseline (``samples``
rows, each with its own noise draw from a ``Noise`` layer on the embedding output) and one
group of ``samples`` rows per restored site. A ``Patch`` after the embedding copies the
baseline's noisy embeddings into every group, so all groups see the very same noise, and one
``Patch`` per site copies the clean row's hidden state at that layer and position into that
site's group — one forward pass (or a few, with ``max_rows``) for the whole sweep.

Restorable states (``over``): ``"resid"``, the output of each block (ROME's hidden states);
``"mlp"`` and ``"attn"``, the output of each block's MLP or attention module.

A prompt padded to some batch's length comes with its ``attention_mask``: its padding is
dropped first (one prompt needs none), so positions, the subject and the grid's columns
count its real tokens, and the result is that of the unpadded prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from torchsurgeon.layers.edit import Noise
from torchsurgeon.layers.index import idx
from torchsurgeon.layers.patch import Patch
from torchsurgeon.methods.batching import Edit, RowLayout, logits_of, rewrite_at, run_variants
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers
from torchsurgeon.methods.metrics import AnswerProbability, Metric
from torchsurgeon.methods.patching import pick_layers, pick_positions
from torchsurgeon.methods.tokens import Decoder, inputs, position_labels
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["causal_tracing", "embedding_noise_std"]

_STATES = {"resid": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}


def embedding_noise_std(model: nn.Module, layout: ModelLayout | None = None) -> float:
    """ROME's default noise level: three times the standard deviation of the embeddings."""
    model = wrap(model)
    embed = get_at(model, layout_of(model, layout).embed)
    return 3.0 * float(embed.weight.detach().float().std())


def causal_tracing(
    model: nn.Module,
    input_ids: torch.Tensor,
    subject: Sequence[int],
    *,
    answer: int | None = None,
    metric: Metric | None = None,
    over: Literal["resid", "mlp", "attn"] = "resid",
    std: float | None = None,
    samples: int = 4,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_rows: int | None = None,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
) -> EffectGrid:
    """Noise the ``subject`` positions' embeddings, restore one state at a time; a grid.

    ``input_ids`` is one prompt (``[pos]`` or ``[1, pos]``). The metric defaults to the
    probability of ``answer`` at the last position (``answer`` defaults to the clean run's
    top token). ``std`` defaults to :func:`embedding_noise_std`; each of the ``samples``
    corrupted rows draws its own noise (seeded by ``seed``). Values are
    ``metric(restored) - metric(corrupted)``, layer x position. With ``attention_mask`` the
    prompt's padding is dropped and positions count its real tokens.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    if ids.shape[0] != 1:
        raise ValueError(f"causal_tracing takes one prompt, got a batch of {ids.shape[0]}")
    if mask is not None:
        ids = ids[:, mask[0].bool()]
    length = ids.shape[1]
    subject = pick_positions(list(subject), length)
    if not subject:
        raise ValueError("causal_tracing needs at least one subject position to corrupt")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if metric is None:
        if answer is None:
            with torch.no_grad():
                answer = int(logits_of(model(ids))[0, -1].argmax())
        metric = AnswerProbability(answer)
    noise_std = embedding_noise_std(model, layout) if std is None else float(std)
    rows_of = pick_layers(layers, n_layers(model, layout))
    cols = pick_positions(positions, length)
    if over == "resid":
        site_of = layout.block
    elif over in ("mlp", "attn"):

        def site_of(layer: int) -> str:
            return layout.in_block(layer, over)

    else:
        raise ValueError(f"over must be 'resid', 'mlp' or 'attn', got {over!r}")

    def prepare(model: nn.Module, rows: RowLayout) -> nn.Module:
        baseline = rows.fixed[1]
        noise = Noise(noise_std, seed, index=idx[baseline.start : baseline.stop, subject])
        noised = rewrite_at(model, layout.embed, "insert_after", noise)
        if not rows.variants:
            return noised
        copy = Patch(
            list(baseline) * len(rows.variants), [r for group in rows.variants for r in group]
        )
        return rewrite_at(noised, layout.embed, "insert_after", copy)

    def edits(k: int, rows: range) -> Sequence[Edit]:
        layer, position = rows_of[k // len(cols)], cols[k % len(cols)]
        return [(site_of(layer), "insert_after", Patch(0, list(rows), index=idx[position]))]

    (clean_value, corrupted_value), restored = run_variants(
        model,
        [ids, ids.repeat(samples, 1)],
        ids.repeat(samples, 1),
        len(rows_of) * len(cols),
        edits,
        metric,
        max_rows=max_rows,
        prepare=prepare,
    )
    labels = position_labels(ids[0], decoder)
    subject_set = set(subject)
    return EffectGrid(
        values=(restored - corrupted_value).reshape(len(rows_of), len(cols)),
        row_labels=tuple(f"L{layer}" for layer in rows_of),
        col_labels=tuple(labels[p] + ("*" if p in subject_set else "") for p in cols),
        row_name="layer",
        col_name="position",
        title=f"causal tracing ({_STATES[over]})",
        measure="metric(restored) - metric(corrupted)",
        clean_metric=clean_value,
        corrupted_metric=corrupted_value,
    )
