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

With ``backend=client`` the sweep runs on a host, one request for one batch, the noise
level and the default answer computed there too (see :mod:`torchsurgeon.methods.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.compute import Compute, Stop
from torchsurgeon.layers.edit import Noise, Zero
from torchsurgeon.layers.expr import Expr, call, here, saved
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.patch import Patch
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend
from torchsurgeon.methods.batching import Edit, RowLayout, logits_of, rewrite_at, run_variants
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers
from torchsurgeon.methods.metrics import AnswerProbability, Metric, check_answers, vocab_size
from torchsurgeon.methods.patching import pick_layers, pick_positions
from torchsurgeon.methods.remote import clean_top_probability, plan_of, run_plan
from torchsurgeon.methods.tokens import Decoder, inputs, position_labels
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["causal_tracing", "embedding_noise_std"]

_STATES = {"resid": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}


def embedding_noise_std(
    model: nn.Module, layout: ModelLayout | None = None, *, backend: Backend | None = None
) -> float:
    """ROME's default noise level: three times the standard deviation of the embeddings.

    With ``backend`` the standard deviation is computed on that host, from its weights
    (one request; ``model`` may be ``client.meta(name)``).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    if backend is None:
        embed = get_at(model, layout.embed)
        return 3.0 * float(embed.weight.detach().float().std())
    stopped = rewrite_at(model, layout.embed, "insert_after", Stop())  # no block need run
    plan = plan_of(stopped).returning(embedding_std=_embedding_std(model, layout))
    result = run_plan(backend, plan, torch.zeros(1, 1, dtype=torch.long))
    return 3.0 * float(result.saved["embedding_std"])


def _embedding_std(model: nn.Module, layout: ModelLayout) -> Expr:
    """The standard deviation of the embedding table, as an expression computed where the
    plan runs: the embedding of every token id is the table itself, row by row."""
    rows = get_at(model, layout.embed).weight.shape[0]  # a shape: fine on a meta model
    return call(layout.embed, torch.arange(rows)).float().std()


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
    backend: Backend | None = None,
    progress: bool | None = None,
) -> EffectGrid:
    """Noise the ``subject`` positions' embeddings, restore one state at a time; a grid.

    ``input_ids`` is one prompt (``[pos]`` or ``[1, pos]``). The metric defaults to the
    probability of ``answer`` at the last position (``answer`` defaults to the clean run's
    top token). ``std`` defaults to :func:`embedding_noise_std`; each of the ``samples``
    corrupted rows draws its own noise (seeded by ``seed``). Values are
    ``metric(restored) - metric(corrupted)``, layer x position. With ``attention_mask`` the
    prompt's padding is dropped and positions count its real tokens. ``progress`` shows a
    bar over the forward passes (default: on a terminal; ``False`` never).

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs each
    forward pass on that host — one request for the sweep without ``max_rows`` — and
    computes there the default ``std`` (from the host's embeddings, in the same request),
    the default ``answer`` (the clean row's top token, in the same batch) and the metric
    when it is an ``AnswerProbability`` or a ``LogitDiff``: one number a row comes back.
    Any other metric reads the logits here.
    """
    check_answers(metric, vocab_size(model))  # before any forward pass
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    if ids.shape[0] != 1:
        raise ArgumentError(f"causal_tracing takes one prompt, got a batch of {ids.shape[0]}")
    if mask is not None:
        ids = ids[:, mask[0].bool()]
    length = ids.shape[1]
    subject = pick_positions(list(subject), length)
    if not subject:
        raise ArgumentError("causal_tracing needs at least one subject position to corrupt")
    if samples < 1:
        raise ArgumentError(f"samples must be >= 1, got {samples}")
    host_rows = None
    if metric is None:
        if answer is not None:
            metric = AnswerProbability(answer)
        elif backend is None:
            with torch.no_grad():
                answer = int(logits_of(model(ids))[0, -1].argmax())
            metric = AnswerProbability(answer)
        else:  # the clean row (row 0 of the sweep) picks the answer, on the host

            def host_rows(rows: RowLayout, logits: Expr) -> Expr:
                return clean_top_probability(rows.batch, logits)

            metric = _unread
    noise_std = None
    if backend is None or std is not None:
        noise_std = embedding_noise_std(model, layout) if std is None else float(std)
    rows_of = pick_layers(layers, n_layers(model, layout))
    cols = pick_positions(positions, length)
    if over == "resid":
        site_of = layout.block
    elif over in ("mlp", "attn"):

        def site_of(layer: int) -> str:
            return layout.in_block(layer, over)

    else:
        raise ArgumentError(f"over must be 'resid', 'mlp' or 'attn', got {over!r}")

    def prepare(model: nn.Module, rows: RowLayout) -> nn.Module:
        baseline = rows.fixed[1]
        part = idx[baseline.start : baseline.stop, subject]
        if noise_std is None:  # on a host, from the host's embeddings
            noised = _host_noise(model, layout, rows, part, subject, length, seed)
        else:
            noise = Noise(noise_std, seed, index=part)
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
        backend=backend,
        host_rows=host_rows,
        progress=progress,
        desc="causal_tracing",
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


def _unread(logits: torch.Tensor) -> torch.Tensor:
    """The metric slot of a sweep whose metric is computed on the host (never called)."""
    raise AssertionError("causal tracing's default metric is computed on the host")


_CLEAN = "causal_tracing_clean_embedding"


def _host_noise(
    model: nn.Module,
    layout: ModelLayout,
    rows: RowLayout,
    part: Index,
    subject: list[int],
    length: int,
    seed: int,
) -> nn.Module:
    """The baseline rows' subject embeddings noised by ``3 * std(embeddings) * noise``, the
    standard deviation computed where the plan runs (the host's weights).

    ``Noise(std, seed)`` adds ``std * draw`` — the draw fixed by the seed and the shape. A
    ``Noise(1.0, seed)`` on zeros holds the draw itself, so ``Save`` (the clean embeddings),
    ``Zero`` and ``Noise(1.0)`` at the same part, then ``Compute`` writing ``clean + s *
    draw`` there make the very same values, ``s`` rounded to the tensor's dtype as a
    Python float multiplier is.
    """
    where = torch.zeros(rows.batch, length, 1, dtype=torch.bool)
    baseline = rows.fixed[1]
    where[baseline.start : baseline.stop, subject] = True
    scale = 3.0 * _embedding_std(model, layout)
    noised = rewrite_at(model, layout.embed, "insert_after", Save(_CLEAN))
    noised = rewrite_at(noised, layout.embed, "insert_after", Zero(part))
    noised = rewrite_at(noised, layout.embed, "insert_after", Noise(1.0, seed, index=part))
    write = Compute(ops.where(where, saved(_CLEAN) + scale * here, here))
    return rewrite_at(noised, layout.embed, "insert_after", write)
