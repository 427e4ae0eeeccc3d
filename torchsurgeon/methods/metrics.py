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

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchsurgeon.methods.tokens import aligned
from torchsurgeon.surgery.errors import ArgumentError, SurgeryError

__all__ = [
    "AnswerProbability",
    "AnswerTokenError",
    "LogitDiff",
    "Metric",
    "RealTokens",
    "check_answers",
    "mean_metric",
    "on_real_tokens",
    "vocab_size",
]

Metric = Callable[[torch.Tensor], torch.Tensor]
Answers = int | Sequence[int] | torch.Tensor


class AnswerTokenError(SurgeryError, ValueError):
    """An answer token id of a metric is not a token of the vocabulary."""


def _answer_ids(owner: str, name: str, answers: Any, vocab: int | None = None) -> torch.Tensor:
    """``answers`` as a flat integer tensor, refused unless ints with 0 <= id (< ``vocab``)."""
    where = f"{owner}({name}=...)"
    if isinstance(answers, torch.Tensor):
        ids = answers.detach()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise AnswerTokenError(f"{where}: token ids are integers, got a {ids.dtype} tensor")
    else:
        single = isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence)
        items = [answers] if single else list(answers)
        bad = next((a for a in items if isinstance(a, bool) or not _integer(a)), None)
        if bad is not None or not items:
            got = "nothing" if not items else f"{bad!r} ({type(bad).__name__})"
            raise AnswerTokenError(
                f"{where}: token ids are ints (one, or one per prompt), got {got}; "
                "tokenize the answer first, e.g. tokenizer.encode(' Paris')[0]"
            )
        ids = torch.tensor([operator.index(a) for a in items], dtype=torch.long)
    ids = ids.reshape(-1)
    if ids.numel() == 0:
        raise AnswerTokenError(f"{where}: no token ids given")
    if ids.is_meta:
        return ids  # a shape-only run: no values to check
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise AnswerTokenError(f"{where}: token id {low} is negative; ids are 0 <= id < vocab")
    if vocab is not None and high >= vocab:
        raise AnswerTokenError(
            f"{where}: token id {high} is outside the vocabulary of {vocab} tokens "
            f"(ids are 0 <= id < {vocab}); was it tokenized with this model's tokenizer?"
        )
    return ids


def _integer(value: Any) -> bool:
    """An int, a numpy integer or an integer 0-d tensor (what ``operator.index`` takes)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _gather(logits: torch.Tensor, position: int, answers: Answers, where: str) -> torch.Tensor:
    """``logits[row, position, answers[row]]`` for every row (``answers`` broadcast);
    ``where`` is ``"Owner.argument"`` for the message of an id outside the vocabulary."""
    last = logits[:, position, :]
    owner, name = where.split(".")
    index = _answer_ids(owner, name, answers, last.shape[-1]).to(logits.device)
    if index.numel() == 1:
        index = index.expand(last.shape[0])
    if index.numel() != last.shape[0]:
        raise ArgumentError(
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

    def __post_init__(self) -> None:
        _answer_ids("LogitDiff", "correct", self.correct)
        _answer_ids("LogitDiff", "wrong", self.wrong)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        right = _gather(logits, self.position, self.correct, "LogitDiff.correct")
        return right - _gather(logits, self.position, self.wrong, "LogitDiff.wrong")


@dataclass(frozen=True)
class AnswerProbability:
    """The probability of ``answer`` at ``position`` (default: the last), per row."""

    answer: Answers
    position: int = -1

    def __post_init__(self) -> None:
        _answer_ids("AnswerProbability", "answer", self.answer)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[:, self.position, :].float(), dim=-1)[:, None, :]
        return _gather(probs, 0, self.answer, "AnswerProbability.answer")


def vocab_size(model: Any) -> int | None:
    """The number of logits ``model`` gives per position (its output embedding's rows, else
    ``config.vocab_size``); ``None`` when it cannot tell."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_answers(metric: Metric, vocab: int | None) -> None:
    """Refuse a ``LogitDiff`` / ``AnswerProbability`` whose answer ids are not below
    ``vocab`` (:func:`vocab_size` of the model) — before any forward pass is paid for."""
    if isinstance(metric, RealTokens):
        metric = metric.metric
    if vocab is None:
        return
    if isinstance(metric, LogitDiff):
        _answer_ids("LogitDiff", "correct", metric.correct, vocab)
        _answer_ids("LogitDiff", "wrong", metric.wrong, vocab)
    elif isinstance(metric, AnswerProbability):
        _answer_ids("AnswerProbability", "answer", metric.answer, vocab)


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
            raise ArgumentError(
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
