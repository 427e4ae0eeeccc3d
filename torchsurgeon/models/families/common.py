"""What the family mappings share: reading rotary settings, cutting heads, the family record.

A :class:`Family` is one entry of the one family table, read by the conversions
(:mod:`torchsurgeon.models`) and by the research methods (:mod:`torchsurgeon.methods`)
alike: the ``transformers`` model types it covers, its language-model classes and its base
(headless) classes, the checkpoint prefixes it looks under, where its parts sit in the
``transformers`` model (a :class:`~torchsurgeon.models.families.layout.ModelLayout`), and
two functions — the config translation and the weight mapping — or ``None`` for a family
the methods know but no conversion covers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchsurgeon.layers.transformer import RotaryConfig, TransformerConfig
from torchsurgeon.layers.transformer.rotary import ROTARY_KINDS
from torchsurgeon.models.build import Linear, ModelWeights
from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.families.layout import ModelLayout
from torchsurgeon.models.source import TensorSource

__all__ = [
    "Family",
    "HFConfig",
    "Weights",
    "head_bias",
    "head_rows",
    "norm",
    "refuse",
    "rotary_config",
    "setting",
]

HFConfig = Any  # a transformers PretrainedConfig; typed loosely to keep imports light
Weights = Callable[[TransformerConfig, TensorSource, bool], ModelWeights]
"""``weights(config, source, with_head)``: the tensors; ``with_head=False`` for a base model."""


@dataclass(frozen=True)
class Family:
    """One family of ``transformers`` models: its classes, its layout, its conversion."""

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    """Language-model classes (with an unembedding): ``LlamaForCausalLM``."""
    base_classes: tuple[str, ...]
    """Base-model classes (no head; they return hidden states): ``LlamaModel``."""
    prefixes: tuple[str, ...]
    """Where the base model sits in the LM class (``"model."``), then ``""`` (itself)."""
    layout: ModelLayout
    """The parts' paths in the language-model class."""
    config: Callable[[HFConfig], TransformerConfig] | None = None
    weights: Weights | None = None

    @property
    def converts(self) -> bool:
        """Whether :func:`torchsurgeon.models.convert` / ``load`` build this family."""
        return self.config is not None and self.weights is not None

    def layout_for(self, class_name: str) -> ModelLayout | None:
        """The layout of ``class_name`` (an LM or base class of this family), else None."""
        if class_name in self.classes:
            return self.layout
        if class_name in self.base_classes:
            return self.layout.without_head(self.prefixes[0])
        return None


def setting(hf_config: HFConfig, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``hf_config`` sets to something other than ``None``."""
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default


def refuse(family: str, what: str) -> UnsupportedArchitectureError:
    """An error for a config feature that this family's conversion does not cover."""
    return UnsupportedArchitectureError(
        f"{family}: {what} is not supported by torchsurgeon's explicit layers. "
        "ts.wrap(model) still works on the transformers model itself."
    )


def rotary_config(hf_config: HFConfig, d_head: int, family: str) -> RotaryConfig:
    """The rotary settings of ``hf_config`` (``rope_parameters``, or older spellings)."""
    params: dict[str, Any] = dict(setting(hf_config, "rope_parameters", "rope_scaling", default={}))
    if params and all(isinstance(v, dict) for v in params.values()):
        raise refuse(family, "per-layer-type rope_parameters")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROTARY_KINDS:
        raise refuse(family, f"rope_type {kind!r} (supported: {', '.join(ROTARY_KINDS)})")
    theta = params.get("rope_theta") or setting(hf_config, "rope_theta", default=10000.0)
    partial = params.get("partial_rotary_factor") or setting(
        hf_config, "partial_rotary_factor", "rotary_pct", default=1.0
    )
    original = params.get("original_max_position_embeddings") or setting(
        hf_config, "original_max_position_embeddings"
    )
    if kind in ("llama3", "longrope") and original is None:
        raise refuse(family, f"rope_type {kind!r} without original_max_position_embeddings")
    factor = params.get("factor")
    attention_factor = 1.0
    short_factor = long_factor = None
    if kind == "longrope":
        if factor is None:
            factor = hf_config.max_position_embeddings / original
        attention_factor = params.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
        short_factor = tuple(float(f) for f in params["short_factor"])
        long_factor = tuple(float(f) for f in params["long_factor"])
    return RotaryConfig(
        dim=int(d_head * partial),
        theta=float(theta),
        kind=kind,
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=original,
        short_factor=short_factor,
        long_factor=long_factor,
        attention_factor=float(attention_factor),
    )


def head_rows(weight: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    """``[n_heads * d_head, d_model]`` rows as a ``[n_heads, d_head, d_model]`` view."""
    return weight.unflatten(0, (n_heads, d_head))


def head_bias(bias: torch.Tensor | None, n_heads: int, d_head: int) -> torch.Tensor | None:
    """``[n_heads * d_head]`` as a ``[n_heads, d_head]`` view (``None`` stays ``None``)."""
    return bias.unflatten(0, (n_heads, d_head)) if bias is not None else None


def norm(source: TensorSource, name: str, d_model: int, *, bias: bool) -> Linear:
    """A norm's scale (``name.weight``) and, where it has one, shift (``name.bias``)."""
    return Linear(
        source.take(f"{name}.weight", (d_model,)),
        source.take(f"{name}.bias", (d_model,)) if bias else None,
    )
