"""GPT-NeoX (Pythia): parallel attention and MLP, partial rotary, interleaved fused QKV.

GPT-NeoX fuses query, key and value into one ``query_key_value`` tensor whose rows are
ordered head by head — ``[head, (q, k, v), d_head, d_model]`` — so each of the three maps
is a strided view ``[head, d_head, d_model]`` of it. Rotary embeddings turn the first
``rotary_pct`` of each head's dimensions. With ``use_parallel_residual`` (the default, and
every Pythia model) the blocks are :class:`~torchsurgeon.layers.transformer.ParallelBlock`.
"""

from __future__ import annotations

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import BlockWeights, Linear, ModelWeights
from torchsurgeon.models.families.common import Family, HFConfig, norm, rotary_config
from torchsurgeon.models.families.layout import ModelLayout
from torchsurgeon.models.source import TensorSource

__all__ = ["GPT_NEOX"]


def gpt_neox_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a GPT-NeoX config."""
    n_heads, n_layers = hf_config.num_attention_heads, hf_config.num_hidden_layers
    d_head = hf_config.hidden_size // n_heads
    return TransformerConfig(
        family="gpt_neox",
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=d_head,
        d_mlp=hf_config.intermediate_size,
        activation=hf_config.hidden_act,
        gated_mlp=False,
        norm="layernorm",
        norm_eps=hf_config.layer_norm_eps,
        block="parallel" if getattr(hf_config, "use_parallel_residual", True) else "pre_norm",
        rotary=rotary_config(hf_config, d_head, "gpt_neox"),
        attn_scales=(d_head**-0.5,) * n_layers,
        sliding_windows=(None,) * n_layers,
        attn_bias=bool(getattr(hf_config, "attention_bias", True)),
        mlp_bias=True,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def gpt_neox_weights(
    config: TransformerConfig, source: TensorSource, with_head: bool
) -> ModelWeights:
    """Map ``gpt_neox.layers.{i}...`` tensors into the common layout."""
    d, h, dh, f = config.d_model, config.n_heads, config.d_head, config.d_mlp

    def linear(name: str, out: int, inp: int, bias: bool = True) -> Linear:
        return Linear(
            source.take(f"{name}.weight", (out, inp)),
            source.take(f"{name}.bias", (out,)) if bias else None,
        )

    blocks = []
    for i in range(config.n_layers):
        p = f"layers.{i}."
        fused = source.take(p + "attention.query_key_value.weight", (3 * d, d)).unflatten(
            0, (h, 3, dh)
        )
        fused_bias = (
            source.take(p + "attention.query_key_value.bias", (3 * d,)).unflatten(0, (h, 3, dh))
            if config.attn_bias
            else None
        )
        q, k, v = (
            Linear(fused[:, j], fused_bias[:, j] if fused_bias is not None else None)
            for j in range(3)
        )
        blocks.append(
            BlockWeights(
                ln1=norm(source, p + "input_layernorm", d, bias=True),
                q=q,
                k=k,
                v=v,
                attn_out=linear(p + "attention.dense", d, d, config.attn_bias),
                ln2=norm(source, p + "post_attention_layernorm", d, bias=True),
                mlp_up=linear(p + "mlp.dense_h_to_4h", f, d),
                mlp_out=linear(p + "mlp.dense_4h_to_h", d, f),
            )
        )
    embed = source.take("embed_in.weight", (config.vocab_size, d))
    unembed = None
    if with_head:
        # transformers 5 names the unembedding lm_head; checkpoints saved before, embed_out.
        out_name = "lm_head.weight" if source.has("lm_head.weight") else "embed_out.weight"
        unembed = embed if config.tied_embeddings else source.take(out_name, embed.shape)
    return ModelWeights(
        embed=embed,
        blocks=blocks,
        final_norm=norm(source, "final_layer_norm", d, bias=True),
        unembed=Linear(unembed) if unembed is not None else None,
    )


GPT_NEOX = Family(
    name="GPT-NeoX",
    model_types=("gpt_neox",),
    classes=("GPTNeoXForCausalLM",),
    base_classes=("GPTNeoXModel",),
    prefixes=("gpt_neox.", ""),
    layout=ModelLayout(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        block_norms=("input_layernorm", "post_attention_layernorm"),
    ),
    config=gpt_neox_config,
    weights=gpt_neox_weights,
)
