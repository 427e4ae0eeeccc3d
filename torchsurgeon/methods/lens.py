"""The logit lens: what would the model predict if it stopped after block ``l``?

The residual stream after each block is decoded as if it were the last one: through the
model's own final norm and unembedding (nostalgebraist, 2020). Early layers often already
rank the eventual answer high; the lens shows at which depth a prediction forms.

As a rewrite it is one ``Save`` after every block, one forward pass, and the final norm and
unembedding modules of the same model applied to what was saved (BERT: its MLM transform
first). The last layer's row is the model's own output distribution. A prompt padded to a
batch's length comes with its ``attention_mask``: the lens then covers its real tokens only,
and equals the lens of the unpadded prompt.

With ``backend=client`` the pass and the decoding run on a host, in one request (see
:mod:`torchsurgeon.methods.remote`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.expr import call, saved
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import rewrite_at
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers, require
from torchsurgeon.methods.patching import pick_layers
from torchsurgeon.methods.remote import plan_of, run_plan
from torchsurgeon.methods.tokens import (
    Decoder,
    forward_kwargs,
    inputs,
    position_labels,
    token_label,
)
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["LogitLens", "logit_lens"]


@dataclass(frozen=True)
class LogitLens:
    """The lens of one prompt.

    ``log_probs`` is ``[layer, pos, vocab]``; ``top_ids`` / ``top_log_probs`` are the
    ``k`` best tokens at each layer and position (``[layer, pos, k]``), and ``top_labels``
    their text (``top_labels[layer][pos][rank]``).
    """

    log_probs: torch.Tensor
    top_ids: torch.Tensor
    top_log_probs: torch.Tensor
    top_labels: tuple[tuple[tuple[str, ...], ...], ...]
    layer_labels: tuple[str, ...]
    position_labels: tuple[str, ...]

    def rank_of(self, token: int) -> torch.Tensor:
        """``[layer, pos]``: the rank of ``token`` (0 = top) in each decoded distribution."""
        own = self.log_probs[..., token : token + 1]
        return (self.log_probs > own).sum(-1)


def logit_lens(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    top_k: int = 5,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
    backend: Backend | None = None,
) -> LogitLens:
    """Decode the residual stream after each block (or ``layers``) of one prompt.

    With ``attention_mask`` (the prompt padded, on either side) the result covers the real
    tokens only: ``pos`` counts them, and padding is neither attended to nor decoded.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs the
    forward pass on that host and decodes there, through the host's final norm and
    unembedding: one request, and the log-probabilities (the result) come back.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    if ids.shape[0] != 1:
        raise ArgumentError(f"logit_lens reads one prompt, got a batch of {ids.shape[0]}")
    picked = pick_layers(layers, n_layers(model, layout))
    probe = model
    for layer in picked:
        probe = rewrite_at(probe, layout.block(layer), "insert_after", Save(f"resid{layer}"))
    paths = [
        path
        for path in (
            layout.head,
            require(model, layout, "final_norm", "logit_lens"),
            require(model, layout, "unembed", "logit_lens"),
        )
        if path is not None
    ]
    real = slice(None) if mask is None else mask[0].bool()
    if backend is not None:
        log_probs = _host_lens(backend, probe, ids, mask, picked, paths)
    else:
        with torch.no_grad():
            records = run(probe, ids, **forward_kwargs(mask)).records
            resid = torch.stack([records[f"resid{layer}"][0][0][real] for layer in picked])
            for path in paths:
                resid = get_at(model, path)(resid)
            log_probs = torch.log_softmax(resid.float(), dim=-1)
    top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
    labels = tuple(
        tuple(tuple(token_label(decoder, t) for t in row) for row in layer)
        for layer in top.indices.tolist()
    )
    return LogitLens(
        log_probs=log_probs,
        top_ids=top.indices,
        top_log_probs=top.values,
        top_labels=labels,
        layer_labels=tuple(f"L{layer}" for layer in picked),
        position_labels=position_labels(ids[0][real], decoder),
    )


def _host_lens(
    backend: Backend,
    probe: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    picked: Sequence[int],
    paths: Sequence[str],
) -> torch.Tensor:
    """The lens's log-probabilities computed on the host: the same stack of saved states,
    the same modules (the host's own, ``ts.call``), the same float32 log-softmax."""
    states = []
    for layer in picked:
        state = saved(f"resid{layer}")[0]
        if mask is not None:
            state = state[mask[0].bool().nonzero().flatten().tolist()]
        states.append(state)
    resid = ops.stack(states)
    for path in paths:
        resid = call(path, resid)
    plan = plan_of(probe).returning(log_probs=resid.float().log_softmax(-1))
    return run_plan(backend, plan, ids, **forward_kwargs(mask)).saved["log_probs"]
