"""The explicit transformer: every intermediate a researcher names is a module boundary.

:class:`Transformer` runs ``embed`` (plus ``pos_embed`` and ``type_embed`` where the family
has them, and BERT's ``embed_norm``), the ``blocks``, an optional ``head`` (BERT), the
``final_norm`` and the ``unembed``, and returns the logits as a plain tensor
``[batch, pos, vocab]`` (BERT: masked-language-model logits). The site names are the same
in every family; ``docs/models.md`` lists them with their TransformerLens equivalents.

A *base* model (``LlamaModel``, ``GPT2Model``, ``BertModel``: no language-model head) has
``unembed=None`` (and, for BERT, ``final_norm=None``) and returns its last hidden state
``[batch, pos, d_model]`` instead — or, when it has a ``pooler`` (``BertModel``), an
:class:`EncoderOutput` ``(last_hidden_state, pooler_output)``, the tuple ``transformers``
returns with ``return_dict=False``.

Call it as ``model(input_ids, attention_mask=None, cache=None, position_ids=None)``:

- ``attention_mask`` (``[batch, pos]``, 1 = real token, 0 = padding) may pad on the left
  or on the right. With a cache it may cover only this call's tokens or, as in
  ``transformers``, every cached token too.
- ``position_ids`` default to each token's count of real tokens before it, so padding
  never shifts positions (what ``transformers``' ``generate`` passes; a bare
  ``transformers`` forward would count padding).
- ``cache`` (a :class:`~torchsurgeon.layers.transformer.cache.KVCache`) receives this call's
  keys and values; the call attends over everything in it.

The model holds no per-call state: the masks, rotary angles and positions of a call are
computed in ``forward`` and handed down in a
:class:`~torchsurgeon.layers.transformer.context.ForwardContext`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from torchsurgeon.layers.transformer.cache import KVCache
from torchsurgeon.layers.transformer.config import TransformerConfig
from torchsurgeon.layers.transformer.context import ForwardContext, attention_masks
from torchsurgeon.layers.transformer.embedding import PositionEmbedding, TokenEmbedding
from torchsurgeon.layers.transformer.rotary import Rotary
from torchsurgeon.layers.transformer.unembed import HeadTransform, Pooler, Unembedding
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError

__all__ = ["EncoderOutput", "Transformer"]


class EncoderOutput(NamedTuple):
    """What a base model with a pooler returns: ``[batch, pos, d_model]`` and ``[batch, d]``."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class Transformer(nn.Module):
    """A decoder (or, for BERT, encoder) transformer built from explicit layers.

    Without ``unembed`` it is a base model and returns hidden states (see the module
    docstring).
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        embed: TokenEmbedding,
        blocks: nn.ModuleList,
        final_norm: nn.Module | None,
        unembed: Unembedding | None,
        pos_embed: PositionEmbedding | None = None,
        type_embed: TokenEmbedding | None = None,
        embed_norm: nn.Module | None = None,
        head: HeadTransform | None = None,
        pooler: Pooler | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) != config.n_layers:
            raise ArgumentError(
                f"blocks: config.n_layers is {config.n_layers} but got {len(blocks)} blocks"
            )
        self.config = config
        self.embed = embed
        self.pos_embed = pos_embed
        self.type_embed = type_embed
        self.embed_norm = embed_norm
        self.rotary = Rotary(config.rotary) if config.rotary is not None else None
        self.blocks = blocks
        self.head = head
        self.final_norm = final_norm
        self.unembed = unembed
        self.pooler = pooler

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model."""
        return KVCache.empty(self.config.n_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | EncoderOutput:
        """Logits ``[batch, pos, vocab]`` for ``input_ids`` ``[batch, pos]``.

        A base model returns its last hidden state ``[batch, pos, d_model]`` (with a pooler:
        an :class:`EncoderOutput`).
        """
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise ArgumentTypeError(
                f"input_ids: token ids are integers (torch.long), got a {input_ids.dtype} tensor "
                f"of shape {tuple(input_ids.shape)}; convert token ids with ids.long()"
            )
        if input_ids.dim() != 2:
            raise ArgumentError(
                f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}; a single "
                "sequence is ids[None]"
            )
        if cache is not None and not self.config.causal:
            raise ArgumentError(
                f"cache: {self.config.family} is not a causal model; it takes no KV cache "
                "(pass cache=None)"
            )
        x = self.embed(input_ids)
        context = self._context(input_ids, x.dtype, attention_mask, cache, position_ids)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(context.position_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x, context)
        if self.head is not None:
            x = self.head(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooler is not None:
            return EncoderOutput(x, self.pooler(x))
        return x if self.unembed is None else self.unembed(x)

    def _context(
        self,
        input_ids: torch.Tensor,
        dtype: torch.dtype,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        position_ids: torch.Tensor | None,
    ) -> ForwardContext:
        batch, n_new = input_ids.shape
        past = cache.length if cache is not None else 0
        key_mask = self._key_mask(input_ids, attention_mask, cache, past)
        if cache is not None:
            cache.extend_mask(key_mask[:, past:])
        if position_ids is None:
            counts = key_mask.long().cumsum(-1) - 1
            position_ids = counts.masked_fill(~key_mask, 0)[:, past:]
        elif position_ids.shape[-1] != n_new:
            raise ArgumentError(
                f"position_ids must have {n_new} positions (one per input token), got shape "
                f"{tuple(position_ids.shape)}"
            )
        position_ids = position_ids.expand(batch, n_new)
        masks = attention_masks(
            key_mask, n_new, causal=self.config.causal, windows=self.config.sliding_windows
        )
        rotary = self.rotary(position_ids, dtype) if self.rotary is not None else None
        positions = torch.arange(past, past + n_new, device=input_ids.device)
        return ForwardContext(positions, position_ids, masks, rotary, cache)

    @staticmethod
    def _key_mask(
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        past: int,
    ) -> torch.Tensor:
        batch, n_new = input_ids.shape
        if cache is not None and cache.mask is not None and cache.mask.shape[0] != batch:
            raise ArgumentError(
                f"cache: the KV cache holds {cache.mask.shape[0]} sequences but input_ids has "
                f"{batch}"
            )
        if attention_mask is None:
            new = torch.ones(batch, n_new, dtype=torch.bool, device=input_ids.device)
            return new if cache is None or cache.mask is None else torch.cat((cache.mask, new), 1)
        mask = attention_mask.to(device=input_ids.device) != 0
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (n_new, past + n_new):
            allowed = f"{n_new}" if past == 0 else f"{n_new} or {past + n_new}"
            raise ArgumentError(
                f"attention_mask must be [batch={batch}, {allowed}] (1 = token, 0 = padding), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if mask.shape[1] == n_new and cache is not None and cache.mask is not None:
            mask = torch.cat((cache.mask, mask), dim=1)
        return mask

    def extra_repr(self) -> str:
        c = self.config
        base = ", base model (no unembedding)" if self.unembed is None else ""
        return (
            f"family={c.family!r}, layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}, "
            f"kv_heads={c.n_kv_heads}, d_head={c.d_head}, d_mlp={c.d_mlp}, vocab={c.vocab_size}"
            f"{base}"
        )
