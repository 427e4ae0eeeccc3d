"""Many intervened forward passes as one: the row layout behind the batched methods.

Activation patching asks, for each site ``s`` (a layer and a position, or a layer and a
head), what the metric is when the corrupted run sees the clean run's activation at ``s``.
Run one site at a time and that is one forward pass per site. Here every site becomes a
*group of rows* of one big batch instead::

    rows:  [ clean | corrupted | corrupted, patched at s0 | corrupted, patched at s1 | ... ]

and the model is rewritten with one intervention layer per site that touches that site's
group only — a :class:`~torchsurgeon.layers.Patch` whose target rows are the group (copying
the clean rows' activation there), or a ``Zero`` / ``MeanAblate`` whose index starts with the
group's rows. Rows never interact in a transformer (no padding here, so attention stays
inside a row), so each group computes what its own forward pass would. With ``max_rows`` the
sites are split into chunks, one forward pass each.

A group is ``n`` rows: ``n`` prompts (or prompt pairs) measured together; the metric is
averaged over them. The *fixed* groups (clean and corrupted, or just the unablated base)
lead every chunk's batch. ``prepare`` lets a method add layers once the row layout is known
(causal tracing's noise, which every corrupted group must share).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.methods.metrics import Metric, mean_metric
from torchsurgeon.selectors.selection import select

__all__ = ["Edit", "RowLayout", "Side", "logits_of", "rewrite_at", "run_variants"]

Side = Literal["insert_before", "insert_after"]
Edit = tuple[str, Side, nn.Module]
"""``(path, side, layer)``: insert ``layer`` before or after the module at ``path``."""


@dataclass(frozen=True)
class RowLayout:
    """Where each group sits in one forward pass's batch."""

    fixed: tuple[range, ...]
    variants: tuple[range, ...]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a ``ModelOutput``, a tuple, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def rewrite_at(model: nn.Module, path: str, side: Side, layer: nn.Module) -> nn.Module:
    """``select(model).at(path).insert_before(layer)`` (or ``insert_after``)."""
    selection = select(model).at(path)
    if side == "insert_before":
        return selection.insert_before(layer)
    return selection.insert_after(layer)


def run_variants(
    model: nn.Module,
    fixed: Sequence[torch.Tensor],
    variant_ids: torch.Tensor,
    n_variants: int,
    edits: Callable[[int, range], Sequence[Edit]],
    metric: Metric,
    *,
    max_rows: int | None = None,
    prepare: Callable[[nn.Module, RowLayout], nn.Module] | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> tuple[list[float], torch.Tensor]:
    """``(metric of each fixed group, metric of each variant [n_variants])``.

    Every variant group holds ``variant_ids``; ``edits(k, rows)`` gives the layers that make
    group ``k`` (at batch rows ``rows``) the ``k``-th variant. ``max_rows`` bounds the rows
    of one forward pass (at least one variant goes in each).
    """
    n = variant_ids.shape[0]
    lead = sum(ids.shape[0] for ids in fixed)
    per_pass = n_variants if max_rows is None else max(1, (max_rows - lead) // n)
    per_pass = max(per_pass, 1)
    bounds = [0]
    for ids in fixed:
        bounds.append(bounds[-1] + ids.shape[0])
    fixed_values: list[float] = []
    values: list[torch.Tensor] = []
    for start in range(0, max(n_variants, 1), per_pass):
        count = min(per_pass, n_variants - start)
        layout = RowLayout(
            tuple(range(a, b) for a, b in itertools.pairwise(bounds)),
            tuple(range(lead + j * n, lead + (j + 1) * n) for j in range(count)),
        )
        rewritten = model if prepare is None else prepare(model, layout)
        for j, rows in enumerate(layout.variants):
            for path, side, layer in edits(start + j, rows):
                rewritten = rewrite_at(rewritten, path, side, layer)
        ids = torch.cat([*fixed, variant_ids.repeat(count, 1)])
        with torch.no_grad():
            logits = logits_of(rewritten(ids, **(forward_kwargs or {})))
        if start == 0:
            fixed_values = [float(mean_metric(metric, logits[rows])) for rows in layout.fixed]
        values.extend(mean_metric(metric, logits[rows]) for rows in layout.variants)
    return fixed_values, torch.stack(values) if values else torch.zeros(0)
