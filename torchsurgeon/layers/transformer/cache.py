"""The KV cache: keys and values of the tokens seen so far, held by the caller.

Generation feeds a model one new token at a time; attention needs the keys and values of
every earlier token, so they are kept between calls. Here the cache is an explicit object
passed to the model's forward (``model(ids, cache=cache)``), never a module attribute or
buffer: one base model is shared by many rewritten views at once (every rewrite shares
every module it did not touch), so a module must not hold anything that belongs to one
call. Each generation owns its own ``KVCache``.

A forward call with a cache appends to it: the model records the call's padding mask, and
each attention layer appends its keys and values (after rotary embedding) and attends over
everything cached. Layouts follow the explicit layers: ``keys[layer]`` and
``values[layer]`` are ``[batch, pos, kv_head, d_head]``; ``mask`` is ``[batch, pos]``,
``True`` for a real token and ``False`` for padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torchsurgeon.surgery.errors import OutOfRangeError

__all__ = ["KVCache"]


@dataclass
class KVCache:
    """Per-layer keys and values plus the padding mask of every cached token."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        """A cache for a model with ``n_layers`` attention layers, holding no tokens yet."""
        return cls(keys=[None] * n_layers, values=[None] * n_layers)

    @property
    def length(self) -> int:
        """How many token positions the cache holds (padding included)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def extend_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Append the padding mask of this call's tokens; return the mask of all tokens."""
        self.mask = new_mask if self.mask is None else torch.cat((self.mask, new_mask), dim=1)
        return self.mask

    def extend(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``layer``'s new keys and values; return all of that layer's cached ones."""
        if not 0 <= layer < len(self.keys):
            raise OutOfRangeError(
                f"layer: the KVCache holds {len(self.keys)} layers, got layer {layer}; make the "
                "cache with KVCache.empty(model.config.n_layers)"
            )
        old_keys, old_values = self.keys[layer], self.values[layer]
        if old_keys is not None and old_values is not None:
            keys = torch.cat((old_keys, keys), dim=1)
            values = torch.cat((old_values, values), dim=1)
        self.keys[layer] = keys
        self.values[layer] = values
        return keys, values
