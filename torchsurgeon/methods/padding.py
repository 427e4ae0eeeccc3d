"""Batched sweeps over padded prompts: every group of rows carries the prompts' mask.

:func:`~torchsurgeon.methods.batching.run_variants` lays a sweep out as groups of rows of
one batch — the fixed groups, then one group per variant — each group holding the same
``n`` prompts. On a padded batch every one of those groups needs the prompts' attention
mask (and position ids that skip padding), and the metric must read each row's own last
real token. :func:`variants_with_mask` does both: it cuts the sweep into the passes
``max_rows`` allows, gives each pass the mask repeated once per group, and hands the metric
each group's logits right-aligned (:func:`~torchsurgeon.methods.metrics.on_real_tokens`).
Without a mask it is ``run_variants`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchsurgeon.layers.results import Backend
from torchsurgeon.methods.batching import Edit, PassEdits, RowLayout, run_variants
from torchsurgeon.methods.metrics import Metric, on_real_tokens
from torchsurgeon.methods.remote import Run
from torchsurgeon.methods.tokens import forward_kwargs
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.progress import progress as show_progress

__all__ = ["variants_with_mask"]


def variants_with_mask(
    model: nn.Module,
    fixed: Sequence[torch.Tensor],
    variant_ids: torch.Tensor,
    n_variants: int,
    edits: Callable[[int, range], Sequence[Edit]],
    metric: Metric,
    mask: torch.Tensor | None,
    *,
    max_rows: int | None = None,
    prepare: Callable[[nn.Module, RowLayout], nn.Module] | None = None,
    backend: Backend | None = None,
    before: Sequence[Run] = (),
    pass_edits: PassEdits | None = None,
    progress: bool | None = None,
    desc: str | None = None,
) -> tuple[list[float], torch.Tensor]:
    """``run_variants`` on prompts padded as ``mask [n, pos]`` marks (every group ``n`` rows).

    ``backend``, ``before`` and ``pass_edits`` go to :func:`run_variants` (with a backend,
    one request per forward pass); ``progress`` shows a bar over the passes, labelled
    ``desc``.
    """
    if mask is None:
        return run_variants(
            model,
            fixed,
            variant_ids,
            n_variants,
            edits,
            metric,
            max_rows=max_rows,
            prepare=prepare,
            backend=backend,
            before=before,
            pass_edits=pass_edits,
            progress=progress,
            desc=desc,
        )
    n = variant_ids.shape[0]
    if any(ids.shape[0] != n for ids in fixed) or mask.shape[0] != n:
        raise ArgumentError("a padded sweep needs every group to hold the same prompts as the mask")
    lead = n * len(fixed)
    per_pass = n_variants if max_rows is None else (max_rows - lead) // n
    per_pass = max(per_pass, 1)
    read = on_real_tokens(metric, mask)
    fixed_values: list[float] = []
    values: list[torch.Tensor] = []
    starts = range(0, max(n_variants, 1), per_pass)
    for start in show_progress(starts, desc=desc, enabled=progress, unit="pass"):
        count = min(per_pass, n_variants - start)
        rows_mask = mask.repeat(len(fixed) + count, 1)

        def shifted(k: int, rows: range, start: int = start) -> Sequence[Edit]:
            return edits(start + k, rows)

        def shifted_pass(
            placed: Sequence[tuple[int, range]], layout: RowLayout, start: int = start
        ) -> Sequence[Edit]:
            return pass_edits([(start + k, rows) for k, rows in placed], layout)  # type: ignore[misc]

        found, part = run_variants(
            model,
            fixed,
            variant_ids,
            count,
            shifted,
            read,
            prepare=prepare,
            forward_kwargs=forward_kwargs(rows_mask),
            backend=backend,
            before=before,
            pass_edits=None if pass_edits is None else shifted_pass,
            progress=False,
        )
        if start == 0:
            fixed_values = found
        values.append(part)
    return fixed_values, torch.cat(values)
