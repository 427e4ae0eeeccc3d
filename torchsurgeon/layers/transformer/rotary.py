"""Rotary position embeddings (RoPE) and the frequency scalings the supported families use.

Rotary embeddings encode position by rotating pairs of query and key dimensions through
angles ``position * inverse_frequency``. Two modules share the work:

- ``Rotary`` (the model's ``rotary`` site) turns position ids into the angles' cosines and
  sines, ``([batch, pos, rotary_dim], [batch, pos, rotary_dim])``, once per forward call.
- ``ApplyRotary`` (the sites ``blocks.{i}.attn.q_rot`` and ``attn.k_rot``) rotates one
  tensor ``[batch, pos, head, d_head]`` by them. Its output is TransformerLens'
  ``attn.hook_rot_q`` / ``hook_rot_k``. Only the first ``rotary_dim`` dimensions of each
  head rotate (GPT-NeoX and Phi-3 may rotate a fraction); the rest pass through.

Inverse frequencies are recomputed from :class:`RotaryConfig` at every call (a few dozen
numbers) rather than stored as a buffer, so they are always float32 and on the positions'
device, whatever dtype the model is later cast to.

Scalings (``RotaryConfig.kind``): ``"default"``; ``"linear"`` (positions divided by
``factor``); ``"llama3"`` (Llama 3.1's smooth per-frequency interpolation); ``"longrope"``
(Phi-3's per-dimension factors: the short ones while the call's largest position is within
``original_max_positions``, the long ones past it, and cosines and sines scaled by
``attention_factor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from torchsurgeon.surgery.errors import ArgumentError, closest

__all__ = ["ROTARY_KINDS", "ApplyRotary", "Rotary", "RotaryConfig", "inverse_frequencies"]

ROTARY_KINDS = ("default", "linear", "llama3", "longrope")
"""The frequency scalings :class:`RotaryConfig` supports."""


@dataclass(frozen=True)
class RotaryConfig:
    """What a family's rotary embedding needs: the rotated width, the base and a scaling."""

    dim: int
    """Rotated dimensions per head (``d_head`` unless the family rotates a fraction)."""
    theta: float
    """The base of the geometric frequency sequence (``rope_theta``)."""
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0
    """Scale of the cosines and sines (``longrope``; 1 for the other kinds)."""

    def __post_init__(self) -> None:
        if self.kind not in ROTARY_KINDS:
            near = closest(str(self.kind), ROTARY_KINDS, n=1)[0]
            raise ArgumentError(
                f"RotaryConfig.kind: unknown rotary scaling {self.kind!r}; did you mean {near!r}? "
                f"Known: {ROTARY_KINDS}"
            )
        if self.dim <= 0 or self.dim % 2:
            raise ArgumentError(f"RotaryConfig.dim must be a positive even number, got {self.dim}")
        if self.kind in ("llama3", "longrope") and self.original_max_positions is None:
            raise ArgumentError(
                f"RotaryConfig.original_max_positions: {self.kind} rotary scaling needs it (the "
                "context length the model was trained with)"
            )
        if self.kind == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.dim // 2:
                    raise ArgumentError(
                        f"RotaryConfig.{name}: longrope needs {self.dim // 2} values (dim // 2)"
                    )


def inverse_frequencies(
    config: RotaryConfig, device: torch.device | None = None, *, long: bool = False
) -> torch.Tensor:
    """The ``dim // 2`` inverse frequencies (float32); ``long`` picks longrope's long set."""
    exponents = torch.arange(0, config.dim, 2, dtype=torch.int64, device=device).float()
    base = config.theta ** (exponents / config.dim)
    if config.kind == "longrope":
        factors = config.long_factor if long else config.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base)
    inv_freq = 1.0 / base
    if config.kind == "linear":
        return inv_freq / config.factor
    if config.kind == "llama3":
        return _llama3(config, inv_freq)
    return inv_freq


def _llama3(config: RotaryConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    # Long wavelengths are interpolated by ``factor``, short ones kept, and the band between
    # blends the two linearly in ``context / wavelength``.
    context = config.original_max_positions
    assert context is not None
    low_freq_wavelength = context / config.low_freq_factor
    high_freq_wavelength = context / config.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / config.factor, inv_freq)
    smooth = (context / wavelength - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor
    )
    blended = (1 - smooth) * scaled / config.factor + smooth * scaled
    in_band = ~(wavelength < high_freq_wavelength) * ~(wavelength > low_freq_wavelength)
    return torch.where(in_band, blended, scaled)


class Rotary(nn.Module):
    """Cosines and sines of the rotation angles for given position ids."""

    def __init__(self, config: RotaryConfig) -> None:
        super().__init__()
        self.config = config

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[batch, pos, dim]`` in ``dtype``, for ``position_ids``."""
        config = self.config
        inv_freq = inverse_frequencies(config, position_ids.device)
        if config.kind == "longrope":
            assert config.original_max_positions is not None
            beyond = position_ids.max() + 1 > config.original_max_positions
            long_freq = inverse_frequencies(config, position_ids.device, long=True)
            inv_freq = torch.where(beyond, long_freq, inv_freq)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos() * config.attention_factor
        sin = angles.sin() * config.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def extra_repr(self) -> str:
        config = self.config
        return f"dim={config.dim}, theta={config.theta:g}, kind={config.kind!r}"


class ApplyRotary(nn.Module):
    """Rotate the first ``cos.shape[-1]`` dimensions of each head of ``x``."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[batch, pos, head, d_head]``; ``cos``/``sin`` are ``[batch, pos, dim]``."""
        dim = cos.shape[-1]
        cos = cos.unsqueeze(2)
        sin = sin.unsqueeze(2)
        rotated, passed = x[..., :dim], x[..., dim:]
        first, second = rotated[..., : dim // 2], rotated[..., dim // 2 :]
        turned = torch.cat((-second, first), dim=-1)
        out = rotated * cos + turned * sin
        return torch.cat((out, passed), dim=-1) if passed.shape[-1] else out
