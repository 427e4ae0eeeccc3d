"""Convert an in-memory ``transformers`` model into explicit layers, sharing its tensors.

``convert(hf_model)`` builds the explicit model around the very parameter tensors of
``hf_model``: same storage, no copy (fused or transposed weights become views). The two
models therefore stay in step — an in-place edit of one shows in the other — and converting
costs no memory beyond the module objects. The original is not modified.

The converted root records the identity of ``hf_model`` (its class, config and weight
fingerprint, :data:`~torchsurgeon.models.families.paths.SOURCE`), so a plan built on the
wrapped ``hf_model`` translates onto the conversion (``ts.paths(converted).translate``).
"""

from __future__ import annotations

from torch import nn

from torchsurgeon.layers.transformer import Transformer
from torchsurgeon.models.build import build_transformer
from torchsurgeon.models.families import family_for, family_of_class
from torchsurgeon.models.families.paths import SOURCE
from torchsurgeon.models.source import TensorSource
from torchsurgeon.plans.identity import identity_of
from torchsurgeon.surgery.errors import ArgumentTypeError
from torchsurgeon.surgery.frozen import original_class

__all__ = ["convert"]


def convert(hf_model: nn.Module) -> Transformer:
    """The explicit-layer version of ``hf_model``, sharing every parameter tensor with it.

    ``hf_model`` is a ``transformers`` model of a supported family: a language model
    (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertForMaskedLM``), which converts to a
    model returning logits, or a base model (``LlamaModel``, ``GPT2Model``, ``BertModel``),
    which converts to one returning its last hidden state (BERT with a pooler: an
    :class:`~torchsurgeon.layers.transformer.EncoderOutput`). Raises
    :class:`~torchsurgeon.models.errors.UnsupportedArchitectureError` for any other model;
    ``ts.wrap(model)`` works on those.

    Args:
        hf_model: The ``transformers`` model (plain or wrapped by ``ts.wrap``).
    """
    if not isinstance(hf_model, nn.Module):
        raise ArgumentTypeError(
            f"ts.convert(hf_model): expects a transformers model, got {type(hf_model).__name__}"
        )
    hf_config = getattr(hf_model, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    # The first class in the MRO that a family names (a user subclass of LlamaForCausalLM
    # converts like LlamaForCausalLM); the model's own class name if none does.
    names = [cls.__name__ for cls in original_class(hf_model).__mro__]
    name = next((n for n in names if family_of_class(n) is not None), names[0])
    family = family_for(model_type, name)
    assert family.config is not None and family.weights is not None  # family_for checked
    tensors = dict(hf_model.named_parameters(remove_duplicate=False))
    tensors.update(hf_model.named_buffers(remove_duplicate=False))
    config = family.config(hf_config)
    source = TensorSource(
        tensors, tensors.__getitem__, where=type(hf_model).__name__, prefixes=family.prefixes
    )
    model = build_transformer(config, family.weights(config, source, name in family.classes))
    model.__dict__[SOURCE] = identity_of(hf_model)  # rewrites copy the root's attributes
    return model
