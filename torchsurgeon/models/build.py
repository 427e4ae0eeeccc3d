"""From a config and a family's weights to an explicit :class:`Transformer`.

A family module (``torchsurgeon.models.families.*``) knows its checkpoint's tensor names
and layouts and hands over :class:`ModelWeights` in one layout for all families:

- query/key/value weights ``[head, d_head, d_model]`` and biases ``[head, d_head]``;
- every other linear weight ``[out, in]`` (``nn.Linear``'s layout) with bias ``[out]``;
- norms as ``(weight, bias)``; embedding tables ``[rows, d_model]``.

A base model (no language-model head) has ``unembed=None`` — and BERT's, ``final_norm=None``
and, where the checkpoint has one, a ``pooler`` — and the built model returns hidden states.

Where a checkpoint's layout differs (GPT-2's transposed ``Conv1D``, fused QKV tensors) the
family makes views, never copies. This module knows the explicit architecture and wires
those tensors into it; it never looks at a checkpoint name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.layers.transformer import (
    MLP,
    Attention,
    GatedMLP,
    HeadProjection,
    HeadTransform,
    LayerNorm,
    ParallelBlock,
    Pooler,
    PositionEmbedding,
    PostNormBlock,
    PreNormBlock,
    Projection,
    RMSNorm,
    TokenEmbedding,
    Transformer,
    TransformerConfig,
    Unembedding,
)
from torchsurgeon.surgery.errors import ArgumentError

__all__ = ["BlockWeights", "Linear", "ModelWeights", "build_transformer"]


@dataclass
class Linear:
    """A weight and an optional bias (also used for a norm's scale and shift)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class BlockWeights:
    """The tensors of one block in the common layout (see the module docstring)."""

    ln1: Linear
    q: Linear
    k: Linear
    v: Linear
    attn_out: Linear
    ln2: Linear
    mlp_up: Linear
    mlp_out: Linear
    mlp_gate: Linear | None = None
    ln1_post: Linear | None = None
    ln2_post: Linear | None = None


@dataclass
class ModelWeights:
    """Every tensor of a model in the common layout."""

    embed: torch.Tensor
    blocks: list[BlockWeights]
    final_norm: Linear | None
    unembed: Linear | None
    """``None`` for a base model, which returns hidden states."""
    pos_embed: torch.Tensor | None = None
    type_embed: torch.Tensor | None = None
    embed_norm: Linear | None = None
    head: Linear | None = None
    pooler: Linear | None = None


def build_transformer(config: TransformerConfig, weights: ModelWeights) -> Transformer:
    """The explicit model with ``config``'s architecture around ``weights`` (not copied)."""
    if len(weights.blocks) != config.n_layers:
        raise ArgumentError(
            f"weights.blocks: config.n_layers is {config.n_layers}, got {len(weights.blocks)} "
            "blocks of weights"
        )
    embed = TokenEmbedding(weights.embed, scale=config.embed_scale)
    unembed = None
    if weights.unembed is not None:
        unembed = Unembedding(
            weights.unembed.weight, weights.unembed.bias, softcap=config.final_softcap
        )
        if config.tied_embeddings and weights.unembed.weight is weights.embed:
            unembed.weight = embed.weight  # one parameter object at both sites, as the original
    return Transformer(
        config,
        embed=embed,
        pos_embed=PositionEmbedding(weights.pos_embed) if weights.pos_embed is not None else None,
        type_embed=TokenEmbedding(weights.type_embed) if weights.type_embed is not None else None,
        embed_norm=_norm(config, weights.embed_norm) if weights.embed_norm is not None else None,
        blocks=nn.ModuleList(_block(config, i, w) for i, w in enumerate(weights.blocks)),
        head=(
            HeadTransform(Projection(weights.head.weight, weights.head.bias), config.activation)
            if weights.head is not None
            else None
        ),
        final_norm=_norm(config, weights.final_norm) if weights.final_norm is not None else None,
        unembed=unembed,
        pooler=(
            Pooler(Projection(weights.pooler.weight, weights.pooler.bias))
            if weights.pooler is not None
            else None
        ),
    )


def _norm(config: TransformerConfig, weights: Linear) -> nn.Module:
    if config.norm == "layernorm":
        return LayerNorm(weights.weight, weights.bias, config.norm_eps)
    return RMSNorm(weights.weight, config.norm_eps, offset=config.norm_offset)


def _attention(config: TransformerConfig, layer: int, weights: BlockWeights) -> Attention:
    return Attention(
        HeadProjection(weights.q.weight, weights.q.bias),
        HeadProjection(weights.k.weight, weights.k.bias),
        HeadProjection(weights.v.weight, weights.v.bias),
        Projection(weights.attn_out.weight, weights.attn_out.bias),
        layer=layer,
        scale=config.attn_scales[layer],
        rotary=config.rotary is not None,
        softcap=config.attn_softcap,
        window=config.sliding_windows[layer],
    )


def _mlp(config: TransformerConfig, weights: BlockWeights) -> nn.Module:
    up = Projection(weights.mlp_up.weight, weights.mlp_up.bias)
    out = Projection(weights.mlp_out.weight, weights.mlp_out.bias)
    if config.gated_mlp:
        if weights.mlp_gate is None:
            raise ArgumentError(
                "weights.mlp_gate: the config has gated_mlp=True but the block has no gate weights"
            )
        gate = Projection(weights.mlp_gate.weight, weights.mlp_gate.bias)
        return GatedMLP(gate, up, out, config.activation)
    return MLP(up, out, config.activation)


def _block(config: TransformerConfig, layer: int, weights: BlockWeights) -> nn.Module:
    ln1, ln2 = _norm(config, weights.ln1), _norm(config, weights.ln2)
    attn, mlp = _attention(config, layer, weights), _mlp(config, weights)
    if config.block == "parallel":
        return ParallelBlock(ln1, attn, ln2, mlp)
    if config.block == "post_norm":
        return PostNormBlock(attn, ln1, mlp, ln2)
    return PreNormBlock(
        ln1,
        attn,
        ln2,
        mlp,
        ln1_post=_norm(config, weights.ln1_post) if weights.ln1_post is not None else None,
        ln2_post=_norm(config, weights.ln2_post) if weights.ln2_post is not None else None,
    )
