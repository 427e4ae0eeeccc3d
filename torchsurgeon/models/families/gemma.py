"""Gemma and Gemma 2: Llama's layout with Gemma's embedding scale and ``1 + w`` RMSNorm.

Both scale token embeddings by ``sqrt(d_model)`` and use RMSNorm with scale ``1 + weight``;
Gemma uses GeGLU (``gelu_pytorch_tanh``) and a wide ``head_dim``. Gemma 2 adds norms on the
attention and MLP outputs (``ln1_post``/``ln2_post``), scales queries by
``query_pre_attn_scalar ** -0.5``, soft-caps attention scores and final logits, and slides a
window over the layers ``layer_types`` marks ``"sliding_attention"`` (every other one).
"""

from __future__ import annotations

from dataclasses import replace

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import ModelWeights
from torchsurgeon.models.families.common import Family, HFConfig, norm, refuse, setting
from torchsurgeon.models.families.llama import (
    LLAMA_LAYOUT,
    llama_like_config,
    llama_like_family,
    llama_like_weights,
)
from torchsurgeon.models.source import TensorSource

__all__ = ["GEMMA", "GEMMA2"]


def gemma_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a Gemma or Gemma 2 config."""
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise refuse(hf_config.model_type, "use_bidirectional_attention=True")
    base = llama_like_config(hf_config)
    config = replace(
        base,
        activation=setting(hf_config, "hidden_activation", "hidden_act"),
        norm_offset=1.0,
        embed_scale=hf_config.hidden_size**0.5,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )
    if hf_config.model_type != "gemma2":
        return config
    return replace(
        config,
        post_norms=True,
        attn_scales=(hf_config.query_pre_attn_scalar**-0.5,) * config.n_layers,
        attn_softcap=getattr(hf_config, "attn_logit_softcapping", None),
        final_softcap=getattr(hf_config, "final_logit_softcapping", None),
    )


def gemma_weights(config: TransformerConfig, source: TensorSource, with_head: bool) -> ModelWeights:
    """Llama's mapping, plus Gemma 2's post-attention and post-MLP norms."""
    weights = llama_like_weights(config, source, with_head)
    if config.post_norms:
        for i, block in enumerate(weights.blocks):
            # Gemma 2 names: input_layernorm -> attn -> post_attention_layernorm (on the
            # attention output) -> pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm.
            p = f"layers.{i}."
            block.ln1_post = block.ln2
            block.ln2 = norm(source, p + "pre_feedforward_layernorm", config.d_model, bias=False)
            block.ln2_post = norm(
                source, p + "post_feedforward_layernorm", config.d_model, bias=False
            )
    return weights


GEMMA: Family = llama_like_family(
    "Gemma", "gemma", "Gemma", config=gemma_config, weights=gemma_weights
)
GEMMA2: Family = llama_like_family(
    "Gemma 2",
    "gemma2",
    "Gemma2",
    config=gemma_config,
    weights=gemma_weights,
    # in EXPLICIT's order: ln1, ln2 (before the MLP), ln1_post (on the attention output), ln2_post
    layout=replace(
        LLAMA_LAYOUT,
        family="gemma2",
        block_norms=(
            "input_layernorm",
            "pre_feedforward_layernorm",
            "post_attention_layernorm",
            "post_feedforward_layernorm",
        ),
    ),
)
