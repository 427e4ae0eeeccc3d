"""Where the parts of a causal language model live: the small family table every method reads.

The methods in this package are written once, against *roles* — the list of blocks, the
token embedding, the final norm, the unembedding, and inside each block the attention
module, its output projection, the MLP and its down-projection — and a
:class:`ModelLayout` says at which paths those roles sit in a given model. Per-head work
uses the *input* of the attention output projection (``attn.c_proj`` in GPT-2,
``self_attn.o_proj`` in Llama): a ``[batch, pos, n_heads * d_head]`` tensor in which head
``h`` is the last-dimension slice ``h * d_head : (h + 1) * d_head``. That tensor exists in
every plain ``transformers`` model, so no re-implementation is needed to reach heads.

:func:`layout_of` finds the layout of a model from the table below (by class name, then by
trying each known layout's paths), fills in the head count from the model's config and
checks every path. For a family the table does not know, pass ``layout=ModelLayout(...)``
to any method; the error for an unknown family says exactly that, with the model's top-level
children to start from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from torchsurgeon.surgery.errors import PathError
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import get_at

__all__ = ["FAMILIES", "ModelLayout", "UnknownFamilyError", "layout_of"]


class UnknownFamilyError(ValueError):
    """The model's family is not in the table and no ``layout=`` was given."""


@dataclass(frozen=True)
class ModelLayout:
    """The paths of a causal LM's parts (block-relative where noted) and its head count.

    ``blocks`` is the ``ModuleList`` of transformer blocks; ``attn``, ``attn_out``, ``mlp``
    and ``mlp_down`` are paths *inside a block*. ``n_heads`` may be left ``None`` when the
    model's config has ``num_attention_heads``.
    """

    family: str
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_out: str
    mlp: str
    mlp_down: str
    n_heads: int | None = None

    def block(self, layer: int) -> str:
        """The path of block ``layer``."""
        return f"{self.blocks}.{layer}"

    def in_block(self, layer: int, role: str) -> str:
        """The path of the block-relative part ``role`` (a field name) of block ``layer``."""
        return f"{self.blocks}.{layer}.{getattr(self, role)}"


_GPT2 = ModelLayout(
    family="gpt2",
    blocks="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    attn_out="attn.c_proj",
    mlp="mlp",
    mlp_down="mlp.c_proj",
)
_LLAMA = ModelLayout(
    family="llama",
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
)
_NEOX = ModelLayout(
    family="gpt_neox",
    blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="embed_out",
    attn="attention",
    attn_out="attention.dense",
    mlp="mlp",
    mlp_down="mlp.dense_4h_to_h",
)

FAMILIES: dict[str, tuple[ModelLayout, tuple[str, ...]]] = {
    "gpt2": (_GPT2, ("GPT2LMHeadModel",)),
    "llama": (
        _LLAMA,
        (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "Phi3ForCausalLM",
            "OlmoForCausalLM",
        ),
    ),
    "gpt_neox": (_NEOX, ("GPTNeoXForCausalLM",)),
}
"""``family -> (layout, class names)``. A model whose class is listed gets that layout;
another model gets the first layout whose paths all exist in it."""


def _paths(layout: ModelLayout, n_blocks: int) -> list[str]:
    inner = [layout.attn, layout.attn_out, layout.mlp, layout.mlp_down]
    last = n_blocks - 1
    return [
        layout.embed,
        layout.final_norm,
        layout.unembed,
        *(f"{layout.blocks}.{i}.{p}" for i in (0, last) for p in inner),
    ]


def _fits(model: nn.Module, layout: ModelLayout) -> bool:
    try:
        blocks = get_at(model, layout.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            return False
        for path in _paths(layout, len(blocks)):
            get_at(model, path)
    except PathError:
        return False
    return True


def _unknown(model: nn.Module) -> UnknownFamilyError:
    name = original_class(model).__name__
    known = "; ".join(f"{family} ({', '.join(names)})" for family, (_, names) in FAMILIES.items())
    children = ", ".join(repr(n) for n, c in model.named_children())
    return UnknownFamilyError(
        f"torchsurgeon.methods does not know where the blocks, final norm, unembedding and "
        f"attention output projection of a {name} are (known families: {known}). Pass "
        "layout=ts.methods.ModelLayout(family=..., blocks='<ModuleList of blocks>', "
        "embed='<token embedding>', final_norm=..., unembed=..., attn='<attention, in a "
        "block>', attn_out='<attention output projection, in a block>', mlp=..., "
        "mlp_down='<MLP down-projection, in a block>', n_heads=...) explicitly. This model's "
        f"top-level children: {children}."
    )


def layout_of(model: nn.Module, layout: ModelLayout | None = None) -> ModelLayout:
    """The layout of ``model`` (``layout`` checked and completed, or found in the table).

    The result always has ``n_heads`` set. Raises :class:`UnknownFamilyError` when the family
    is unknown, and :class:`~torchsurgeon.PathError` when a given layout names a missing path.
    """
    if layout is None:
        name = original_class(model).__name__
        by_name = [lay for lay, names in FAMILIES.values() if name in names]
        candidates = by_name or [lay for lay, _ in FAMILIES.values()]
        layout = next((lay for lay in candidates if _fits(model, lay)), None)
        if layout is None:
            raise _unknown(model)
    else:
        blocks = get_at(model, layout.blocks)
        for path in _paths(layout, len(blocks)):
            get_at(model, path)  # raises PathError naming the missing segment
    if layout.n_heads is None:
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise UnknownFamilyError(
                f"cannot read the number of attention heads of this "
                f"{original_class(model).__name__} (no config.num_attention_heads); pass "
                f"layout=dataclasses.replace(layout, n_heads=...) with layout={layout!r}"
            )
        layout = dataclasses.replace(layout, n_heads=heads)
    return layout


def n_layers(model: nn.Module, layout: ModelLayout) -> int:
    """How many blocks the model has."""
    return len(get_at(model, layout.blocks))


def d_head(model: nn.Module, layout: ModelLayout) -> int:
    """The width of one head in the attention output projection's input."""
    width = in_features(get_at(model, layout.in_block(0, "attn_out")))
    heads = layout.n_heads or 0
    if heads <= 0 or width % heads:
        raise ValueError(
            f"the attention output projection takes {width} features, which do not split into "
            f"{layout.n_heads} heads; check layout.n_heads"
        )
    return width // heads


def in_features(module: nn.Module) -> int:
    """The input width of a Linear-like module (``nn.Linear``, GPT-2's ``Conv1D``)."""
    return features(module)[0]


def features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear-like module: ``nn.Linear``, GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int):  # transformers' Conv1D: weight [in, out]
        return nx, nf
    raise TypeError(
        f"{original_class(module).__name__} is not Linear-like (nn.Linear or transformers' "
        "Conv1D), so its input/output widths are unknown"
    )
