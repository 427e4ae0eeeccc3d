"""The conversion table: which ``transformers`` model types become explicit layers, and how.

Each family module maps one checkpoint layout (tensor names, fused or transposed weights)
and one config vocabulary onto :class:`~torchsurgeon.layers.transformer.TransformerConfig`
and :class:`~torchsurgeon.models.build.ModelWeights`. Adding a family is adding a module
here and an entry to ``FAMILIES``.
"""

from __future__ import annotations

from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.families.bert import BERT
from torchsurgeon.models.families.common import Family
from torchsurgeon.models.families.gemma import GEMMA, GEMMA2
from torchsurgeon.models.families.gpt2 import GPT2
from torchsurgeon.models.families.gpt_neox import GPT_NEOX
from torchsurgeon.models.families.llama import LLAMA, MISTRAL, QWEN2
from torchsurgeon.models.families.phi3 import PHI3

__all__ = ["FAMILIES", "Family", "family_for", "supported_architectures"]

FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (GPT2, LLAMA, MISTRAL, QWEN2, GPT_NEOX, GEMMA, GEMMA2, PHI3, BERT)
    for model_type in family.model_types
}
"""Supported families by ``transformers`` ``model_type``."""


def supported_architectures() -> list[str]:
    """The ``transformers`` classes :func:`torchsurgeon.models.convert` accepts."""
    return sorted({cls for family in FAMILIES.values() for cls in family.classes})


def family_for(model_type: str | None, architecture: str | None) -> Family:
    """The family converting ``model_type`` (checked against ``architecture`` if given)."""
    family = FAMILIES.get(model_type or "")
    if family is None or (architecture is not None and architecture not in family.classes):
        found = f"model_type {model_type!r}" + (
            f" ({architecture})" if architecture is not None else ""
        )
        raise UnsupportedArchitectureError(
            f"torchsurgeon.models cannot convert {found}. Supported model types: "
            f"{', '.join(sorted(FAMILIES))}; classes: {', '.join(supported_architectures())}. "
            "Any nn.Module still works with ts.wrap(model): selectors reach its submodules, "
            "though not the intermediates its forward keeps in local variables."
        )
    return family
