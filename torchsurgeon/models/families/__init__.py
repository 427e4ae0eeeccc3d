"""The family table: one entry per family of ``transformers`` models, read by everyone.

Each :class:`Family` says which ``transformers`` model types and classes it covers (the
language-model classes and the base, headless ones), where its parts sit in the
``transformers`` model (a :class:`ModelLayout`, read by :mod:`torchsurgeon.methods`), and
how to convert it to explicit layers: a config translation onto
:class:`~torchsurgeon.layers.transformer.TransformerConfig` and a weight mapping onto
:class:`~torchsurgeon.models.build.ModelWeights`. A converted model has one layout whatever
its family (:data:`EXPLICIT`). Adding a family is adding a module here and an entry to
``FAMILIES``.

Qwen3 and OLMo are laid out like Llama but have parts the explicit layers lack (Qwen3's
query/key norms, OLMo's weightless LayerNorm): they are here for the methods, which read
them wrapped, and :func:`family_for` refuses to convert them, saying so.
"""

from __future__ import annotations

from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.families.bert import BERT
from torchsurgeon.models.families.common import Family
from torchsurgeon.models.families.gemma import GEMMA, GEMMA2
from torchsurgeon.models.families.gpt2 import GPT2
from torchsurgeon.models.families.gpt_neox import GPT_NEOX
from torchsurgeon.models.families.layout import EXPLICIT, ModelLayout
from torchsurgeon.models.families.llama import LLAMA, MISTRAL, OLMO, QWEN2, QWEN3
from torchsurgeon.models.families.phi3 import PHI3

__all__ = [
    "EXPLICIT",
    "FAMILIES",
    "Family",
    "ModelLayout",
    "family_for",
    "family_of_class",
    "supported_architectures",
]

FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (GPT2, LLAMA, MISTRAL, QWEN2, GPT_NEOX, GEMMA, GEMMA2, PHI3, BERT, QWEN3, OLMO)
    for model_type in family.model_types
}
"""Every family by ``transformers`` ``model_type`` (``family.converts`` says which convert)."""


def supported_architectures() -> list[str]:
    """The ``transformers`` classes :func:`torchsurgeon.models.convert` accepts."""
    return sorted(
        cls
        for family in FAMILIES.values()
        if family.converts
        for cls in (*family.classes, *family.base_classes)
    )


def family_of_class(class_name: str) -> Family | None:
    """The family naming ``class_name`` as one of its LM or base classes, if any."""
    return next((f for f in FAMILIES.values() if class_name in (*f.classes, *f.base_classes)), None)


def _convertible() -> str:
    return "; ".join(
        f"{model_type} ({', '.join((*family.classes, *family.base_classes))})"
        for model_type, family in FAMILIES.items()
        if family.converts
    )


def family_for(model_type: str | None, architecture: str | None) -> Family:
    """The family converting ``model_type`` as ``architecture`` (any of its classes if None).

    Raises :class:`UnsupportedArchitectureError` listing what converts: a model type no
    family converts, or a class its family does not cover (another task's head).
    """
    family = FAMILIES.get(model_type or "")
    found = f"model_type {model_type!r}" + (f" ({architecture})" if architecture else "")
    wrap = (
        " Any nn.Module still works with ts.wrap(model): selectors reach its submodules, "
        "though not the intermediates its forward keeps in local variables."
    )
    if family is None:
        problem = "torchsurgeon.models has no conversion for this model type"
    elif not family.converts:
        problem = (
            f"torchsurgeon.models has no conversion for {family.name} (ts.methods know its "
            "layout and work on it wrapped)"
        )
    elif architecture is not None and architecture not in (
        *family.classes,
        *family.base_classes,
    ):
        accepted = ", ".join((*family.classes, *family.base_classes))
        problem = (
            f"{family.name} converts as {accepted} only (a language model or the base model), "
            f"not as {architecture}"
        )
    else:
        return family
    raise UnsupportedArchitectureError(
        f"cannot convert {found}: {problem}. Convertible model types (classes): "
        f"{_convertible()}.{wrap}"
    )
