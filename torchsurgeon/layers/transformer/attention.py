"""Self-attention with every step a named submodule.

In ``transformers`` the attention pattern, per-head outputs, queries, keys and values are
local variables of one ``forward``; a selector cannot reach them. Here each is the output
of a child module of :class:`Attention`, in the order they are computed:

``q``, ``k``, ``v``
    :class:`~torchsurgeon.layers.transformer.projection.HeadProjection`, output
    ``[batch, pos, head, d_head]`` (``k``/``v`` have the key/value heads: fewer under
    grouped- or multi-query attention). TransformerLens ``hook_q``/``hook_k``/``hook_v``.
``q_rot``, ``k_rot``
    :class:`~torchsurgeon.layers.transformer.rotary.ApplyRotary` (rotary families only).
``scores``, ``mask``, ``pattern``, ``mix``
    see :mod:`torchsurgeon.layers.transformer.attention_steps`.
``head_out``
    a :class:`~torchsurgeon.layers.transformer.hook.HookPoint` on the per-head outputs
    ``[batch, pos, head, d_head]`` (TransformerLens ``hook_z``): the place to knock out,
    scale or patch one head.
``out``
    the output projection, ``[batch, pos, d_model]`` (TransformerLens ``hook_attn_out``).

With a KV cache the keys and values of this call (after rotary) are appended to the cache
between ``k_rot`` and ``scores``: ``k``, ``v``, ``q_rot`` and ``k_rot`` cover this call's
tokens, ``scores`` onward cover every cached key.
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.layers.transformer.attention_steps import (
    AttentionPattern,
    AttentionScores,
    MaskScores,
    MixValues,
)
from torchsurgeon.layers.transformer.context import ForwardContext
from torchsurgeon.layers.transformer.hook import HookPoint
from torchsurgeon.layers.transformer.projection import HeadProjection, Projection
from torchsurgeon.layers.transformer.rotary import ApplyRotary
from torchsurgeon.surgery.errors import ArgumentError, SiteError

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head (grouped-/multi-query) self-attention of one block.

    ``layer`` is the block's index (its slot in the KV cache); ``window`` a sliding-window
    length or ``None``; ``rotary`` whether queries and keys are rotated.
    """

    def __init__(
        self,
        q: HeadProjection,
        k: HeadProjection,
        v: HeadProjection,
        out: Projection,
        *,
        layer: int,
        scale: float,
        rotary: bool,
        softcap: float | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if k.n_heads != v.n_heads or q.n_heads % k.n_heads:
            raise ArgumentError(
                f"Attention(layer={layer}): {q.n_heads} query heads need a whole number of query "
                f"heads per key/value head; got {k.n_heads} key and {v.n_heads} value heads"
            )
        self.q = q
        self.k = k
        self.v = v
        self.q_rot = ApplyRotary() if rotary else None
        self.k_rot = ApplyRotary() if rotary else None
        self.scores = AttentionScores(scale, softcap)
        self.mask = MaskScores()
        self.pattern = AttentionPattern()
        self.mix = MixValues()
        self.head_out = HookPoint()
        self.out = out
        self.layer = layer
        self.window = window

    def forward(self, x: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """Attend from this call's tokens over all allowed (cached and new) tokens."""
        q = self.q(x)
        k = self.k(x)
        v = self.v(x)
        if self.q_rot is not None and self.k_rot is not None:
            if context.rotary is None:
                raise SiteError(
                    f"attention of layer {self.layer} uses rotary embeddings but its context has "
                    "no angles (context.rotary); build the model with a rotary config"
                )
            cos, sin = context.rotary
            q = self.q_rot(q, cos, sin)
            k = self.k_rot(k, cos, sin)
        if context.cache is not None:
            k, v = context.cache.extend(self.layer, k, v)
        scores = self.scores(q, k)
        scores = self.mask(scores, context.masks[self.window])
        pattern = self.pattern(scores)
        z = self.mix(pattern, v)
        z = self.head_out(z, context.positions)
        return self.out(z.flatten(-2))

    def extra_repr(self) -> str:
        window = f", window={self.window}" if self.window is not None else ""
        return f"layer={self.layer}{window}"
