"""``Patch``: copy activations from some batch rows into others, inside one forward pass.

Activation patching compares a clean and a corrupted prompt. Run both in one batch, and
``Patch(source_rows=[0], target_rows=[1])`` at a site makes row 1 see row 0's activation
there — no second pass, no cache to carry between runs. ``index`` (over the dimensions
after the batch) restricts the copy to, say, one position or one head.

A sweep patches many sites of one module at once, each into its own rows and at its own
position: ``Patch.table([(0, [2], ts.idx[0]), (0, [3], ts.idx[1]), ...])`` is one layer
doing all of them — one copy of the activation and one indexed assignment per call, where
a layer per site would copy the whole activation once per site. Within one layer every
target row takes its values from a single source row (several entries may write one target
row only if they name the same source), and every copy reads the activation as the layer
received it, so the order of the entries never matters.

How the copy runs: for each activation shape the layer works out, once, index tensors that
pair every target element with its source element (entries whose indices differ only in an
int or in a slice's offset share one assignment) and keeps them per shape and device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from torchsurgeon.layers.base import InterventionLayer, Steps, register_layer, steps_from_json
from torchsurgeon.layers.index import Index, as_index, remember
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, OutOfRangeError

__all__ = ["Patch"]

Rows = int | Sequence[int]
Entry = tuple[tuple[int, ...], tuple[int, ...], Index | None]
"""One entry of a table: source rows, target rows (as many), and the index or None."""

_ENTRY_KEYS = ("source_rows", "target_rows", "index")


def _rows(name: str, value: Rows) -> list[int]:
    try:
        rows = [value] if isinstance(value, int) else list(value)
    except TypeError:  # not iterable
        rows = []
    if not rows or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise ArgumentTypeError(
            f"Patch: {name} must be an int or a non-empty list of ints, got {value!r}"
        )
    return rows


def _entry(source_rows: Rows, target_rows: Rows, index: Index | None, where: str = "") -> Entry:
    sources, targets = _rows("source_rows", source_rows), _rows("target_rows", target_rows)
    if len(sources) == 1:
        sources = sources * len(targets)
    if len(sources) != len(targets):
        raise ArgumentError(
            f"Patch{where}: {len(sources)} source rows for {len(targets)} target rows; give one "
            "source, or one per target"
        )
    return tuple(sources), tuple(targets), as_index(index)


def _one_source_per_target(pairs: Iterable[tuple[int, int]], where: str) -> None:
    """Refuse a target row fed by two different source rows (the result would be ambiguous)."""
    source_of: dict[int, int] = {}
    for source, target in pairs:
        if source_of.setdefault(target, source) != source:
            raise ArgumentError(
                f"{where}target row {target} is given both row {source_of[target]} and row "
                f"{source}; in one Patch each target row takes one source row. Patch the two "
                "parts with two Patch layers inserted one after the other"
            )


@register_layer
class Patch(InterventionLayer):
    """Copy ``x[source_rows[i], *index]`` into ``x[target_rows[i], *index]``.

    One source row may feed many targets (``Patch(0, [1, 2, 3])``). :meth:`table` builds
    one layer from many ``(source_rows, target_rows, index)`` entries.
    """

    type_name = "Patch"
    config_fields = ("source_rows", "target_rows")

    def __init__(
        self,
        source_rows: Rows | None = None,
        target_rows: Rows | None = None,
        index: Index | None = None,
        *,
        table: Sequence[tuple[Rows, Rows, Index | None]] | None = None,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        if table is None:
            if source_rows is None or target_rows is None:
                raise ArgumentTypeError(
                    "Patch needs source_rows and target_rows (Patch(0, [1, 2])), or a table "
                    "(Patch.table([(0, [1], ts.idx[3]), ...]))"
                )
            super().__init__(on=on, index=index, steps=steps)
            entries = (_entry(source_rows, target_rows, index),)
            self.source_rows: list[int] | None = list(entries[0][0])
            self.target_rows: list[int] | None = list(entries[0][1])
        else:
            if source_rows is not None or target_rows is not None or index is not None:
                raise ArgumentTypeError(
                    "Patch: give either source_rows/target_rows/index or table=, not both"
                )
            if isinstance(table, (str, bytes)) or not isinstance(table, Sequence) or not table:
                raise ArgumentTypeError(
                    "Patch: table must be a non-empty list of (source_rows, target_rows, "
                    f"index) entries, got {table!r}"
                )
            super().__init__(on=on, steps=steps)
            entries = tuple(self._table_entry(i, e) for i, e in enumerate(table))
            self.source_rows = self.target_rows = None
        _one_source_per_target(
            (
                (s, t)
                for sources, targets, _ in entries
                for s, t in zip(sources, targets, strict=True)
                if s >= 0 and t >= 0
            ),
            "Patch: ",
        )
        self.entries: tuple[Entry, ...] = entries
        self.is_table = table is not None
        self._ts_copies: dict[Any, Any] = {}

    @staticmethod
    def _table_entry(i: int, entry: Any) -> Entry:
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise ArgumentTypeError(
                f"Patch: table entry {i} must be (source_rows, target_rows, index), got {entry!r}"
            )
        return _entry(*entry, where=f" table entry {i}")

    @classmethod
    def table(
        cls, entries: Sequence[tuple[Rows, Rows, Index | None]], *, on: int | str | None = None
    ) -> Patch:
        """One layer doing every ``(source_rows, target_rows, index)`` copy of ``entries``."""
        return cls(table=entries, on=on)

    @classmethod
    def combine(cls, patches: Sequence[Patch]) -> list[Patch]:
        """Layers computing what ``patches`` do run one after the other (in order), combined.

        Consecutive patches become one table while that computes the same: no patch reads a
        row an earlier one of the table wrote, no target row gets two sources, every row
        counts from the start (a negative row is only known with the batch) and all act on
        the same tensor (``on``). A patch that cannot join starts the next table.
        """
        groups: list[list[Patch]] = []
        table: tuple[Any, set[int], dict[int, int]] | None = None  # (on, written, source_of)
        for patch in patches:
            if type(patch) is not cls:
                raise ArgumentTypeError(
                    f"Patch.combine takes Patch layers, got {type(patch).__name__}"
                )
            if patch.steps is not None:  # acts at some steps only: it stays alone
                groups.append([patch])
                table = None
                continue
            if table is not None and _joins(patch, *table):
                groups[-1].append(patch)
                continue
            groups.append([patch])
            table = (patch.on, set(), {})
            if not _joins(patch, *table):
                table = None  # it has negative rows: it stays alone
        return [
            group[0]
            if len(group) == 1
            else cls.table([entry for p in group for entry in p.entries], on=group[0].on)
            for group in groups
        ]

    # -- data --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        if not self.is_table:
            return super().config()
        table = [
            {
                "source_rows": list(sources),
                "target_rows": list(targets),
                "index": index.to_json() if index is not None else None,
            }
            for sources, targets, index in self.entries
        ]
        return {"table": table, "on": self.on, **({"steps": self.steps} if self.steps else {})}

    @classmethod
    def from_spec(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Patch:
        if "table" not in config:
            return super().from_spec(config, tensors)  # type: ignore[return-value]
        unknown = (set(config) | set(tensors)) - {"table", "on", "steps"}
        if unknown:
            raise ArgumentError(f"Patch: unknown field(s) {sorted(unknown)} next to table")
        table = config["table"]
        if not isinstance(table, list) or not table:
            raise ArgumentError("Patch: table must be a non-empty JSON list of entries")
        entries = []
        for i, entry in enumerate(table):
            if not isinstance(entry, dict) or set(entry) != set(_ENTRY_KEYS):
                raise ArgumentError(
                    f"Patch: table entry {i} must be an object with exactly the keys "
                    f"{list(_ENTRY_KEYS)}, got {entry!r}"
                )
            index = entry["index"]
            index = Index.from_json(index) if index is not None else None
            entries.append((entry["source_rows"], entry["target_rows"], index))
        steps = config.get("steps")
        return cls(table=entries, on=config.get("on"), steps=steps_from_json(steps))

    def extra_repr(self) -> str:
        if not self.is_table:
            return super().extra_repr()
        shown = [
            f"{list(s)}->{list(t)}{'' if i is None else f' at {i}'}" for s, t, i in self.entries[:3]
        ]
        more = f", ... ({len(self.entries)} entries)" if len(self.entries) > 3 else ""
        on = "" if self.on is None else f", on={self.on!r}"
        return f"table=[{', '.join(shown)}{more}]{on}"

    # -- running -----------------------------------------------------------------------

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        """Each entry's index cut to the shard, rows unchanged; the full tensor when the
        batch itself is split (rows would move between ranks)."""
        from torchsurgeon.distributed.split import local_part
        from torchsurgeon.layers.base import GATHER

        if split.dim % len(shape) == 0:
            return GATHER
        entries = []
        for sources, targets, index in self.entries:
            part = local_part(index, shape[1:], split)
            if part is not None:
                entries.append((list(sources), list(targets), part.index))
        return Patch.table(entries) if entries else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            copies = self._copies(tuple(x.shape), x.device)
        else:
            key = (tuple(x.shape), x.device)
            copies = self._ts_copies.get(key)
            if copies is None:
                # Plain tensors even in inference mode: autograd saves index tensors.
                with torch.inference_mode(False):
                    copies = self._copies(key[0], x.device)
                remember(self._ts_copies, key, copies)
        out = x.clone()
        for targets, sources in copies:
            out[targets] = x[sources]
        return out

    def _copies(
        self, shape: tuple[int, ...], device: torch.device
    ) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
        """``(target index, source index)`` pairs doing every copy of the table at ``shape``."""
        batch, where = shape[0], self._where()
        records: dict[tuple[Any, ...], list[tuple[int, int, tuple[Any, ...]]]] = {}
        for sources, targets, index in self.entries:
            for row in (*sources, *targets):
                if not -batch <= row < batch:
                    raise OutOfRangeError(
                        f"{where}row {row} is out of range for a batch of {batch} "
                        f"(tensor shape {shape})"
                    )
            dims: tuple[Any, ...] = ()
            if index is not None:
                index.check(shape[1:], where=where)
                dims = index.per_dimension(shape[1:])
            signature = tuple(_kind(d) for d in dims)
            group = records.setdefault(signature, [])
            group.extend(
                (s % batch, t % batch, dims) for s, t in zip(sources, targets, strict=True)
            )
        _one_source_per_target(((s, t) for g in records.values() for s, t, _ in g), where)
        return [_stacked(group, device) for group in records.values()]


def _joins(patch: Patch, on: Any, written: set[int], source_of: dict[int, int]) -> bool:
    """Whether ``patch`` can join a table that wrote ``written`` (updated when it joins)."""
    if patch.on != on:
        return False
    pairs = [
        (s, t)
        for sources, targets, _ in patch.entries
        for s, t in zip(sources, targets, strict=True)
    ]
    if any(s < 0 or t < 0 or s in written for s, t in pairs):
        return False
    if any(source_of.get(t, s) != s for s, t in pairs):
        return False
    for s, t in pairs:
        source_of[t] = s
    written.update(t for _, t in pairs)
    return True


def _kind(entry: Any) -> tuple[Any, ...]:
    """What must agree between entries that share one assignment: kind and length."""
    if isinstance(entry, slice):
        return ("slice", len(range(entry.start, entry.stop, entry.step)))
    if isinstance(entry, tuple):
        return ("list", len(entry))
    return ("int",)


def _stacked(
    group: list[tuple[int, int, tuple[Any, ...]]], device: torch.device
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """One ``out[targets] = x[sources]`` for records whose indices have one signature.

    Rows become an index tensor along a first axis, one per record. A dimension where every
    record has the same entry keeps it (a slice stays a slice); one where they differ becomes
    an index tensor along that first axis: ints as they are, slices as ranges on an axis of
    their own. Lists are one joint axis (several lists in an index pair up, as in PyTorch),
    so the target and source indices pair element for element.
    """
    count = len(group)
    first = group[0][2]
    varying = [any(r[2][d] != first[d] for r in group) for d in range(len(first))]
    has_lists = any(isinstance(e, tuple) for e in first)
    axes = (
        1 + has_lists + sum(v and isinstance(e, slice) for v, e in zip(varying, first, strict=True))
    )

    def tensor(values: Any, own: Sequence[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long, device=device)
        shape = [1] * axes
        for axis, size in zip(own, t.shape, strict=True):
            shape[axis] = size
        return t.reshape(shape)

    shared: list[Any] = []
    next_axis = 1 + has_lists
    for d, entry in enumerate(first):
        if isinstance(entry, tuple):
            own = (0, 1) if varying[d] else (1,)
            values = [list(r[2][d]) for r in group] if varying[d] else list(entry)
            shared.append(tensor(values, own))
        elif not varying[d]:
            shared.append(entry)
        elif isinstance(entry, slice):
            values = [list(range(r[2][d].start, r[2][d].stop, r[2][d].step)) for r in group]
            shared.append(tensor(values, (0, next_axis)))
            next_axis += 1
        else:
            shared.append(tensor([r[2][d] for r in group], (0,)))
    targets = tensor([r[1] for r in group], (0,))
    sources = tensor([r[0] for r in group], (0,))
    if count == 1 and axes == 1 and not any(isinstance(e, torch.Tensor) for e in shared):
        # One record of ints and slices: plain (basic) indexing, no index tensors at all.
        return (group[0][1], *first), (group[0][0], *first)
    return (targets, *shared), (sources, *shared)
