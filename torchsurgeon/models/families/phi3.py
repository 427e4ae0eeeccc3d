"""Phi-3: Llama-like blocks with fused ``qkv_proj`` and ``gate_up_proj`` tensors.

Phi-3 stacks the query, key and value rows in one tensor (``[q | k | v]``) and the gate and
up rows in another (``[gate | up]``); each part is a contiguous row range, so it becomes a
view. Rotary embeddings may turn a fraction of each head (``partial_rotary_factor``) and use
``longrope`` scaling (the 128k-context models); a ``sliding_window`` applies to every layer.
"""

from __future__ import annotations

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import BlockWeights, Linear, ModelWeights
from torchsurgeon.models.families.common import Family, HFConfig, head_rows, norm
from torchsurgeon.models.families.llama import (
    llama_like_config,
    llama_like_family,
    llama_like_model_weights,
)
from torchsurgeon.models.source import TensorSource

__all__ = ["PHI3"]


def phi3_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a Phi-3 config (Llama's translation covers every field it uses)."""
    return llama_like_config(hf_config)


def phi3_weights(config: TransformerConfig, source: TensorSource, with_head: bool) -> ModelWeights:
    """Map ``model.layers.{i}...`` tensors, cutting the fused ones into views."""
    d, h, g, dh, f = config.d_model, config.n_heads, config.n_kv_heads, config.d_head, config.d_mlp
    blocks = []
    for i in range(config.n_layers):
        p = f"layers.{i}."
        qkv = source.take(p + "self_attn.qkv_proj.weight", ((h + 2 * g) * dh, d))
        q_rows, k_rows, v_rows = qkv.split([h * dh, g * dh, g * dh])
        gate_up = source.take(p + "mlp.gate_up_proj.weight", (2 * f, d))
        gate, up = gate_up.split([f, f])
        blocks.append(
            BlockWeights(
                ln1=norm(source, p + "input_layernorm", d, bias=False),
                q=Linear(head_rows(q_rows, h, dh)),
                k=Linear(head_rows(k_rows, g, dh)),
                v=Linear(head_rows(v_rows, g, dh)),
                attn_out=Linear(source.take(p + "self_attn.o_proj.weight", (d, h * dh))),
                ln2=norm(source, p + "post_attention_layernorm", d, bias=False),
                mlp_gate=Linear(gate),
                mlp_up=Linear(up),
                mlp_out=Linear(source.take(p + "mlp.down_proj.weight", (d, f))),
            )
        )
    return llama_like_model_weights(config, source, blocks, with_head)


PHI3: Family = llama_like_family("Phi-3", "phi3", "Phi3", config=phi3_config, weights=phi3_weights)
