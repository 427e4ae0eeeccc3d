"""Layers that write: set, add, scale, zero, mean-ablate, noise, or cut the gradient.

Each returns a new tensor (the input is cloned before any in-place write, so an activation
another module still holds is never changed) and, given ``index=ts.idx[...]``, acts only on
that part of the tensor. Values broadcast against the indexed part, as in PyTorch.
"""

from __future__ import annotations

import torch

from torchsurgeon.layers.base import InterventionLayer, register_layer
from torchsurgeon.layers.index import Index

__all__ = ["Add", "MeanAblate", "Noise", "Scale", "SetValues", "StopGradient", "Zero"]


@register_layer
class SetValues(InterventionLayer):
    """Set ``tensor[index]`` to ``value`` (a number or a tensor broadcast to the part)."""

    type_name = "SetValues"
    tensor_fields = ("value",)

    def __init__(
        self,
        index: Index | None,
        value: float | torch.Tensor,
        *,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        self._set_tensor("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._checked_index(x)
        out = x.clone()
        out[index] = self.value.to(out.dtype)
        return out


@register_layer
class Add(InterventionLayer):
    """Add ``scale * vector`` (a steering vector) to the tensor, or to ``tensor[index]``."""

    type_name = "Add"
    tensor_fields = ("vector", "scale")

    def __init__(
        self,
        vector: torch.Tensor,
        scale: float | torch.Tensor = 1.0,
        *,
        index: Index | None = None,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        if not isinstance(vector, torch.Tensor):
            raise TypeError(f"Add: vector must be a tensor, got {type(vector).__name__}")
        self._set_tensor("vector", vector)
        self._set_tensor("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.scale * self.vector).to(x.dtype)
        if self.index is None:
            return x + delta
        index = self._checked_index(x)
        out = x.clone()
        out[index] = out[index] + delta
        return out


@register_layer
class Scale(InterventionLayer):
    """Multiply the tensor (or ``tensor[index]``) by ``factor``."""

    type_name = "Scale"
    tensor_fields = ("factor",)

    def __init__(
        self,
        factor: float | torch.Tensor,
        *,
        index: Index | None = None,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        self._set_tensor("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.factor.to(x.dtype)
        if self.index is None:
            return x * factor
        index = self._checked_index(x)
        out = x.clone()
        out[index] = out[index] * factor
        return out


@register_layer
class Zero(InterventionLayer):
    """Zero the tensor, or ``tensor[index]`` (zero ablation)."""

    type_name = "Zero"

    def __init__(self, index: Index | None = None, *, on: int | str | None = None) -> None:
        super().__init__(on=on, index=index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return torch.zeros_like(x)
        index = self._checked_index(x)
        out = x.clone()
        out[index] = 0
        return out


@register_layer
class MeanAblate(InterventionLayer):
    """Replace the tensor (or ``tensor[index]``) by ``mean``, e.g. a dataset mean activation."""

    type_name = "MeanAblate"
    tensor_fields = ("mean",)

    def __init__(
        self,
        mean: torch.Tensor,
        *,
        index: Index | None = None,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        if not isinstance(mean, torch.Tensor):
            raise TypeError(f"MeanAblate: mean must be a tensor, got {type(mean).__name__}")
        self._set_tensor("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._checked_index(x)
        out = x.clone()
        out[index] = self.mean.to(out.dtype)
        return out


@register_layer
class Noise(InterventionLayer):
    """Add Gaussian noise of standard deviation ``std`` (causal tracing's corruption).

    The noise is drawn from a generator seeded with ``seed`` at every call, so the same
    tensor shape gets the same noise in every run: corrupted runs are reproducible.
    """

    type_name = "Noise"
    config_fields = ("std", "seed")

    def __init__(
        self,
        std: float,
        seed: int = 0,
        *,
        index: Index | None = None,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not std >= 0:
            raise ValueError(f"Noise: std must be a number >= 0, got {std!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Noise: seed must be an int, got {seed!r}")
        self.std = float(std)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._checked_index(x)
        if x.is_meta:  # a structure-only run checks shapes; there is no generator on meta
            return x.clone()
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.seed)
        part = x[index]
        noise = torch.randn(part.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = x.clone()
        out[index] = part + self.std * noise
        return out


@register_layer
class StopGradient(InterventionLayer):
    """Pass the tensor through with no gradient flowing back (``detach``)."""

    type_name = "StopGradient"
    takes_index = False

    def __init__(self, *, on: int | str | None = None) -> None:
        super().__init__(on=on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()
