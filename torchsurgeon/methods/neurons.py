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
rose the most — and the forced model itself, which is a plan like any other rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers.edit import SetValues
from torchsurgeon.layers.index import Index
from torchsurgeon.methods.batching import logits_of, rewrite_at
from torchsurgeon.methods.layout import ModelLayout, in_features, layout_of, n_layers
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.tokens import Decoder, as_batch, token_label
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["NeuronForcing", "force_neurons"]


@dataclass(frozen=True)
class NeuronForcing:
    """The forced model, its logits and the unforced model's on the same input.

    ``shift`` is the change of log-probability at ``position`` (``[batch, vocab]``);
    ``top_ids`` / ``top_labels`` are, per row, the ``k`` tokens it raised the most.
    """

    model: nn.Module
    logits: torch.Tensor
    base_logits: torch.Tensor
    position: int
    shift: torch.Tensor
    top_ids: torch.Tensor
    top_labels: tuple[tuple[str, ...], ...]


def force_neurons(
    model: nn.Module,
    input_ids: torch.Tensor,
    neurons: Mapping[int, Sequence[int]],
    value: float | torch.Tensor = 5.0,
    *,
    rows: int | slice | None = None,
    position: int | None = -1,
    top_k: int = 10,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
) -> NeuronForcing:
    """Set ``neurons[layer]`` of each layer's MLP to ``value``; run forced and unforced.

    ``rows`` picks batch rows (an int or a slice; all when None) and ``position`` one
    position (all when None); the shift and top tokens are read at ``position`` (the last
    one when ``position`` is None).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids = as_batch(input_ids)
    if not neurons:
        raise ValueError("neurons is empty: give {layer: [neuron, ...]}")
    total = n_layers(model, layout)
    row_entry = slice(None) if rows is None else rows
    if not isinstance(row_entry, (int, slice)):
        raise TypeError(f"rows must be an int, a slice or None, got {rows!r}")
    pos_entry = slice(None) if position is None else position
    forced = model
    for layer, chosen in neurons.items():
        layer = pick_layers([layer], total)[0]
        site = layout.in_block(layer, "mlp_down")
        width = in_features(get_at(model, site))
        chosen = [int(n) for n in chosen]
        bad = [n for n in chosen if not 0 <= n < width]
        if bad or not chosen:
            raise IndexError(
                f"neurons {bad or chosen} of layer {layer}: its MLP has {width} neurons "
                f"(valid 0..{width - 1})"
            )
        index = Index((row_entry, pos_entry, chosen))
        forced = rewrite_at(forced, site, "insert_before", SetValues(index, value))
    with torch.no_grad():
        logits = logits_of(forced(ids))
        base = logits_of(model(ids))
    read = -1 if position is None else position
    shift = logits[:, read].float().log_softmax(-1) - base[:, read].float().log_softmax(-1)
    top = shift.topk(min(top_k, shift.shape[-1]), dim=-1).indices
    labels = tuple(tuple(token_label(decoder, t) for t in row) for row in top.tolist())
    return NeuronForcing(forced, logits, base, read, shift, top, labels)
