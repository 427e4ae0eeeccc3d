"""GPT-2: learned positions, LayerNorm pre-norm blocks, GELU MLP, tied unembedding.

GPT-2 stores its linear maps as ``Conv1D`` weights ``[in, out]`` (the transpose of
``nn.Linear``) and its query, key and value maps fused in one ``c_attn`` tensor
``[d_model, 3 * d_model]``. The mapping cuts that tensor into three per-head views and
transposes the others as views; nothing is copied.
"""

from __future__ import annotations

import torch

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import BlockWeights, Linear, ModelWeights
from torchsurgeon.models.families.common import Family, HFConfig, norm, refuse, setting
from torchsurgeon.models.families.layout import ModelLayout
from torchsurgeon.models.source import TensorSource

__all__ = ["GPT2"]


def gpt2_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a GPT-2 config."""
    if getattr(hf_config, "add_cross_attention", False):
        raise refuse("GPT-2", "add_cross_attention=True")
    d_model, n_heads, n_layers = hf_config.n_embd, hf_config.n_head, hf_config.n_layer
    d_head = d_model // n_heads
    scale = d_head**-0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
    by_layer = getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)
    return TransformerConfig(
        family="gpt2",
        vocab_size=hf_config.vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_head=d_head,
        d_mlp=setting(hf_config, "n_inner", default=4 * d_model),
        activation=hf_config.activation_function,
        gated_mlp=False,
        norm="layernorm",
        norm_eps=hf_config.layer_norm_epsilon,
        max_positions=hf_config.n_positions,
        attn_scales=tuple(scale / (i + 1) if by_layer else scale for i in range(n_layers)),
        sliding_windows=(None,) * n_layers,
        attn_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _conv1d(source: TensorSource, name: str, inp: int, out: int) -> Linear:
    # Conv1D computes x @ W + b with W [in, out]; its transpose is an nn.Linear weight.
    weight = source.take(f"{name}.weight", (inp, out))
    return Linear(weight.t(), source.take(f"{name}.bias", (out,)))


def _fused_qkv(source: TensorSource, name: str, config: TransformerConfig) -> list[Linear]:
    d, h, dh = config.d_model, config.n_heads, config.d_head
    weight = source.take(f"{name}.weight", (d, 3 * d))
    bias = source.take(f"{name}.bias", (3 * d,))
    parts = []
    for i in range(3):
        cols = weight[:, i * d : (i + 1) * d]  # [d_model, head * d_head]
        heads = cols.unflatten(1, (h, dh)).permute(1, 2, 0)  # [head, d_head, d_model]
        parts.append(Linear(heads, bias[i * d : (i + 1) * d].unflatten(0, (h, dh))))
    return parts


def gpt2_weights(config: TransformerConfig, source: TensorSource, with_head: bool) -> ModelWeights:
    """Map ``transformer.h.{i}...`` tensors into the common layout."""
    d, f = config.d_model, config.d_mlp
    blocks = []
    for i in range(config.n_layers):
        p = f"h.{i}."
        q, k, v = _fused_qkv(source, p + "attn.c_attn", config)
        blocks.append(
            BlockWeights(
                ln1=norm(source, p + "ln_1", d, bias=True),
                q=q,
                k=k,
                v=v,
                attn_out=_conv1d(source, p + "attn.c_proj", d, d),
                ln2=norm(source, p + "ln_2", d, bias=True),
                mlp_up=_conv1d(source, p + "mlp.c_fc", d, f),
                mlp_out=_conv1d(source, p + "mlp.c_proj", f, d),
            )
        )
    embed = source.take("wte.weight", (config.vocab_size, d))
    unembed: torch.Tensor | None = None
    if with_head:
        unembed = embed if config.tied_embeddings else source.take("lm_head.weight", embed.shape)
    assert config.max_positions is not None
    return ModelWeights(
        embed=embed,
        pos_embed=source.take("wpe.weight", (config.max_positions, d)),
        blocks=blocks,
        final_norm=norm(source, "ln_f", d, bias=True),
        unembed=Linear(unembed) if unembed is not None else None,
    )


GPT2 = Family(
    name="GPT-2",
    model_types=("gpt2",),
    classes=("GPT2LMHeadModel",),
    base_classes=("GPT2Model",),
    prefixes=("transformer.", ""),
    layout=ModelLayout(
        family="gpt2",
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        pos_embed="transformer.wpe",
        block_norms=("ln_1", "ln_2"),
    ),
    config=gpt2_config,
    weights=gpt2_weights,
)
