"""Token ids in, labels out: the small conversions every method's result needs.

Methods accept prompts as ``[pos]`` or ``[batch, pos]`` token ids and label their results'
axes with tokens. A *decoder* turns a token id into text: a ``transformers`` tokenizer
(anything with ``decode``), a callable ``int -> str``, a sequence of strings (a vocabulary),
or ``None`` for the id itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Decoder", "as_batch", "position_labels", "token_label"]

Decoder = Any
"""A tokenizer with ``decode``, a callable ``int -> str``, a sequence of strings, or None."""


def as_batch(input_ids: torch.Tensor | Sequence[int], name: str = "input_ids") -> torch.Tensor:
    """``input_ids`` as a ``[batch, pos]`` long tensor (a ``[pos]`` prompt becomes one row)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point():
        raise ValueError(
            f"{name} must be integer token ids of shape [pos] or [batch, pos], got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )
    return ids.long()


def token_label(decoder: Decoder, token: int) -> str:
    """The text of ``token`` under ``decoder`` (its id when there is no decoder)."""
    if decoder is None:
        return str(token)
    decode: Callable[..., Any] | None = getattr(decoder, "decode", None)
    if decode is not None:
        return str(decode([token]))
    if callable(decoder):
        return str(decoder(token))
    return str(decoder[token])


def position_labels(ids: torch.Tensor, decoder: Decoder = None) -> tuple[str, ...]:
    """``"<pos> <token>"`` for each position of the 1-d ``ids``."""
    return tuple(f"{p} {token_label(decoder, int(t))}" for p, t in enumerate(ids.tolist()))
