"""Attribution patching: activation patching's whole sweep from one forward and one backward.

Activation patching runs the model once per site. Attribution patching (Nanda, 2023)
estimates every site's effect at once with a first-order Taylor expansion around the
corrupted run: patching site ``s`` changes its activation by ``clean_s - corrupted_s``, so
the metric moves by about ``(clean_s - corrupted_s) . d metric / d corrupted_s``. One batch
holds the clean and corrupted prompts; ``Save`` and ``SaveGrad`` layers at every site record
the activations and, after one backward pass from the corrupted rows' metric, the gradients.
The estimate is exact for a site the metric depends on linearly and good where the patch is
small; where it is not, compare with :func:`~torchsurgeon.methods.activation_patching`
(``plots.scatter`` draws one against the other).

The gradient flows into a zero vector added after the token embedding (an ``Add`` layer whose
vector requires grad), and ``backward`` accumulates into that vector only: the model's own
parameters get no ``.grad``, and it works on a model whose parameters do not require grad.

On a host (``backend=``) the same batch runs there with ``Save`` and ``SaveGrad`` layers and
``backward=`` the corrupted rows' metric (the host takes the gradient toward the sites
only, so no zero vector is needed), and the scores are computed there by the same
operations: one request, and only the grid and the metric values travel back.

Padded pairs share one ``attention_mask`` (a clean prompt and its corrupted copy have the
same tokens but one, so the same padding). The metric then reads each row's own last real
token (:func:`~torchsurgeon.methods.metrics.on_real_tokens`), and the residual-stream grid's
column ``p`` is every pair's ``p``-th real token, whichever side they were padded on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from torchsurgeon.layers import ops
from torchsurgeon.layers.compute import ComputeGrad
from torchsurgeon.layers.edit import Add
from torchsurgeon.layers.expr import Expr, as_expr, out, saved
from torchsurgeon.layers.record import Save, SaveGrad
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import Side, logits_of, rewrite_at
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.layout import ModelLayout, d_head, layout_of, n_layers
from torchsurgeon.methods.metrics import (
    Metric,
    check_answers,
    mean_metric,
    on_real_tokens,
    vocab_size,
)
from torchsurgeon.methods.patching import MEASURE, pair, pick_layers, pick_positions
from torchsurgeon.methods.remote import logits_entry, plan_of, row_values, run_plan
from torchsurgeon.methods.tokens import (
    Decoder,
    aligned,
    forward_kwargs,
    inputs,
    position_labels,
    token_index,
)
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import get_at

__all__ = ["attribution_patching"]


def _width(model: nn.Module, layout: ModelLayout) -> int:
    embed = get_at(model, layout.embed)
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArgumentTypeError(f"the token embedding at {layout.embed!r} has no 2-d weight")
    return int(weight.shape[1])


def attribution_patching(
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    *,
    over: Literal["resid", "heads"] = "resid",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
    backend: Backend | None = None,
) -> EffectGrid:
    """Estimate :func:`activation_patching`'s grid with gradient x activation difference.

    Same arguments and same grid shape as ``activation_patching`` (``over="resid"``: layer
    x position; ``over="heads"``: layer x head, summed over positions and the head's
    features); the values estimate ``metric(patched) - metric(corrupted)``. With
    ``attention_mask`` (the one mask of both, padded pairs) positions count real tokens.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs the
    forward and the backward pass on that host, in one request, and computes the scores
    there: the grid's values and one metric value a row come back, not the activations or
    the gradients. A metric that is a Python callable (not a ``LogitDiff`` or an
    ``AnswerProbability``) takes two requests: the logits come back, its gradient is taken
    here and fed into the host's backward pass.
    """
    check_answers(metric, vocab_size(model))  # before any forward pass
    model = wrap(model)
    layout = layout_of(model, layout)
    clean, mask = inputs(clean, attention_mask, "clean")
    corrupted, _ = inputs(corrupted, mask, "corrupted")
    clean, corrupted = pair(clean, corrupted)
    read = on_real_tokens(metric, mask)
    rows_of = pick_layers(layers, n_layers(model, layout))
    side: Side
    if over == "resid":
        paths = [layout.block(layer) for layer in rows_of]
        side = "insert_after"
    elif over == "heads":
        if positions is not None:
            raise ArgumentError("over='heads' sums over every position; leave positions=None")
        paths = [layout.in_block(layer, "attn_out") for layer in rows_of]
        side = "insert_before"
    else:
        raise ArgumentError(f"over must be 'resid' or 'heads', got {over!r}")

    if backend is not None:
        values, clean_value, corrupted_value = _on_host(
            backend, model, clean, corrupted, mask, read, paths, side, over, layout
        )
    else:
        values, clean_value, corrupted_value = _locally(
            model, clean, corrupted, mask, read, paths, side, over, layout
        )
    if over == "resid":
        longest = 0 if mask is None else int(mask.sum(-1).argmax())
        tokens = clean[longest] if mask is None else clean[longest][mask[longest].bool()]
        cols = pick_positions(positions, tokens.shape[0])
        values = values[:, cols]
        labels = position_labels(tokens, decoder)
        col_labels, col_name = tuple(labels[p] for p in cols), "position"
    else:
        d_head(model, layout)  # checks that the heads split the projection's input
        col_labels, col_name = tuple(f"H{h}" for h in range(values.shape[1])), "head"
    return EffectGrid(
        values=values,
        row_labels=tuple(f"L{layer}" for layer in rows_of),
        col_labels=col_labels,
        row_name="layer",
        col_name=col_name,
        title=f"attribution patching ({'residual stream' if over == 'resid' else 'heads'})",
        measure=f"estimate of {MEASURE}",
        clean_metric=clean_value,
        corrupted_metric=corrupted_value,
    )


def _locally(
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    mask: torch.Tensor | None,
    read: Metric,
    paths: Sequence[str],
    side: Side,
    over: str,
    layout: ModelLayout,
) -> tuple[torch.Tensor, float, float]:
    """The scores ``[layer, column]`` and the clean and corrupted metrics, computed here."""
    n = clean.shape[0]
    entry = torch.zeros(_width(model, layout), requires_grad=True)
    probe = rewrite_at(model, layout.embed, "insert_after", Add(entry))
    for i, path in enumerate(paths):
        probe = rewrite_at(probe, path, side, Save(f"act{i}"))
        probe = rewrite_at(probe, path, side, SaveGrad(f"grad{i}"))

    both = None if mask is None else torch.cat([mask, mask])
    with torch.enable_grad():
        result = run(probe, torch.cat([clean, corrupted]), **forward_kwargs(both))
        logits = logits_of(result.output)
        value = mean_metric(read, logits[n:])
        torch.autograd.backward(value, inputs=[entry])
    clean_value = float(mean_metric(read, logits[:n].detach()))
    saved = result.records

    columns: list[torch.Tensor] = []
    for i in range(len(paths)):
        act, grad = saved[f"act{i}"][0].detach(), saved[f"grad{i}"][0]
        product = (act[:n] - act[n:]) * grad[n:]  # [n, pos, features]
        if mask is not None:  # padding carries nothing; column p: each pair's p-th token
            real = mask.to(product.device, product.dtype)[..., None]
            product = aligned(product * real, mask, end=False)
        product = product.sum(0)  # [pos, features], summed over prompt pairs
        if over == "resid":
            columns.append(product.sum(-1))
        else:
            heads = layout.n_heads or 0
            columns.append(product.reshape(product.shape[0], heads, -1).sum((0, 2)))
    values = torch.stack(columns)
    return values, clean_value, float(value.detach())


def _on_host(
    backend: Backend,
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    mask: torch.Tensor | None,
    read: Metric,
    paths: Sequence[str],
    side: Side,
    over: str,
    layout: ModelLayout,
) -> tuple[torch.Tensor, float, float]:
    """:func:`_locally` on the host, in one request: the batch's forward pass, the backward
    pass from the corrupted rows' metric (``backward=``), and the scores computed there by
    the same operations; the scores and one metric value a row come back.

    A metric that is a Python callable cannot travel. Its gradient with respect to the
    logits is then taken here, on the logits a first request brings back, and a
    ``ComputeGrad`` after the unembedding feeds it into the host's backward pass: every
    site gets the metric's gradient, as locally (two requests).
    """
    n = clean.shape[0]
    both = None if mask is None else torch.cat([mask, mask])
    batch, kwargs = torch.cat([clean, corrupted]), forward_kwargs(both)
    entry = logits_entry(model)
    rows = row_values(read, [range(n), range(n, 2 * n)], out(entry))
    probe = model
    if rows is None:  # a Python metric: its gradient at the logits, taken here
        config = getattr(model, "config", None)
        if getattr(config, "final_logit_softcapping", None):
            raise ArgumentError(
                "attribution_patching(backend=...) with a Python metric feeds the metric's "
                "gradient in at the unembedding's output, and this model caps its logits "
                "after it (final_logit_softcapping); use LogitDiff or AnswerProbability, "
                "which the host differentiates itself, or run it locally"
            )
        found = run_plan(backend, plan_of(model).returning(entry), batch, **kwargs)
        logits = logits_of(found.output).detach().requires_grad_(True)
        with torch.enable_grad():
            value = mean_metric(read, logits[n:])
            (gradient,) = torch.autograd.grad(value, [logits])
        clean_value = float(mean_metric(read, logits[:n].detach()))
        corrupted_value = float(value.detach())
        probe = rewrite_at(probe, layout.unembed, "insert_after", ComputeGrad(as_expr(gradient)))
        backward = out(entry).sum()  # d/d logits = 1, which the ComputeGrad replaces
    else:
        backward = rows[n:].float().mean()
    for i, path in enumerate(paths):
        probe = rewrite_at(probe, path, side, Save(f"act{i}"))
        probe = rewrite_at(probe, path, side, SaveGrad(f"grad{i}"))
    columns = []
    for i in range(len(paths)):
        act, grad = saved(f"act{i}"), saved(f"grad{i}")
        product = (act[:n] - act[n:]) * grad[n:]  # [n, pos, features]
        if mask is not None:
            product = _aligned_real(product, mask)
        product = product.sum(0)  # [pos, features], summed over prompt pairs
        if over == "resid":
            columns.append(product.sum(-1))
        else:
            heads = layout.n_heads or 0
            columns.append(product.reshape([clean.shape[1], heads, -1]).sum([0, 2]))
    plan = plan_of(probe).with_backward(backward)
    computed: dict[str, Expr] = {"scores": ops.stack(columns)}
    if rows is not None:
        computed["metric_rows"] = rows
    result = run_plan(backend, plan.returning(**computed), batch, **kwargs)
    if rows is not None:
        values = result.saved["metric_rows"]
        clean_value = float(values[:n].float().mean())
        corrupted_value = float(values[n:].float().mean())
    return result.saved["scores"], clean_value, corrupted_value


def _aligned_real(product: Expr, mask: torch.Tensor) -> Expr:
    """``aligned(product * real, mask, end=False)`` as an expression: each pair's ``p``-th
    real token in column ``p``, zeros at padding.

    The padding is zeroed by indexing, not by multiplying with the mask: the columns that
    would hold padding read an appended column of zeros (``product * 0``), which is what
    multiplying by a zero of the mask gives, and the real ones are read unchanged.
    """
    n, length = mask.shape
    first = token_index(mask, 0, length, n)
    columns = (torch.arange(length)[None] + first[:, None]) % length
    rows = torch.arange(n)[:, None].expand(n, length)
    columns = torch.where(mask.cpu().bool()[rows, columns], columns, length)
    padded = ops.cat([product, product[:, :1] * 0], dim=1)
    return padded[rows, columns]
