"""BERT: a bidirectional encoder with post-norm blocks and a masked-language-model head.

Embeddings are token + token-type + learned position, then a LayerNorm (``embed_norm``).
Blocks are :class:`~torchsurgeon.layers.transformer.PostNormBlock` (norm after each residual
addition). The MLM head is a dense layer and activation (``head``), a LayerNorm
(``final_norm``) and the unembedding tied to the token embeddings with its own bias
(``unembed``). A base ``BertModel`` (a sentence-embedding checkpoint, say) has no MLM head:
it returns the last block's output, and its pooler (``tanh(dense(x[:, 0]))``) where the
checkpoint has one. Checkpoints from the original TensorFlow conversion name LayerNorm
scales ``gamma``/``beta``; both spellings are read.
"""

from __future__ import annotations

from torchsurgeon.layers.transformer import TransformerConfig
from torchsurgeon.models.build import BlockWeights, Linear, ModelWeights
from torchsurgeon.models.families.common import Family, HFConfig, head_bias, head_rows, refuse
from torchsurgeon.models.families.layout import ModelLayout
from torchsurgeon.models.source import TensorSource

__all__ = ["BERT"]


def bert_config(hf_config: HFConfig) -> TransformerConfig:
    """Translate a BERT config."""
    if getattr(hf_config, "is_decoder", False):
        raise refuse("BERT", "is_decoder=True")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise refuse("BERT", f"position_embedding_type={hf_config.position_embedding_type!r}")
    n_heads, n_layers = hf_config.num_attention_heads, hf_config.num_hidden_layers
    d_head = hf_config.hidden_size // n_heads
    return TransformerConfig(
        family="bert",
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
        block="post_norm",
        causal=False,
        max_positions=hf_config.max_position_embeddings,
        n_token_types=hf_config.type_vocab_size,
        attn_scales=(d_head**-0.5,) * n_layers,
        sliding_windows=(None,) * n_layers,
        attn_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _layer_norm(source: TensorSource, name: str, d: int) -> Linear:
    if source.has(f"{name}.weight"):
        return Linear(source.take(f"{name}.weight", (d,)), source.take(f"{name}.bias", (d,)))
    return Linear(source.take(f"{name}.gamma", (d,)), source.take(f"{name}.beta", (d,)))


def bert_weights(config: TransformerConfig, source: TensorSource, with_head: bool) -> ModelWeights:
    """Map ``bert.encoder.layer.{i}...`` and ``cls.predictions...`` into the common layout."""
    d, h, dh, f = config.d_model, config.n_heads, config.d_head, config.d_mlp

    def linear(name: str, out: int, inp: int) -> Linear:
        weight = source.take(f"{name}.weight", (out, inp))
        return Linear(weight, source.take(f"{name}.bias", (out,)))

    def heads(name: str) -> Linear:
        dense = linear(name, h * dh, d)
        return Linear(head_rows(dense.weight, h, dh), head_bias(dense.bias, h, dh))

    blocks = []
    for i in range(config.n_layers):
        p = f"encoder.layer.{i}."
        blocks.append(
            BlockWeights(
                q=heads(p + "attention.self.query"),
                k=heads(p + "attention.self.key"),
                v=heads(p + "attention.self.value"),
                attn_out=linear(p + "attention.output.dense", d, d),
                ln1=_layer_norm(source, p + "attention.output.LayerNorm", d),
                mlp_up=linear(p + "intermediate.dense", f, d),
                mlp_out=linear(p + "output.dense", d, f),
                ln2=_layer_norm(source, p + "output.LayerNorm", d),
            )
        )
    embed = source.take("embeddings.word_embeddings.weight", (config.vocab_size, d))
    assert config.max_positions is not None
    e = "embeddings"
    weights = ModelWeights(
        embed=embed,
        pos_embed=source.take(f"{e}.position_embeddings.weight", (config.max_positions, d)),
        type_embed=source.take(f"{e}.token_type_embeddings.weight", (config.n_token_types, d)),
        embed_norm=_layer_norm(source, "embeddings.LayerNorm", d),
        blocks=blocks,
        final_norm=None,
        unembed=None,
    )
    if not with_head:
        if source.has("pooler.dense.weight"):  # BertModel(add_pooling_layer=False) has none
            weights.pooler = linear("pooler.dense", d, d)
        return weights
    decoder = (
        embed
        if config.tied_embeddings
        else source.take("cls.predictions.decoder.weight", embed.shape)
    )
    weights.head = linear("cls.predictions.transform.dense", d, d)
    weights.final_norm = _layer_norm(source, "cls.predictions.transform.LayerNorm", d)
    weights.unembed = Linear(decoder, source.take("cls.predictions.bias", (config.vocab_size,)))
    return weights


BERT = Family(
    name="BERT",
    model_types=("bert",),
    classes=("BertForMaskedLM",),
    base_classes=("BertModel",),
    prefixes=("bert.", ""),
    # The MLM transform (dense, activation, LayerNorm) is one module in transformers: it is
    # the "final norm" a decoded residual stream goes through.
    layout=ModelLayout(
        family="bert",
        blocks="bert.encoder.layer",
        embed="bert.embeddings.word_embeddings",
        final_norm="cls.predictions.transform",
        unembed="cls.predictions.decoder",
        attn="attention.output.dense",
        attn_out="attention.output.dense",
        mlp="output.dense",
        mlp_down="output.dense",
        pos_embed="bert.embeddings.position_embeddings",
        block_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    ),
    config=bert_config,
    weights=bert_weights,
)
