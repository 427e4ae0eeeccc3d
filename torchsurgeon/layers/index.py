"""Serializable tensor indices: ``ts.idx[3:, -1, [7171, 2519]]``.

Intervention layers often act on part of a tensor — batch rows 3 on, the last position,
three neurons. Writing that as a Python index is natural, but a plan must carry it as data,
so ``ts.idx[...]`` records the index as an :class:`Index` value: a tuple of ints (negative
counts from the end), slices of ints, lists of ints and at most one ``...``. It indexes a
tensor exactly as the same expression would in PyTorch (several lists index jointly, as in
PyTorch), checks itself against a tensor's shape with a message that names the offending
dimension, and round-trips through JSON.

An index is applied on every call of the layer that holds it — once per generated token in
``generate`` — so :meth:`Index.for_tensor` does the work once per tensor shape and device:
the check against the shape, and turning each list into the index tensor PyTorch would
otherwise build from it on every call. The index is immutable, so what it cached can never
go stale; under ``torch.compile`` nothing is cached (the graph holds the index instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, OutOfRangeError

__all__ = ["Index", "IndexBuilder", "as_index", "idx"]

_MAX_CACHED = 8
"""Shapes remembered per index (a sweep of prompt lengths must not grow without bound)."""

Entry = int | slice | tuple[int, ...] | type(Ellipsis)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(position: int, entry: Any) -> Entry:
    if _is_int(entry) or entry is Ellipsis:
        return entry
    if isinstance(entry, slice):
        for part in ("start", "stop", "step"):
            value = getattr(entry, part)
            if value is not None and not _is_int(value):
                raise ArgumentTypeError(
                    f"ts.idx: entry {position} is a slice whose {part} is {value!r}; slice "
                    "bounds must be ints or empty"
                )
        if entry.step is not None and entry.step <= 0:
            raise ArgumentError(
                f"ts.idx: entry {position} has slice step {entry.step}; it must be > 0"
            )
        return entry
    if isinstance(entry, (list, tuple)) or type(entry).__name__ == "Tensor":
        values = entry.tolist() if type(entry).__name__ == "Tensor" else list(entry)
        if not values or not all(_is_int(v) for v in values):
            raise ArgumentTypeError(
                f"ts.idx: entry {position} is {entry!r}; a list entry must be a non-empty list "
                "of ints"
            )
        return tuple(values)
    raise ArgumentTypeError(
        f"ts.idx: entry {position} is {type(entry).__name__} ({entry!r}); use ints, slices of "
        "ints, lists of ints, or ..."
    )


@dataclass(frozen=True)
class Index:
    """A tensor index as data; ``tensor[index.torch]`` applies it."""

    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        checked = tuple(_check_entry(i, e) for i, e in enumerate(self.entries))
        if sum(e is Ellipsis for e in checked) > 1:
            raise ArgumentError("ts.idx: an index can have at most one '...'")
        object.__setattr__(self, "entries", checked)
        # Not a dataclass field: equality, hashing and repr ignore it.
        object.__setattr__(self, "_for_shape", {})

    @property
    def torch(self) -> tuple[Any, ...]:
        """The index in the form PyTorch's ``__getitem__``/``__setitem__`` take."""
        return tuple(list(e) if isinstance(e, tuple) else e for e in self.entries)

    def for_tensor(self, x: torch.Tensor, where: str | Callable[[], str] = "") -> tuple[Any, ...]:
        """:attr:`torch`, checked against ``x``'s shape, lists as index tensors on its device.

        ``where`` (a string, or a function making one, called only on an error) starts the
        message of the ``IndexError`` raised when the index does not fit.
        """
        if torch.compiler.is_compiling():
            self.check(tuple(x.shape), where if isinstance(where, str) else where())
            return self.torch
        key = (tuple(x.shape), x.device)
        found = self._for_shape.get(key)
        if found is None:
            self.check(key[0], where if isinstance(where, str) else where())
            # A plain tensor even inside inference mode: autograd saves index tensors for
            # backward, and an inference tensor cannot be saved.
            with torch.inference_mode(False):
                found = tuple(
                    torch.tensor(e, dtype=torch.long, device=x.device)
                    if isinstance(e, tuple)
                    else e
                    for e in self.entries
                )
            remember(self._for_shape, key, found)
        return found

    def per_dimension(self, shape: tuple[int, ...]) -> tuple[int | slice | tuple[int, ...], ...]:
        """One entry per dimension this index names in ``shape``, ``...`` written out.

        Ints and list items count from the start (``-1`` becomes ``size - 1``) and slices
        have explicit bounds (``slice.indices``); the dimensions after the last entry, which
        the index leaves whole, are not listed. Call :meth:`check` first.
        """
        consumed = len(self.entries) - (Ellipsis in self.entries)
        out: list[int | slice | tuple[int, ...]] = []
        for entry in self.entries:
            if entry is Ellipsis:
                for size in shape[len(out) : len(out) + len(shape) - consumed]:
                    out.append(slice(*slice(None).indices(size)))
                continue
            size = shape[len(out)]
            if isinstance(entry, slice):
                out.append(slice(*entry.indices(size)))
            elif isinstance(entry, tuple):
                out.append(tuple(v % size for v in entry))
            else:
                out.append(entry % size)
        return tuple(out)

    def check(self, shape: tuple[int, ...], where: str = "") -> None:
        """Raise ``OutOfRangeError`` (an ``IndexError``) naming the dimension if this index does
        not fit ``shape``."""
        consumed = len(self.entries) - (Ellipsis in self.entries)
        if consumed > len(shape):
            raise OutOfRangeError(
                f"{where}index {self} has {consumed} dimension entries but the tensor has shape "
                f"{tuple(shape)} ({len(shape)} dimensions)"
            )
        dim = 0
        for entry in self.entries:
            if entry is Ellipsis:
                dim += len(shape) - consumed
                continue
            size = shape[dim]
            bad = [v for v in (entry if isinstance(entry, tuple) else (entry,)) if _is_int(v)]
            bad = [v for v in bad if not -size <= v < size]
            if bad:
                raise OutOfRangeError(
                    f"{where}index {self} does not fit tensor of shape {tuple(shape)}: "
                    f"dimension {dim} has size {size}, so {bad[0]} is out of range "
                    f"(valid: {-size}..{size - 1})"
                )
            dim += 1

    def to_json(self) -> list[Any]:
        out: list[Any] = []
        for e in self.entries:
            if e is Ellipsis:
                out.append("...")
            elif isinstance(e, slice):
                out.append({"slice": [e.start, e.stop, e.step]})
            elif isinstance(e, tuple):
                out.append({"list": list(e)})
            else:
                out.append(e)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Index:
        if not isinstance(data, list):
            raise ArgumentError(f"an index is a JSON list, got {type(data).__name__}")
        entries: list[Any] = []
        for i, item in enumerate(data):
            if item == "...":
                entries.append(Ellipsis)
            elif isinstance(item, dict) and set(item) == {"slice"} and len(item["slice"]) == 3:
                entries.append(slice(*item["slice"]))
            elif (
                isinstance(item, dict) and set(item) == {"list"} and isinstance(item["list"], list)
            ):
                entries.append(item["list"])
            elif _is_int(item):
                entries.append(item)
            else:
                raise ArgumentError(
                    f"index entry {i} is not an int, slice, list or '...': {item!r}"
                )
        return cls(tuple(entries))

    def __str__(self) -> str:
        def show(e: Entry) -> str:
            if e is Ellipsis:
                return "..."
            if isinstance(e, slice):
                text = f"{'' if e.start is None else e.start}:{'' if e.stop is None else e.stop}"
                return text + (f":{e.step}" if e.step is not None else "")
            return str(list(e)) if isinstance(e, tuple) else str(e)

        return "[" + ", ".join(show(e) for e in self.entries) + "]"


class IndexBuilder:
    """``ts.idx[...]`` turns a Python index expression into an :class:`Index`."""

    def __getitem__(self, key: Any) -> Index:
        return Index(key if isinstance(key, tuple) else (key,))

    def __repr__(self) -> str:
        return "ts.idx"


idx = IndexBuilder()


def remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """``cache[key] = value``, first emptying a cache that holds :data:`_MAX_CACHED` keys.

    Each step is one dict operation, so threads sharing a layer at worst recompute.
    """
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


def as_index(value: Index | None) -> Index | None:
    """Accept an :class:`Index` or None; anything else gets a message pointing to ``ts.idx``."""
    if value is None or isinstance(value, Index):
        return value
    raise ArgumentTypeError(
        f"expected an index built with ts.idx[...] (e.g. ts.idx[:, -1]), got {value!r}"
    )
