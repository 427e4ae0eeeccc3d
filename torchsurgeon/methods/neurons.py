"""Neuron forcing: set chosen MLP neurons to a value and see what the model says instead.

The seed experiment of this project: force neurons 7171, 2519 and 1786 of layer 12 and
neurons 9469 and 7737 of layer 13 of a Llama to 5.0 at the last position of rows 3 onward.
An MLP neuron's activation is the input of the down-projection (``mlp.down_proj`` in Llama,
``mlp.c_proj`` in GPT-2), so forcing it is one ``SetValues`` inserted before that module::

    ts.select(model).at("model.layers.12.mlp.down_proj").insert_before(
        ts.layers.SetValues(ts.idx[3:, -1, [7171, 2519, 1786]], 5.0)
    )

:func:`force_neurons` builds that rewrite for any number of layers, runs the forced and the
unforced model on the same batch, and returns both, with the tokens whose log-probability
rose the most in each forced row — and the forced model itself, which is a plan like any
other rewrite. On a padded batch (``attention_mask=``) "the last position" is each row's own
last real token: rows of one length share one ``SetValues``, so left padding (every row ends
at the last column) is still one layer per MLP. With ``backend=client`` both passes run on
a host, in one request (see :mod:`torchsurgeon.methods.remote`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers.edit import SetValues
from torchsurgeon.layers.index import Index
from torchsurgeon.layers.results import Backend
from torchsurgeon.methods.batching import logits_of, rewrite_at
from torchsurgeon.methods.layout import ModelLayout, in_features, layout_of, n_layers
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.remote import logits_entry, plan_of, run_plans
from torchsurgeon.methods.tokens import (
    Decoder,
    forward_kwargs,
    inputs,
    token_index,
    token_label,
)
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, OutOfRangeError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["NeuronForcing", "force_neurons"]


@dataclass(frozen=True)
class NeuronForcing:
    """The forced model, its logits and the unforced model's on the same input.

    ``position`` is the position asked for (``-1`` when forcing every position);
    ``positions`` is, per row, the column the shift is read at (each row's own last real
    token on a padded batch); ``shift`` the change of log-probability there
    (``[batch, vocab]``). ``forced_rows`` are the rows that were forced: for each of them
    ``top_ids`` / ``top_labels`` are the ``k`` tokens forcing raised the most. A row that
    was not forced has no such tokens — its shift is zero everywhere — so its ``top_ids``
    row is ``-1`` and its ``top_labels`` entry is empty, ``()``.
    """

    model: nn.Module
    logits: torch.Tensor
    base_logits: torch.Tensor
    position: int
    positions: torch.Tensor
    shift: torch.Tensor
    top_ids: torch.Tensor
    top_labels: tuple[tuple[str, ...], ...]
    forced_rows: tuple[int, ...]


def _rows(rows: int | slice | None, batch: int) -> list[int]:
    if rows is None:
        return list(range(batch))
    if isinstance(rows, bool) or not isinstance(rows, (int, slice)):
        raise ArgumentTypeError(f"rows must be an int, a slice or None, got {rows!r}")
    if isinstance(rows, int):
        if not -batch <= rows < batch:
            raise OutOfRangeError(f"row {rows} is out of range for a batch of {batch}")
        return [rows % batch]
    picked = list(range(batch))[rows]
    if not picked:
        raise OutOfRangeError(f"rows {rows} select no row of a batch of {batch}")
    return picked


def _runs(rows: list[int]) -> list[slice]:
    """Sorted ``rows`` as the fewest contiguous slices."""
    runs: list[slice] = []
    for row in sorted(rows):
        if runs and runs[-1].stop == row:
            runs[-1] = slice(runs[-1].start, row + 1)
        else:
            runs.append(slice(row, row + 1))
    return runs


def _indices(
    rows: int | slice | None,
    picked: list[int],
    position: int | None,
    columns: torch.Tensor,
    mask: torch.Tensor | None,
    neurons: list[int],
) -> list[Index]:
    """Where to force: ``ts.idx[rows, position, neurons]``, per row's own column if padded."""
    if position is None:
        return [Index((slice(None) if rows is None else rows, slice(None), neurons))]
    if mask is None:
        return [Index((slice(None) if rows is None else rows, position, neurons))]
    by_column: dict[int, list[int]] = {}
    for row in picked:
        by_column.setdefault(int(columns[row]), []).append(row)
    return [
        Index((run, column, neurons))
        for column, group in sorted(by_column.items())
        for run in _runs(group)
    ]


def force_neurons(
    model: nn.Module,
    input_ids: torch.Tensor,
    neurons: Mapping[int, Sequence[int]],
    value: float | torch.Tensor = 5.0,
    *,
    rows: int | slice | None = None,
    position: int | None = -1,
    top_k: int = 10,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
    backend: Backend | None = None,
) -> NeuronForcing:
    """Set ``neurons[layer]`` of each layer's MLP to ``value``; run forced and unforced.

    ``rows`` picks batch rows (an int or a slice; all when None) and ``position`` one
    position (all when None); the shift and top tokens are read at ``position`` (the last
    one when ``position`` is None). With ``attention_mask`` (a padded batch) ``position``
    counts each row's real tokens: ``-1`` is each row's own last token.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs the
    forced and the unforced pass on that host, as two runs of one request; both logits
    come back (they are the result).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    if not neurons:
        raise ArgumentError("neurons is empty: give {layer: [neuron, ...]}")
    total = n_layers(model, layout)
    picked = _rows(rows, ids.shape[0])
    read = -1 if position is None else position
    columns = token_index(mask, read, ids.shape[1], ids.shape[0])
    forced = model
    for layer, chosen in neurons.items():
        layer = pick_layers([layer], total)[0]
        site = layout.in_block(layer, "mlp_down")
        width = in_features(get_at(model, site))
        chosen = [int(n) for n in chosen]
        bad = [n for n in chosen if not 0 <= n < width]
        if bad or not chosen:
            raise OutOfRangeError(
                f"neurons {bad or chosen} of layer {layer}: its MLP has {width} neurons "
                f"(valid 0..{width - 1})"
            )
        for index in _indices(rows, picked, position, columns, mask, chosen):
            forced = rewrite_at(forced, site, "insert_before", SetValues(index, value))
    extra = forward_kwargs(mask)
    if backend is not None:
        entry = logits_entry(model)
        results = run_plans(
            backend,
            [
                ("forced", plan_of(forced).returning(entry), (ids,), extra),
                ("base", plan_of(model).returning(entry), (ids,), extra),
            ],
        )
        logits = logits_of(results["forced"].output)
        base = logits_of(results["base"].output)
    else:
        with torch.no_grad():
            logits = logits_of(forced(ids, **extra))
            base = logits_of(model(ids, **extra))
    everyone = torch.arange(ids.shape[0], device=logits.device)
    at = columns.to(logits.device)
    shift = logits[everyone, at].float().log_softmax(-1) - base[everyone, at].float().log_softmax(
        -1
    )
    k = min(top_k, shift.shape[-1])
    top = torch.full((ids.shape[0], k), -1, dtype=torch.long, device=shift.device)
    top[picked] = shift[picked].topk(k, dim=-1).indices
    labels = tuple(
        tuple(token_label(decoder, t) for t in top[row].tolist()) if row in picked else ()
        for row in range(ids.shape[0])
    )
    return NeuronForcing(forced, logits, base, read, columns, shift, top, labels, tuple(picked))
