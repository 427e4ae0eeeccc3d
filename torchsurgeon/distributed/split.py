"""Where one rank's shard sits in the full tensor, and an index over the full tensor cut to it.

Tensor parallelism splits an activation along one dimension into equal contiguous parts, one
per rank: the MLP hidden activation of a column-wise ``up``/``gate`` projection is
``[batch, pos, 9472]`` in the model and ``[batch, pos, 4736]`` on each of 2 ranks, rank 1
holding neurons ``4736..9471``. A :class:`Split` says that much: which dimension, its full
size, how many parts, which part is ours.

An edit written against the full tensor — ``SetValues(ts.idx[3:, -1, [7171, 2519]], 5.0)`` —
then has to act on the right elements of each shard. :func:`local_part` cuts an
:class:`~torchsurgeon.layers.index.Index` to one shard: neuron 7171 is local neuron 2435 on
rank 1 and is nothing on rank 0; a slice keeps the part of its range that falls in the
shard; a list keeps its local items (and the items of every list it pairs with). It also
says which dimension of ``x[index]`` runs along the split and which of its positions are
local, so a value broadcast against the indexed part (a steering vector, a mean activation,
a drawn noise) can be cut the same way with :func:`cut`. A rank that holds nothing of the
indexed part gets ``None`` and leaves its shard alone.

Everything here is arithmetic on shapes and indices — no communication, no process group —
so it is tested on one process by comparing every shard's edit, concatenated, with the edit
of the full tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from torchsurgeon.layers.index import Index

__all__ = ["LocalPart", "Split", "cut", "local_part"]


@dataclass(frozen=True)
class Split:
    """A tensor split along ``dim`` (counted from the end) into ``parts`` equal pieces.

    ``size`` is the full size of that dimension; this rank holds piece ``part``, the
    elements ``offset .. offset + width - 1``.
    """

    dim: int
    size: int
    parts: int
    part: int

    def __post_init__(self) -> None:
        if self.dim >= 0:
            raise ValueError(f"Split.dim counts from the end (-1 is the last), got {self.dim}")
        if self.parts < 1 or not 0 <= self.part < self.parts:
            raise ValueError(f"Split: part {self.part} of {self.parts} does not exist")
        if self.size % self.parts:
            raise ValueError(
                f"Split: {self.size} elements do not split into {self.parts} equal parts"
            )

    @property
    def width(self) -> int:
        """How many elements of the split dimension this rank holds."""
        return self.size // self.parts

    @property
    def offset(self) -> int:
        """The position in the full tensor of this rank's first element."""
        return self.part * self.width

    def full_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        """The full tensor's shape, given this rank's shard's."""
        if len(local) < -self.dim:
            raise ValueError(f"a tensor of shape {local} has no dimension {self.dim}")
        shape = list(local)
        shape[self.dim] = self.size
        return tuple(shape)

    def describe(self) -> str:
        last = self.offset + self.width - 1
        return (
            f"dimension {self.dim} of {self.size} split over {self.parts} ranks "
            f"(rank {self.part} holds {self.offset}..{last})"
        )


@dataclass(frozen=True)
class LocalPart:
    """An index cut to one shard.

    ``index`` indexes the shard (``None``: the whole shard, as the full index was ``None``);
    ``value_dim`` is the dimension of ``full[full_index]`` that runs along the split (``None``
    when the index picks one element of it, so the dimension is gone) and ``keep`` the
    positions along it that are local (``None``: all of them); ``shape`` is the full
    indexed part's shape, ``full[full_index].shape``.
    """

    index: Index | None
    value_dim: int | None
    keep: slice | tuple[int, ...] | None
    shape: tuple[int, ...]


