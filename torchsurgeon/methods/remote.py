"""Methods on a host: ``backend=`` runs a method's passes where the weights are.

Every method takes ``backend=`` — a ``ts.remote.Client`` (or anything that runs a
:class:`~torchsurgeon.layers.session.Session` of plans the way ``ts.run(session,
backend=...)`` does; ``steer`` also needs its ``generate``). A forward-only method builds the
same rewrites as it does locally, turns them into plans, and sends them with
``ts.run(session, backend=backend)``: a sweep that is one batch (``max_rows=None``) is one
request, whatever the method — the forward passes a method needs besides the sweep (the
unforced run of neuron forcing, the two sides of a steering vector, the reference batch of
mean ablation) go in the same request as runs of one session. The model may be a
structure-only model from ``client.meta(name)``: nothing reads its weights. (A local model
works too: its plans name its base by fingerprint, so they must run on a host serving the
same checkpoint.)

What travels back is what the method needs, computed on the host by the plan's
``returning`` expressions (:mod:`torchsurgeon.layers.expr`):

- a metric that is a :class:`~torchsurgeon.methods.metrics.LogitDiff` or an
  :class:`~torchsurgeon.methods.metrics.AnswerProbability` (read on real tokens or not) is
  computed per batch row on the host: one number a row travels, not the logits. Any other
  metric is a Python callable, which cannot travel: the logits of the sweep's batch come
  back and the metric runs here;
- activations come back reduced to what the result holds (a steering vector's two means,
  a probe's features at the read positions, the logit lens's log-probabilities);
- the noise level of causal tracing and the mean of a head are computed on the host from
  the host's weights and activations.

Each value is computed by the same operations, on the same tensors, as locally, so a
method gives the same result on a host as on a local copy of the same checkpoint.

The methods that need gradients, generation or training run those on the host too, each in
one request:

- ``attribution_patching`` sends the batch's plan with ``Save`` and ``SaveGrad`` layers and
  ``backward=`` the corrupted rows' metric (:func:`row_values`); the scores are computed
  there, and the grid and one metric value a row come back. A Python metric takes a second
  request: the logits come back, its gradient at them is taken here and fed in by a
  ``ComputeGrad`` after the unembedding;
- ``steer`` sends one ``generate`` call of one model whose ``Add`` layers act at the
  generation steps ``positions`` picks (``steps=``); the sequences come back;
- ``train_lora`` sends a session: the adapted model's token losses before training, the
  training loop (``ts.training``: the adapters' tensors, ``ts.optim.AdamW`` with no weight
  decay, which is ``torch.optim.Adam``, one batch per step) and the token losses of the
  trained model (``ts.trained``); the trained tensors and the losses come back;
- ``train_probe(..., fit_on_host=True)`` sends a session that trains the probes as
  ``Compute`` layers holding their weights (``ts.training``) and returns them with their
  standardisation and predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.expr import Expr, out
from torchsurgeon.layers.results import Backend, Result, run
from torchsurgeon.layers.session import Session
from torchsurgeon.methods.metrics import (
    AnswerProbability,
    LogitDiff,
    Metric,
    RealTokens,
    mean_metric,
)
from torchsurgeon.methods.tokens import aligned

__all__ = [
    "Run",
    "clean_top_probability",
    "host_sweep_pass",
    "logits_entry",
    "row_values",
    "run_plan",
    "run_plans",
]

Run = tuple[str, Any, tuple[Any, ...], Mapping[str, Any]]
"""``(name, plan, args, kwargs)``: one run of a session sent to a host."""

_ROWS = "metric_rows"


def logits_entry(model: nn.Module) -> str:
    """The entry of ``model``'s output that holds the logits: ``"logits"`` for a
    ``transformers`` model (a ``ModelOutput``), ``"output"`` for an explicit one."""
    from transformers import PreTrainedModel

    return "logits" if isinstance(model, PreTrainedModel) else "output"


def plan_of(model: nn.Module) -> Any:
    from torchsurgeon.plans.record import plan

    return plan(model)


def run_plans(backend: Backend, runs: Sequence[Run]) -> dict[str, Result]:
    """The runs as one session, in one request: one :class:`Result` per run, by name."""
    built = Session()
    for name, plan, args, kwargs in runs:
        built = built.then(name, plan, *args, **dict(kwargs))
    results = run(built, backend=backend)
    return dict(results)  # type: ignore[call-overload]


def run_plan(backend: Backend, plan: Any, *args: Any, **kwargs: Any) -> Result:
    """One plan run on the host, in one request."""
    return run_plans(backend, [("run", plan, args, kwargs)])["run"]


# --------------------------------------------------------------------------- metrics


def _answers(answers: Any, groups: Sequence[range]) -> torch.Tensor | None:
    """One answer token per batch row (a group's answers broadcast as the metric would);
    ``None`` when they do not fit a group (the metric itself then raises, locally)."""
    index = torch.as_tensor(answers).reshape(-1).long().cpu()
    parts = []
    for rows in groups:
        if index.numel() == 1:
            parts.append(index.expand(len(rows)))
        elif index.numel() == len(rows):
            parts.append(index)
        else:
            return None
    return torch.cat(parts)


def row_values(metric: Metric, groups: Sequence[range], logits: Expr) -> Expr | None:
    """The metric of every batch row as an expression over ``logits`` (``[batch]``), or
    ``None`` for a metric that is not one of the known ones (a Python callable).

    ``groups`` are the batch's groups of rows in order, covering the batch. The expression
    makes the metric's own operations: ``LogitDiff`` gathers the two answers' logits at its
    position and subtracts, ``AnswerProbability`` takes the softmax there in float32 and
    gathers; read on real tokens (:class:`RealTokens`) each row is read at the column its
    right-aligned position falls on.
    """
    mask = None
    if isinstance(metric, RealTokens):
        metric, mask = metric.metric, metric.mask
    if type(metric) not in (LogitDiff, AnswerProbability) or not groups:
        return None
    batch = groups[-1].stop
    position = metric.position
    if mask is None:
        at = logits[:, position, :]
    else:
        n, length = mask.shape
        if any(len(rows) != n for rows in groups) or not -length <= position < length:
            return None
        columns = torch.arange(length).expand(n, length)
        source = aligned(columns, mask.cpu(), end=True)[:, position]
        at = logits[torch.arange(batch), source.repeat(len(groups))]
    if isinstance(metric, LogitDiff):
        right, wrong = _answers(metric.correct, groups), _answers(metric.wrong, groups)
        if right is None or wrong is None:
            return None
        return at.gather(-1, right[:, None])[:, 0] - at.gather(-1, wrong[:, None])[:, 0]
    answer = _answers(metric.answer, groups)
    if answer is None:
        return None
    return at.float().softmax(-1).gather(-1, answer[:, None])[:, 0]


def clean_top_probability(batch: int, logits: Expr) -> Expr:
    """Per row: the probability, at the last position, of row 0's top token there — causal
    tracing's default metric (``AnswerProbability`` of the clean run's top token)."""
    top = logits[0:1, -1, :].argmax(-1, keepdim=True).expand([batch, 1])
    return logits[:, -1, :].float().softmax(-1).gather(-1, top)[:, 0]


def host_sweep_pass(
    backend: Backend,
    model: nn.Module,
    ids: torch.Tensor,
    kwargs: Mapping[str, Any],
    metric: Metric,
    groups: Sequence[range],
    *,
    rows: Expr | None = None,
    before: Sequence[Run] = (),
) -> list[torch.Tensor]:
    """One pass of a batched sweep on the host: the metric of each group of rows.

    ``rows`` is the metric of each batch row as an expression (default:
    :func:`row_values`); when there is none, the logits come back and ``metric`` reads them
    here. ``before`` are runs the pass reads (``ts.saved(key, run=name)``), sent with it.
    """
    entry = logits_entry(model)
    if rows is None:
        rows = row_values(metric, groups, out(entry))
    plan = plan_of(model)
    plan = plan.returning(entry) if rows is None else plan.returning(**{_ROWS: rows})
    result = run_plans(backend, [*before, ("sweep", plan, (ids,), dict(kwargs))])["sweep"]
    if rows is None:
        from torchsurgeon.methods.batching import logits_of

        logits = logits_of(result.output)
        return [mean_metric(metric, logits[group]) for group in groups]
    values = result.saved[_ROWS]
    return [values[group.start : group.stop].float().mean() for group in groups]
