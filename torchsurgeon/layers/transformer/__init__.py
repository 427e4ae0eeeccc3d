"""Explicit-dataflow transformer layers: every named intermediate is a module boundary.

Selectors reach modules, and only modules. In ``transformers`` implementations the
attention pattern, the per-head outputs, queries, keys and values, and the residual stream
between sublayers are local variables. In these layers each of them is the *output of a
submodule* with a stable name — ``blocks.3.attn.pattern``, ``blocks.3.attn.head_out``,
``blocks.3.resid_mid``, ``blocks.3.mlp.hidden`` — so selecting it and inserting an
intervention layer after it reads or rewrites exactly that tensor. The names are the same
in every supported family (see ``docs/models.md``).

Build a model from a checkpoint with :func:`torchsurgeon.models.load` or convert a
``transformers`` model with :func:`torchsurgeon.models.convert`; the classes here are the
pieces those build from.
"""

from torchsurgeon.layers.transformer.activation import ACTIVATIONS, Activation, GatedActivation
from torchsurgeon.layers.transformer.attention import Attention
from torchsurgeon.layers.transformer.attention_steps import (
    AttentionPattern,
    AttentionScores,
    MaskScores,
    MixValues,
)
from torchsurgeon.layers.transformer.block import ParallelBlock, PostNormBlock, PreNormBlock
from torchsurgeon.layers.transformer.cache import KVCache
from torchsurgeon.layers.transformer.config import TransformerConfig
from torchsurgeon.layers.transformer.context import ForwardContext, attention_masks
from torchsurgeon.layers.transformer.embedding import PositionEmbedding, TokenEmbedding
from torchsurgeon.layers.transformer.hook import HookPoint
from torchsurgeon.layers.transformer.mlp import MLP, GatedMLP
from torchsurgeon.layers.transformer.model import EncoderOutput, Transformer
from torchsurgeon.layers.transformer.norm import LayerNorm, RMSNorm
from torchsurgeon.layers.transformer.projection import HeadProjection, Projection
from torchsurgeon.layers.transformer.rotary import ApplyRotary, Rotary, RotaryConfig
from torchsurgeon.layers.transformer.unembed import HeadTransform, Pooler, Unembedding

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Activation",
    "ApplyRotary",
    "Attention",
    "AttentionPattern",
    "AttentionScores",
    "EncoderOutput",
    "ForwardContext",
    "GatedActivation",
    "GatedMLP",
    "HeadProjection",
    "HeadTransform",
    "HookPoint",
    "KVCache",
    "LayerNorm",
    "MaskScores",
    "MixValues",
    "ParallelBlock",
    "Pooler",
    "PositionEmbedding",
    "PostNormBlock",
    "PreNormBlock",
    "Projection",
    "RMSNorm",
    "Rotary",
    "RotaryConfig",
    "TokenEmbedding",
    "Transformer",
    "TransformerConfig",
    "Unembedding",
    "attention_masks",
]