def local_part(index: Index | None, shape: tuple[int, ...], split: Split) -> LocalPart | None:
    """``index`` (written for a full tensor of ``shape``) cut to this rank's shard.

    ``None`` when the shard holds no element of the indexed part. Raises ``IndexError`` as
    the full tensor would (an index that does not fit its shape).
    """
    ndim = len(shape)
    dim = split.dim % ndim
    if index is None:
        return LocalPart(None, dim, slice(split.offset, split.offset + split.width), shape)
    index.check(shape)
    entries: list[Any] = list(index.per_dimension(shape))
    entries += [slice(0, size, 1) for size in shape[len(entries) : dim + 1]]
    full = _part_shape(entries, shape)
    entry = entries[dim]
    lo, hi = split.offset, split.offset + split.width
    keep: slice | tuple[int, ...] | None
    if isinstance(entry, int):
        if not lo <= entry < hi:
            return None
        entries[dim], keep = entry - lo, None
    elif isinstance(entry, slice):
        start, stop, step = entry.start, entry.stop, entry.step
        count = len(range(start, stop, step))
        first = max(0, math.ceil((lo - start) / step))
        end = min(count, max(0, math.ceil((hi - start) / step)))
        if end <= first:
            return None
        entries[dim] = slice(start + first * step - lo, start + (end - 1) * step - lo + 1, step)
        keep = slice(first, end)
    else:
        keep = _cut_lists(entries, dim, lo, hi)
        if keep == ():
            return None
    value_dim = _value_dim(entries, dim)
    local = Index(tuple(list(e) if isinstance(e, tuple) else e for e in entries))
    return LocalPart(local, value_dim, keep, full)


def _cut_lists(entries: list[Any], dim: int, lo: int, hi: int) -> tuple[int, ...] | None:
    """Keep the local items of the list at ``dim`` and the items they pair with (in place).

    Several lists index jointly (item ``i`` of each together), a list of one item pairing
    with every item of the others. Returns the positions kept along the lists' joint
    dimension, ``()`` if none, ``None`` if all are (a one-item list, local).
    """
    lists = [i for i, e in enumerate(entries) if isinstance(e, tuple)]
    length = max(len(entries[i]) for i in lists)
    for i in lists:
        if len(entries[i]) not in (1, length):
            raise IndexError(
                f"the lists of the index have {len(entries[i])} and {length} items; lists "
                "index together, so they need the same length (or one item)"
            )
    own = entries[dim]
    if len(own) == 1:
        if not lo <= own[0] < hi:
            return ()
        entries[dim] = (own[0] - lo,)
        return None
    kept = tuple(p for p, v in enumerate(own) if lo <= v < hi)
    if kept:
        for i in lists:
            if len(entries[i]) == length:
                entries[i] = tuple(entries[i][p] for p in kept)
        entries[dim] = tuple(v - lo for v in entries[dim])
    return kept


def _part_shape(entries: list[Any], shape: tuple[int, ...]) -> tuple[int, ...]:
    """``full[entries].shape``, as PyTorch computes it (on a meta tensor: nothing allocated)."""
    meta = torch.empty(shape, device="meta")
    return tuple(meta[tuple(list(e) if isinstance(e, tuple) else e for e in entries)].shape)


def _value_dim(entries: list[Any], dim: int) -> int | None:
    """The dimension of ``x[entries]`` that dimension ``dim`` of ``x`` becomes (None: gone).

    PyTorch's rule: ints drop their dimensions first; then, if there are lists, their joint
    dimension sits where the first list was when the lists are next to each other (among
    what is left), and in front otherwise. (NumPy also counts ints as lists here; PyTorch
    does not.)
    """
    if isinstance(entries[dim], int):
        return None
    left = [i for i, e in enumerate(entries) if not isinstance(e, int)]
    lists = [i for i in left if isinstance(entries[i], tuple)]
    if not lists:
        return left.index(dim)
    positions = [left.index(i) for i in lists]
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    if not adjacent:
        return 0 if dim in lists else 1 + [i for i in left if i not in lists].index(dim)
    if dim in lists:
        return positions[0]
    position = left.index(dim)
    return position if position < positions[0] else position - len(lists) + 1


def cut(value: torch.Tensor, part: LocalPart, what: str = "value") -> torch.Tensor:
    """``value`` (broadcast against the full indexed part) cut to this rank's positions.

    A value with no dimension along the split, or one of size 1, broadcasts as it is; one
    whose dimension along the split has the full size keeps the local positions.
    """
    if part.value_dim is None or part.keep is None:
        return value
    dim = value.dim() - len(part.shape) + part.value_dim
    if dim < 0 or value.shape[dim] == 1:
        return value
    full = part.shape[part.value_dim]
    if value.shape[dim] != full:
        raise ValueError(
            f"the {what} has shape {tuple(value.shape)}, which does not broadcast against the "
            f"indexed part {part.shape} of the full tensor (its dimension {dim} has "
            f"{value.shape[dim]} elements, the part {full})"
        )
    if isinstance(part.keep, slice):
        return value.narrow(dim, part.keep.start, part.keep.stop - part.keep.start)
    keep = torch.tensor(part.keep, dtype=torch.long, device=value.device)
    return value.index_select(dim, keep)
