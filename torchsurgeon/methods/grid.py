"""``EffectGrid``: the one result shape most methods share — a labelled 2-d table of effects.

Activation patching, attribution patching, causal tracing and head knockout all answer the
same kind of question — *how much does the metric move when this site is changed?* — for a
grid of sites: layer x position, or layer x head. They all return an :class:`EffectGrid`:
the values, the labels of both axes, what the values measure, and the metric on the clean
and corrupted runs, so a grid can be normalised, ranked, compared with another grid or
handed to :func:`torchsurgeon.methods.plots.heatmap` as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchsurgeon.surgery.errors import ArgumentError

__all__ = ["EffectGrid"]


@dataclass(frozen=True)
class EffectGrid:
    """``values[row, col]``: the effect at one site, e.g. layer x position or layer x head.

    ``measure`` says what a value is (``"metric(patched) - metric(corrupted)"``);
    ``clean_metric`` and ``corrupted_metric`` are the metric without intervention on the
    clean and corrupted inputs (``None`` where a method has no such pair).
    """

    values: torch.Tensor
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    row_name: str
    col_name: str
    title: str
    measure: str
    clean_metric: float | None = None
    corrupted_metric: float | None = None

    def __post_init__(self) -> None:
        shape = (len(self.row_labels), len(self.col_labels))
        if self.values.dim() != 2 or tuple(self.values.shape) != shape:
            raise ArgumentError(
                f"EffectGrid: values have shape {tuple(self.values.shape)} but the labels "
                f"give {shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_labels), len(self.col_labels))

    def normalized(self) -> torch.Tensor:
        """``values / (clean_metric - corrupted_metric)``: 1 = the site restores it all."""
        if self.clean_metric is None or self.corrupted_metric is None:
            raise ArgumentError(f"{self.title}: no clean/corrupted metric to normalise by")
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0:
            raise ArgumentError(f"{self.title}: the clean and corrupted metrics are equal ({gap})")
        return self.values / gap

    def top(self, k: int = 5, *, by_magnitude: bool = False) -> list[tuple[str, str, float]]:
        """The ``k`` largest entries as ``(row label, col label, value)``, largest first."""
        flat = self.values.flatten()
        order = torch.argsort(flat.abs() if by_magnitude else flat, descending=True)[:k]
        cols = len(self.col_labels)
        return [
            (self.row_labels[i // cols], self.col_labels[i % cols], float(flat[i]))
            for i in order.tolist()
        ]

    def argmax(self) -> tuple[int, int]:
        """``(row, col)`` of the largest value."""
        i = int(torch.argmax(self.values))
        return divmod(i, len(self.col_labels))
