"""Where the parts of a model live, read from the one family table of ``torchsurgeon.models``.

The methods in this package are written once, against *roles* — the list of blocks, the
token embedding, the final norm, the unembedding, and inside each block the attention
module, its output projection, the MLP and its down-projection — and a
:class:`ModelLayout` says at which paths those roles sit in a given model. Per-head work
uses the *input* of the attention output projection: a ``[batch, pos, n_heads * d_head]``
tensor in which head ``h`` is the last-dimension slice ``h * d_head : (h + 1) * d_head``.
That tensor exists in every plain ``transformers`` model and in every converted one, so no
re-implementation is needed to reach heads.

The layouts come from the family table the conversions use
(:data:`torchsurgeon.models.families.FAMILIES`; the methods read it, the models never read
the methods): a ``transformers`` language model or base model gets its family's layout, by
class name; an explicit model from ``ts.load`` / ``ts.convert`` (or a rewrite of one) gets
:data:`~torchsurgeon.models.families.EXPLICIT`, the same in every family; any other model
gets the first layout whose paths all exist in it. :func:`layout_of` fills in the head
count from the model's config and checks every path. For a model none of these fit, pass
``layout=ModelLayout(...)`` to any method; the error for an unknown family says exactly
that, with the model's top-level children to start from.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from torchsurgeon.layers.transformer import Projection, Transformer
from torchsurgeon.models.families import EXPLICIT, FAMILIES, ModelLayout, family_of_class
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, PathError, SurgeryError
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import get_at

__all__ = ["FAMILIES", "ModelLayout", "UnknownFamilyError", "layout_of", "require"]


class UnknownFamilyError(SurgeryError, ValueError):
    """The model's family is not in the table and no ``layout=`` was given."""


def _paths(layout: ModelLayout, n_blocks: int) -> list[str]:
    inner = [layout.attn, layout.attn_out, layout.mlp, layout.mlp_down]
    last = n_blocks - 1
    tops = [layout.embed, layout.final_norm, layout.unembed, layout.head]
    return [
        *(p for p in tops if p is not None),
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


def _explicit(model: nn.Module) -> ModelLayout:
    """The converted model's layout, without the parts this one lacks (head, unembedding)."""
    config = model.config
    missing = {
        name: None
        for name in ("final_norm", "unembed", "head")
        if getattr(model, name, None) is None
    }
    return dataclasses.replace(EXPLICIT, family=config.family, n_heads=config.n_heads, **missing)


def _known(model: nn.Module) -> ModelLayout | None:
    cls = original_class(model)
    if issubclass(cls, Transformer):
        return _explicit(model)
    for klass in cls.__mro__:  # a subclass of LlamaForCausalLM is laid out like it
        family = family_of_class(klass.__name__)
        if family is not None:
            return family.layout_for(klass.__name__)
    return None


def _structural() -> list[ModelLayout]:
    seen: list[ModelLayout] = []
    for family in FAMILIES.values():
        for layout in (family.layout, family.layout.without_head(family.prefixes[0])):
            if layout not in seen:
                seen.append(layout)
    return seen


def _unknown(model: nn.Module) -> UnknownFamilyError:
    name = original_class(model).__name__
    known = "; ".join(
        f"{model_type} ({', '.join((*family.classes, *family.base_classes))})"
        for model_type, family in FAMILIES.items()
    )
    children = ", ".join(repr(n) for n, c in model.named_children())
    return UnknownFamilyError(
        f"torchsurgeon.methods does not know where the blocks, final norm, unembedding and "
        f"attention output projection of a {name} are (known families: {known}; and every "
        "model from ts.load / ts.convert). Pass "
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
        known = _known(model)
        candidates = [known] if known is not None else _structural()
        layout = next((lay for lay in candidates if _fits(model, lay)), None)
        if layout is None:
            raise _unknown(model)
    else:
        blocks = get_at(model, layout.blocks)
        for path in _paths(layout, len(blocks)):
            get_at(model, path)  # raises PathError naming the missing segment
    if layout.n_heads is None:
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", None))
        if not isinstance(heads, int):
            raise UnknownFamilyError(
                f"cannot read the number of attention heads of this "
                f"{original_class(model).__name__} (no config.num_attention_heads); pass "
                f"layout=dataclasses.replace(layout, n_heads=...) with layout={layout!r}"
            )
        layout = dataclasses.replace(layout, n_heads=heads)
    return layout


def require(model: nn.Module, layout: ModelLayout, role: str, method: str) -> str:
    """``layout``'s path for ``role`` (``"unembed"``, ``"final_norm"``), or a clear error.

    A base model (``GPT2Model``, a converted ``LlamaModel``) has no unembedding; a method
    that decodes the residual stream cannot run on it.
    """
    path = getattr(layout, role)
    if path is None:
        raise ArgumentError(
            f"{method} decodes the residual stream, but this {original_class(model).__name__} "
            f"is a base model without a language-model head (its layout has no {role}); use "
            "the family's language-model class (…ForCausalLM, GPT2LMHeadModel, "
            "BertForMaskedLM) or its conversion"
        )
    return path


def n_layers(model: nn.Module, layout: ModelLayout) -> int:
    """How many blocks the model has."""
    return len(get_at(model, layout.blocks))


def d_head(model: nn.Module, layout: ModelLayout) -> int:
    """The width of one head in the attention output projection's input."""
    width = in_features(get_at(model, layout.in_block(0, "attn_out")))
    heads = layout.n_heads or 0
    if heads <= 0 or width % heads:
        raise ArgumentError(
            f"the attention output projection takes {width} features, which do not split into "
            f"{layout.n_heads} heads; check layout.n_heads"
        )
    return width // heads


def in_features(module: nn.Module) -> int:
    """The input width of a Linear-like module (``nn.Linear``, ``Conv1D``, ``Projection``)."""
    found = features(module)
    if found is None:
        raise ArgumentTypeError(
            f"{original_class(module).__name__} is not Linear-like (nn.Linear, transformers' "
            "Conv1D or an explicit Projection), so its input width is unknown"
        )
    return found[0]


def features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a Linear-like module, read from its weight; ``None`` for others.

    ``nn.Linear`` and an explicit model's ``Projection`` (weight ``[out, in]``) and
    ``transformers``' ``Conv1D`` (weight ``[in, out]``, GPT-2).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Projection):
        out, inp = module.weight.shape
        return int(inp), int(out)
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int):  # transformers' Conv1D: weight [in, out]
        return nx, nf
    return None
