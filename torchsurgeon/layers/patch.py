"""``Patch``: copy activations from some batch rows into others, inside one forward pass.

Activation patching compares a clean and a corrupted prompt. Run both in one batch, and
``Patch(source_rows=[0], target_rows=[1])`` at a site makes row 1 see row 0's activation
there — no second pass, no cache to carry between runs. ``index`` (over the dimensions
after the batch) restricts the copy to, say, one position or one head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torchsurgeon.layers.base import InterventionLayer, register_layer
from torchsurgeon.layers.index import Index

__all__ = ["Patch"]


def _rows(name: str, value: int | Sequence[int]) -> list[int]:
    rows = [value] if isinstance(value, int) else list(value)
    if not rows or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise TypeError(f"Patch: {name} must be an int or a non-empty list of ints, got {value!r}")
    return rows


@register_layer
class Patch(InterventionLayer):
    """Copy ``x[source_rows[i], *index]`` into ``x[target_rows[i], *index]``.

    One source row may feed many targets (``Patch(0, [1, 2, 3])``).
    """

    type_name = "Patch"
    config_fields = ("source_rows", "target_rows")

    def __init__(
        self,
        source_rows: int | Sequence[int],
        target_rows: int | Sequence[int],
        index: Index | None = None,
        *,
        on: int | str | None = None,
    ) -> None:
        super().__init__(on=on, index=index)
        sources, targets = _rows("source_rows", source_rows), _rows("target_rows", target_rows)
        if len(sources) == 1:
            sources = sources * len(targets)
        if len(sources) != len(targets):
            raise ValueError(
                f"Patch: {len(sources)} source rows for {len(targets)} target rows; give one "
                "source, or one per target"
            )
        self.source_rows = sources
        self.target_rows = targets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for row in (*self.source_rows, *self.target_rows):
            if not -rows <= row < rows:
                raise IndexError(
                    f"{self._where()}row {row} is out of range for a batch of {rows} "
                    f"(tensor shape {tuple(x.shape)})"
                )
        index = self._checked_index(x[0])
        out = x.clone()
        for source, target in zip(self.source_rows, self.target_rows, strict=True):
            out[target][index] = x[source][index]
        return out
