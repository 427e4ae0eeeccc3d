"""Metrics: what a patching experiment measures on the model's logits.

A metric is any callable ``logits -> tensor`` that takes the logits of one group of rows
(``[n, pos, vocab]`` — the clean prompts, or the corrupted prompts with one site patched)
and returns one number per row (``[n]``) or one number. The methods average it over the
rows. The two most used are here as small frozen dataclasses (so they print clearly and
compare equal): :class:`LogitDiff` — the logit of the right answer minus that of the wrong
one, at the last position — and :class:`AnswerProbability`, what causal tracing measures.
Answers may be one token for every row or one per row (a batch of prompt pairs).

On a padded batch a method hands the metric each row's logits *right-aligned*
(:func:`on_real_tokens`): position ``-1`` is the row's last real token, ``-2`` the one before,
whichever side the batch was padded on — so the same metric reads the same tokens padded
or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from torchsurgeon.methods.tokens import aligned

__all__ = [
    "AnswerProbability",
    "LogitDiff",
    "Metric",
    "RealTokens",
    "mean_metric",
    "on_real_tokens",
]

Metric = Callable[[torch.Tensor], torch.Tensor]
Answers = int | Sequence[int] | torch.Tensor


def _gather(logits: torch.Tensor, position: int, answers: Answers) -> torch.Tensor:
    """``logits[row, position, answers[row]]`` for every row (``answers`` broadcast)."""
    last = logits[:, position, :]
    index = torch.as_tensor(answers, device=logits.device).reshape(-1)
    if index.numel() == 1:
        index = index.expand(last.shape[0])
    if index.numel() != last.shape[0]:
        raise ValueError(
            f"{index.numel()} answer tokens for {last.shape[0]} rows; give one answer, or one "
            "per prompt"
        )
    return last.gather(-1, index[:, None].long())[:, 0]


@dataclass(frozen=True)
class LogitDiff:
    """``logit[correct] - logit[wrong]`` at ``position`` (default: the last), per row."""

    correct: Answers
    wrong: Answers
    position: int = -1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        right = _gather(logits, self.position, self.correct)
        return right - _gather(logits, self.position, self.wrong)


@dataclass(frozen=True)
class AnswerProbability:
    """The probability of ``answer`` at ``position`` (default: the last), per row."""

    answer: Answers
    position: int = -1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[:, self.position, :].float(), dim=-1)[:, None, :]
        return _gather(probs, 0, self.answer)


def mean_metric(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric of a group of rows as one number (the mean over rows)."""
    value = metric(logits)
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=logits.dtype)
    return value.float().mean()


@dataclass(frozen=True, eq=False)
class RealTokens:
    """``metric`` read on a padded group of rows (``mask [n, pos]``): each row's logits
    rolled so that its real tokens end at position ``-1``. Made by :func:`on_real_tokens`;
    a dataclass, not a closure, so a method running on a host can see what it reads and
    compute it there (:mod:`torchsurgeon.methods.remote`)."""

    metric: Metric
    mask: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != self.mask.shape[0]:
            raise ValueError(
                f"a metric on a padded batch reads groups of {self.mask.shape[0]} rows (one "
                f"per prompt), got {logits.shape[0]}"
            )
        return self.metric(aligned(logits, self.mask, end=True))


def on_real_tokens(metric: Metric, mask: torch.Tensor | None) -> Metric:
    """``metric`` on a padded group of rows (``mask [n, pos]``): it sees each row's logits
    rolled so that the row's real tokens end at position ``-1``. ``metric`` itself when
    there is no mask."""
    if mask is None:
        return metric
    return RealTokens(metric, mask)
