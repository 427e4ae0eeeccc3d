"""The shape of an explicit transformer, as plain data.

A :class:`TransformerConfig` says everything that differs between the supported families
— sizes, block wiring, norm and activation kinds, positional scheme, attention scale,
soft-capping, sliding windows — in one vocabulary. Conversions read a ``transformers``
config into it; the builder (:func:`torchsurgeon.models.build.build_transformer`) and the
model's forward read it back. It is kept on the model as ``model.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchsurgeon.layers.transformer.rotary import RotaryConfig
from torchsurgeon.surgery.errors import ArgumentError, closest

__all__ = ["BLOCK_KINDS", "NORM_KINDS", "TransformerConfig"]

BLOCK_KINDS = ("pre_norm", "parallel", "post_norm")
NORM_KINDS = ("layernorm", "rmsnorm")


def _near(value: object, choices: tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the choice most like ``value``."""
    return f"; did you mean {closest(str(value), choices, n=1)[0]!r}?"


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and architectural choices of one explicit transformer."""

    family: str
    """The ``transformers`` ``model_type`` it was converted from (e.g. ``"llama"``)."""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    activation: str
    gated_mlp: bool
    norm: str
    norm_eps: float
    block: str = "pre_norm"
    causal: bool = True
    norm_offset: float = 0.0
    """RMSNorm scale is ``norm_offset + weight`` (Gemma: 1)."""
    post_norms: bool = False
    """Norms on the attention and MLP outputs too (Gemma 2's ``ln1_post``/``ln2_post``)."""
    rotary: RotaryConfig | None = None
    """Rotary embedding, or ``None`` for learned absolute positions."""
    max_positions: int | None = None
    """Rows of the learned position table (learned-position families)."""
    n_token_types: int = 0
    """Rows of BERT's token-type table (0: none)."""
    attn_scales: tuple[float, ...] = ()
    """Per layer: the factor on ``q . k`` (usually ``d_head ** -0.5``)."""
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: sliding-window length, or ``None`` for full attention."""
    embed_scale: float | None = None
    """Factor on token embeddings (Gemma: ``sqrt(d_model)``)."""
    attn_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ArgumentError(
                f"TransformerConfig.block must be one of {BLOCK_KINDS}, got {self.block!r}"
                f"{_near(self.block, BLOCK_KINDS)}"
            )
        if self.norm not in NORM_KINDS:
            raise ArgumentError(
                f"TransformerConfig.norm must be one of {NORM_KINDS}, got {self.norm!r}"
                f"{_near(self.norm, NORM_KINDS)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ArgumentError(
                f"TransformerConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        for name in ("attn_scales", "sliding_windows"):
            if len(getattr(self, name)) != self.n_layers:
                raise ArgumentError(
                    f"TransformerConfig.{name} needs one entry per layer ({self.n_layers}), got "
                    f"{len(getattr(self, name))}"
                )
        if self.rotary is None and self.max_positions is None:
            raise ArgumentError(
                "TransformerConfig.max_positions: a model without rotary embeddings (rotary=None) "
                "needs the number of learned positions"
            )

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles by module path, as ``transformers`` configs carry them (what
        ``ts.distributed.parallelize(model, mesh, "auto")`` uses): the attention split by
        heads (``q``/``k``/``v`` column-wise, ``out`` row-wise) and the MLP by hidden
        features."""
        mlp = ("gate", "up") if self.gated_mlp else ("up",)
        return {
            **{f"blocks.*.attn.{name}": "colwise" for name in ("q", "k", "v")},
            "blocks.*.attn.out": "rowwise",
            **{f"blocks.*.mlp.{name}": "colwise" for name in mlp},
            "blocks.*.mlp.out": "rowwise",
        }
