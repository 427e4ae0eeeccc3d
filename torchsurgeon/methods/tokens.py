"""Token ids in, labels out: the small conversions every method's inputs and results need.

Methods accept prompts as ``[pos]`` or ``[batch, pos]`` token ids (or a tokenizer's output,
a mapping with ``input_ids`` and ``attention_mask``) and label their results' axes with
tokens. A *decoder* turns a token id into text: a ``transformers`` tokenizer (anything with
``decode``), a callable ``int -> str``, a sequence of strings (a vocabulary), or ``None``
for the id itself.

**Padding.** A padded batch comes with an ``attention_mask`` (``[batch, pos]``, 1 = token,
0 = padding, on the left or on the right). Every method then reads each row at its *own*
positions: position ``p >= 0`` is the row's ``p``-th real token and ``-1`` its last real
token (:func:`token_index`), averages skip padding, and the model is called with the mask
and with position ids that count real tokens only (:func:`forward_kwargs`, what
``transformers``' ``generate`` passes), so a padded row gives what the same prompt gives
alone, unpadded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchsurgeon.surgery.errors import ArgumentError, OutOfRangeError

__all__ = [
    "Decoder",
    "aligned",
    "as_batch",
    "forward_kwargs",
    "inputs",
    "position_labels",
    "token_index",
    "token_label",
]

Decoder = Any
"""A tokenizer with ``decode``, a callable ``int -> str``, a sequence of strings, or None."""


def as_batch(input_ids: torch.Tensor | Sequence[int], name: str = "input_ids") -> torch.Tensor:
    """``input_ids`` as a ``[batch, pos]`` long tensor (a ``[pos]`` prompt becomes one row)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point():
        raise ArgumentError(
            f"{name} must be integer token ids of shape [pos] or [batch, pos], got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )
    return ids.long()


def inputs(
    input_ids: Any, attention_mask: torch.Tensor | None = None, name: str = "input_ids"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [batch, pos], mask [batch, pos] or None)``, checked.

    ``input_ids`` may be a tokenizer's output (a mapping with ``input_ids`` and, possibly,
    ``attention_mask``); an ``attention_mask`` given as well must not contradict it. A mask
    of all ones is kept (it costs nothing and says the batch is unpadded).
    """
    if isinstance(input_ids, Mapping):
        given = input_ids.get("attention_mask")
        if attention_mask is None:
            attention_mask = given
        elif given is not None and not torch.equal(torch.as_tensor(given), attention_mask):
            raise ArgumentError(f"{name} carries an attention_mask different from attention_mask=")
        if "input_ids" not in input_ids:
            raise ArgumentError(f"{name} is a mapping without 'input_ids'")
        input_ids = input_ids["input_ids"]
    ids = as_batch(input_ids, name)
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ArgumentError(
            f"the attention mask of {name} has shape {tuple(mask.shape)}; it must match "
            f"{name} {tuple(ids.shape)} (1 = token, 0 = padding)"
        )
    if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
        raise ArgumentError(f"the attention mask of {name} must hold 0 (padding) and 1 (token)")
    mask = mask.long().to(ids.device)
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ArgumentError(f"rows {empty} of {name} are all padding (their attention mask is 0)")
    return ids, mask


def forward_kwargs(mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The keyword arguments a forward pass on a padded batch takes (none when unpadded).

    The mask, and position ids counting each row's real tokens (``0`` on padding), so left
    padding shifts no position — what ``transformers``' ``generate`` passes, and what an
    explicit model computes by itself.
    """
    if mask is None:
        return {}
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"attention_mask": mask, "position_ids": positions}


def token_index(mask: torch.Tensor | None, position: int, length: int, rows: int) -> torch.Tensor:
    """``[rows]``: the column of each row's ``position``-th real token (``-1``: the last).

    Without a mask every row has ``length`` real tokens and the column is the same in each.
    Raises ``IndexError`` when a row has too few real tokens.
    """
    if mask is None:
        if not -length <= position < length:
            raise OutOfRangeError(
                f"position {position} is out of range for prompts of length {length}"
            )
        return torch.full((rows,), position % length, dtype=torch.long)
    counts = mask.sum(-1)
    wanted = torch.where(torch.as_tensor(position) < 0, counts + position, position)
    short = ((wanted < 0) | (wanted >= counts)).nonzero().flatten().tolist()
    if short:
        raise OutOfRangeError(
            f"position {position} is out of range for rows {short}, which have "
            f"{counts[short].tolist()} real tokens"
        )
    # Real tokens' columns first, in order (a stable sort of "is padding"): the wanted-th.
    order = torch.argsort((mask == 0).long(), dim=-1, stable=True)
    return order.gather(-1, wanted[:, None].long())[:, 0]


def aligned(x: torch.Tensor, mask: torch.Tensor | None, *, end: bool) -> torch.Tensor:
    """``x [batch, pos, ...]`` with each row rolled so its real tokens start (or ``end``) at
    the edge: column ``p`` is then every row's ``p``-th real token (``end``: ``-1`` is every
    row's last). The rolled-in columns hold the row's padding. No mask: ``x`` itself."""
    if mask is None:
        return x
    length = mask.shape[1]
    counts = mask.sum(-1).to(x.device)
    first = token_index(mask, 0, length, mask.shape[0]).to(x.device)
    start = first + counts - length if end else first  # the column that lands at 0
    columns = (torch.arange(length, device=x.device)[None] + start[:, None]) % length
    return x.gather(1, columns.reshape(*columns.shape, *(1,) * (x.dim() - 2)).expand(x.shape))


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
