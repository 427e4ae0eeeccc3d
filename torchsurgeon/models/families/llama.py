"""Llama, Mistral and Qwen2: pre-norm RMSNorm blocks, rotary, grouped-query, SwiGLU.

The three share one layout (``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``) and differ
in small ways this mapping reads from the config: Qwen2 has query/key/value biases; Llama
may have biases everywhere (``attention_bias``, ``mlp_bias``); Mistral slides a window over
every layer (``sliding_window``), Qwen2 over the layers ``layer_types`` marks
``"sliding_attention"``.
"""

from __future__ import annotations

from typing import Any

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import BlockWeights, Linear, ModelWeights
from torchsurgeon.models.families.common import (
    Family,
    HFConfig,
    head_bias,
    head_rows,
    norm,
    rotary_config,
    setting,
)
from torchsurgeon.models.families.layout import ModelLayout
from torchsurgeon.models.source import TensorSource

__all__ = [
    "LLAMA",
    "LLAMA_LAYOUT",
    "MISTRAL",
    "OLMO",
    "QWEN2",
    "QWEN3",
    "llama_like_config",
    "llama_like_family",
    "llama_like_weights",
]

LLAMA_LAYOUT = ModelLayout(
    family="llama",
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    block_norms=("input_layernorm", "post_attention_layernorm"),
)
"""Where the parts sit in every Llama-shaped ``...ForCausalLM`` (Mistral, Qwen, Gemma, Phi-3)."""


def sliding_windows(hf_config: HFConfig, n_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding window (``layer_types`` if the config has them, else all)."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None:
        return (None,) * n_layers
    if layer_types is None:
        return (window,) * n_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def llama_like_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a Llama, Mistral or Qwen2 config."""
    family = hf_config.model_type
    n_heads = hf_config.num_attention_heads
    d_head = setting(hf_config, "head_dim", default=hf_config.hidden_size // n_heads)
    n_layers = hf_config.num_hidden_layers
    return TransformerConfig(
        family=family,
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=setting(hf_config, "num_key_value_heads", default=n_heads),
        d_head=d_head,
        d_mlp=hf_config.intermediate_size,
        activation=setting(hf_config, "hidden_act", "hidden_activation"),
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=hf_config.rms_norm_eps,
        rotary=rotary_config(hf_config, d_head, family),
        attn_scales=(d_head**-0.5,) * n_layers,
        sliding_windows=sliding_windows(hf_config, n_layers),
        attn_bias=bool(getattr(hf_config, "attention_bias", False)) or family == "qwen2",
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def llama_like_weights(
    config: TransformerConfig, source: TensorSource, with_head: bool
) -> ModelWeights:
    """Map ``model.layers.{i}...`` tensors into the common layout."""
    d, h, g, dh, f = config.d_model, config.n_heads, config.n_kv_heads, config.d_head, config.d_mlp
    qkv_bias = config.attn_bias
    out_bias = config.attn_bias and config.family != "qwen2"

    def heads(name: str, n: int) -> Linear:
        weight = head_rows(source.take(f"{name}.weight", (n * dh, d)), n, dh)
        bias = source.take(f"{name}.bias", (n * dh,)) if qkv_bias else None
        return Linear(weight, head_bias(bias, n, dh))

    def linear(name: str, out: int, inp: int, bias: bool) -> Linear:
        return Linear(
            source.take(f"{name}.weight", (out, inp)),
            source.take(f"{name}.bias", (out,)) if bias else None,
        )

    blocks = []
    for i in range(config.n_layers):
        p = f"layers.{i}."
        blocks.append(
            BlockWeights(
                ln1=norm(source, p + "input_layernorm", d, bias=False),
                q=heads(p + "self_attn.q_proj", h),
                k=heads(p + "self_attn.k_proj", g),
                v=heads(p + "self_attn.v_proj", g),
                attn_out=linear(p + "self_attn.o_proj", d, h * dh, out_bias),
                ln2=norm(source, p + "post_attention_layernorm", d, bias=False),
                mlp_gate=linear(p + "mlp.gate_proj", f, d, config.mlp_bias),
                mlp_up=linear(p + "mlp.up_proj", f, d, config.mlp_bias),
                mlp_out=linear(p + "mlp.down_proj", d, f, config.mlp_bias),
            )
        )
    return llama_like_model_weights(config, source, blocks, with_head)


def llama_like_model_weights(
    config: TransformerConfig, source: TensorSource, blocks: list[BlockWeights], with_head: bool
) -> ModelWeights:
    """Add Llama's token embedding, final RMSNorm and (possibly tied) unembedding to blocks."""
    d = config.d_model
    embed = source.take("embed_tokens.weight", (config.vocab_size, d))
    unembed = None
    if with_head:
        unembed = embed if config.tied_embeddings else source.take("lm_head.weight", embed.shape)
    return ModelWeights(
        embed=embed,
        blocks=blocks,
        final_norm=norm(source, "norm", d, bias=False),
        unembed=Linear(unembed) if unembed is not None else None,
    )


def llama_like_family(
    name: str,
    model_type: str,
    prefix: str,
    *,
    convert: bool = True,
    layout: ModelLayout = LLAMA_LAYOUT,
    **conversion: Any,
) -> Family:
    """A family laid out like Llama: ``{prefix}ForCausalLM`` and its base ``{prefix}Model``.

    Args:
        name: The family's display name.
        model_type: The ``transformers`` ``model_type`` it covers.
        prefix: The class-name prefix (``"Llama"`` for ``LlamaForCausalLM``).
        convert: False for a family the methods know but no conversion covers.
        layout: Where the parts sit (Llama's unless a family adds norms).
        conversion: ``config=`` / ``weights=`` replacing Llama's translation.
    """
    functions = {"config": llama_like_config, "weights": llama_like_weights, **conversion}
    return Family(
        name=name,
        model_types=(model_type,),
        classes=(f"{prefix}ForCausalLM",),
        base_classes=(f"{prefix}Model",),
        prefixes=("model.", ""),
        layout=layout,
        **(functions if convert else {}),
    )


LLAMA = llama_like_family("Llama", "llama", "Llama")
MISTRAL = llama_like_family("Mistral", "mistral", "Mistral")
QWEN2 = llama_like_family("Qwen2", "qwen2", "Qwen2")
# Laid out like Llama, but with parts the explicit layers do not have (Qwen3's query/key
# norms, OLMo's weightless LayerNorm): the methods read them wrapped; convert refuses them.
QWEN3 = llama_like_family("Qwen3", "qwen3", "Qwen3", convert=False)
OLMO = llama_like_family("OLMo", "olmo", "Olmo", convert=False)
