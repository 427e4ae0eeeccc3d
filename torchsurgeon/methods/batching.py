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

A chunk's layers go in with one rewrite (:func:`insert_all`), and the ``Patch`` layers that
land on one module become one ``Patch`` table (:meth:`~torchsurgeon.layers.Patch.combine`):
a sweep of 16 positions puts one layer on each block, which copies the activation once per
call, instead of 16 layers copying it 16 times.

A group is ``n`` rows: ``n`` prompts (or prompt pairs) measured together; the metric is
averaged over them. The *fixed* groups (clean and corrupted, or just the unablated base)
lead every chunk's batch. ``prepare`` lets a method add layers once the row layout is known
(causal tracing's noise, which every corrupted group must share).

With ``backend=`` (a ``ts.remote.Client``) each forward pass is one request to a host and
only the metric of each row comes back where the metric is a known one (see
:mod:`torchsurgeon.methods.remote`): ``max_rows=None`` is one request for the whole sweep.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.layers.expr import Expr, out
from torchsurgeon.layers.patch import Patch
from torchsurgeon.layers.results import Backend
from torchsurgeon.methods.metrics import Metric, check_answers, mean_metric, vocab_size
from torchsurgeon.methods.remote import Run, host_sweep_pass, logits_entry
from torchsurgeon.selectors.expression import SelectorStep
from torchsurgeon.selectors.selection import select
from torchsurgeon.surgery.errors import ArgumentTypeError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.lineage import Lineage, RewriteStep, lineage_of, with_lineage
from torchsurgeon.surgery.paths import get_at, resolve_segment, split
from torchsurgeon.surgery.progress import progress as show_progress
from torchsurgeon.surgery.rewrite import rewrite
from torchsurgeon.surgery.sites import add_layers

__all__ = [
    "Edit",
    "PassEdits",
    "RowLayout",
    "Side",
    "insert_all",
    "logits_of",
    "rewrite_at",
    "run_variants",
]

Side = Literal["insert_before", "insert_after"]
Edit = tuple[str, Side, nn.Module]
"""``(path, side, layer)``: insert ``layer`` before or after the module at ``path``."""


@dataclass(frozen=True)
class RowLayout:
    """Where each group sits in one forward pass's batch."""

    fixed: tuple[range, ...]
    variants: tuple[range, ...]

    @property
    def batch(self) -> int:
        """The rows of the pass."""
        return max((rows.stop for rows in (*self.fixed, *self.variants)), default=0)


PassEdits = Callable[[Sequence[tuple[int, range]], RowLayout], Sequence[Edit]]
"""``pass_edits(placed, layout)``: the layers of one pass, ``placed`` its ``(k, rows)``."""


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a ``ModelOutput``, a tuple, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ArgumentTypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def rewrite_at(model: nn.Module, path: str, side: Side, layer: nn.Module) -> nn.Module:
    """``select(model).at(path).insert_before(layer)`` (or ``insert_after``)."""
    selection = select(model).at(path)
    if side == "insert_before":
        return selection.insert_before(layer)
    return selection.insert_after(layer)


def insert_all(model: nn.Module, edits: Iterable[Edit]) -> nn.Module:
    """Every edit applied as :func:`rewrite_at` would one after the other, in one rewrite.

    The layers for one site keep their order; a run of ``Patch`` layers at one site becomes
    one ``Patch`` where that computes the same (:meth:`Patch.combine`). The new model's
    lineage holds one ``at(path)`` step per layer inserted, as the one-by-one rewrites would
    record. Edits a one-pass rewrite cannot stand for — a wildcard path, or a recording
    layer (whose keys the selection checks) — are made one by one instead.
    """
    model = wrap(model)
    edits = list(edits)
    if not edits:
        return model
    exact: dict[str, str | None] = {}
    for path, side, layer in edits:
        if not isinstance(layer, nn.Module):
            raise ArgumentTypeError(f"{side} expects an nn.Module, got {type(layer).__name__}")
        if path not in exact:
            exact[path] = _exact_path(model, path)
    if None in exact.values() or any(getattr(type(e[2]), "ts_records", False) for e in edits):
        for path, side, layer in edits:
            model = rewrite_at(model, path, side, layer)
        return model
    # Grouped by the node itself (``h.-1`` and ``h.11`` are one site), in insertion order.
    sites: dict[tuple[str, Side], list[tuple[str, nn.Module]]] = {}
    for path, side, layer in edits:
        sites.setdefault((exact[path], side), []).append((path, layer))  # type: ignore[arg-type]
    placed: dict[str, tuple[list[nn.Module], list[nn.Module]]] = {}
    steps: list[RewriteStep] = []
    for (path, side), spelled in sites.items():
        target = placed.setdefault(path, ([], []))[side == "insert_after"]
        for layer in _combined_patches([layer for _, layer in spelled]):
            steps.append(RewriteStep((SelectorStep("at", spelled[0][0]),), side, layer))
            target.append(_for_site(layer, path))

    def edit(before: list[nn.Module], after: list[nn.Module]) -> Callable[..., nn.Module]:
        def apply(node: nn.Module, _: str) -> nn.Module:
            add_layers(node, before, after)
            return node

        return apply

    new = rewrite(model, {path: edit(*layers) for path, layers in placed.items()})
    old = lineage_of(model)
    return with_lineage(new, Lineage(old.base, (*old.steps, *steps)))


def _exact_path(model: nn.Module, path: str) -> str | None:
    """``path`` with every segment the child's own name (``-1`` resolved); None for a glob."""
    if set(path) & set("*?["):
        return None
    node, names = model, []
    for segment in split(path):
        name = resolve_segment(node, segment)
        if name is None:
            get_at(model, path)  # raises a PathError naming the nearest valid paths
        node = node._modules[name]
        names.append(name)
    return ".".join(names)


def _for_site(layer: nn.Module, path: str) -> nn.Module:
    """The copy of ``layer`` at ``path``, as a one-path selection places it (``n`` = 0)."""
    for_site = getattr(layer, "for_site", None)
    return wrap(for_site(path, 0)) if callable(for_site) else wrap(layer)


def _combined_patches(layers: list[nn.Module]) -> list[nn.Module]:
    """``layers`` with each run of consecutive ``Patch`` layers combined where it can be."""
    out: list[nn.Module] = []
    for is_patch, run in itertools.groupby(layers, key=lambda layer: type(layer) is Patch):
        run_list = list(run)
        out.extend(Patch.combine(run_list) if is_patch else run_list)
    return out


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
    backend: Backend | None = None,
    host_rows: Callable[[RowLayout, Expr], Expr | None] | None = None,
    before: Sequence[Run] = (),
    pass_edits: PassEdits | None = None,
    progress: bool | None = None,
    desc: str | None = None,
) -> tuple[list[float], torch.Tensor]:
    """``(metric of each fixed group, metric of each variant [n_variants])``.

    Every variant group holds ``variant_ids``; ``edits(k, rows)`` gives the layers that make
    group ``k`` (at batch rows ``rows``) the ``k``-th variant. ``max_rows`` bounds the rows
    of one forward pass (at least one variant goes in each). ``pass_edits(placed, layout)``,
    given, replaces ``edits``: the layers of a whole pass at once, from its ``(k, rows)``
    pairs (one layer per site for all of them, where per-variant layers would be many).

    With ``backend`` each forward pass is one request to that host (see
    :mod:`torchsurgeon.methods.remote`): the metric of each row is computed there when it
    is a known metric (or ``host_rows(layout, logits)`` gives it as an expression), else
    the logits come back. ``before`` are runs of the same session each pass reads.
    ``progress`` shows a bar over the forward passes, labelled ``desc`` (see
    :func:`~torchsurgeon.surgery.progress.progress`).
    """
    check_answers(metric, vocab_size(model))  # a bad answer id before any pass is paid for
    n = variant_ids.shape[0]
    lead = sum(ids.shape[0] for ids in fixed)
    per_pass = n_variants if max_rows is None else max(1, (max_rows - lead) // n)
    per_pass = max(per_pass, 1)
    bounds = [0]
    for ids in fixed:
        bounds.append(bounds[-1] + ids.shape[0])
    fixed_values: list[float] = []
    values: list[torch.Tensor] = []
    starts = range(0, max(n_variants, 1), per_pass)
    for start in show_progress(starts, desc=desc, enabled=progress, unit="pass"):
        count = min(per_pass, n_variants - start)
        layout = RowLayout(
            tuple(range(a, b) for a, b in itertools.pairwise(bounds)),
            tuple(range(lead + j * n, lead + (j + 1) * n) for j in range(count)),
        )
        rewritten = model if prepare is None else prepare(model, layout)
        placed = [(start + j, rows) for j, rows in enumerate(layout.variants)]
        if pass_edits is not None:
            rewritten = insert_all(rewritten, pass_edits(placed, layout))
        else:
            rewritten = insert_all(
                rewritten, (edit for k, rows in placed for edit in edits(k, rows))
            )
        ids = torch.cat([*fixed, variant_ids.repeat(count, 1)])
        groups = (*layout.fixed, *layout.variants)
        if backend is None:
            with torch.no_grad():
                logits = logits_of(rewritten(ids, **(forward_kwargs or {})))
            found = [mean_metric(metric, logits[rows]) for rows in groups]
        else:
            per_row = None
            if host_rows is not None:
                per_row = host_rows(layout, out(logits_entry(rewritten)))
            found = host_sweep_pass(
                backend,
                rewritten,
                ids,
                forward_kwargs or {},
                metric,
                groups,
                rows=per_row,
                before=before,
            )
        if start == 0:
            fixed_values = [float(value) for value in found[: len(layout.fixed)]]
        values.extend(found[len(layout.fixed) :])
    return fixed_values, torch.stack(values) if values else torch.zeros(0)
