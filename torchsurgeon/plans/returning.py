"""What a run hands back: which entries, and reduced how, before anything is transferred.

A remote run of a 70B model can produce gigabytes (every saved activation, full-vocabulary
logits); most experiments need a mean over positions or the top 5 logits. A plan therefore
says what to return, and the host reduces *where it runs*, before the transfer.

The entries of a run are its saved keys (``Save("block3")`` -> ``"block3"``) and its output:
``"output"`` names the whole output, and for a dict/``ModelOutput`` each field is an entry of
its own (``"logits"``); for a tuple output, ``"output.0"``, ``"output.1"``, ....

- :class:`Reduction`: in this order, ``positions`` keeps a slice ``(start, stop, step)`` of
  dimension ``position_dim`` (default 1, the sequence of a ``(batch, seq, ...)`` tensor);
  ``mean`` averages over the given dimensions; ``topk`` keeps the ``k`` largest entries of
  the last dimension, as ``torch.return_types.topk`` (``values`` and ``indices``), exactly
  what ``tensor.topk(k)`` gives locally.
- :class:`Returning`: ``names`` (``None``: every entry, the default) and a reduction per
  name. :meth:`Returning.apply` turns a local :class:`~torchsurgeon.layers.results.Result`
  into the returned one, so a remote result has an exact local twin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.graph import Graph, RunValues, device_of
from torchsurgeon.layers.results import Result
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.lineage import lineage_of

__all__ = ["Reduction", "Returning", "output_entries"]

Slice = tuple[int | None, int | None, int | None]


@dataclass(frozen=True)
class Reduction:
    """Positions slice, then mean over dims, then top-k of the last dim (each optional)."""

    positions: Slice | None = None
    position_dim: int = 1
    mean: tuple[int, ...] | None = None
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.positions is not None:
            step = self.positions[2]
            if step is not None and step <= 0:
                raise ArgumentError(
                    f"returning(positions=): the slice step must be > 0 (1: every position), "
                    f"got {step}"
                )
        if self.topk is not None and (not isinstance(self.topk, int) or self.topk < 1):
            raise ArgumentError(
                f"returning(topk=): the number of largest entries kept, an int >= 1, got "
                f"{self.topk!r}"
            )
        if self.mean is not None and (not self.mean or not all(type(d) is int for d in self.mean)):
            raise ArgumentError(
                f"returning(mean=): the dimensions to average over, an int or a non-empty "
                f"list of ints (e.g. mean=1), got {self.mean!r}"
            )

    @classmethod
    def make(
        cls,
        *,
        mean: int | Sequence[int] | None = None,
        topk: int | None = None,
        positions: slice | int | Slice | None = None,
        position_dim: int = 1,
    ) -> Reduction:
        """Build from friendly arguments (``positions`` a slice, an int or a triple)."""
        if isinstance(positions, slice):
            positions = (positions.start, positions.stop, positions.step)
        elif isinstance(positions, int) and not isinstance(positions, bool):
            positions = (positions, positions + 1 if positions != -1 else None, None)
        elif positions is not None:
            positions = tuple(positions)  # type: ignore[assignment]
        means = (mean,) if isinstance(mean, int) else (tuple(mean) if mean is not None else None)
        return cls(positions, position_dim, means, topk)  # type: ignore[arg-type]

    def apply(self, tensor: torch.Tensor, name: str) -> torch.Tensor | Any:
        """``tensor`` reduced; an error naming ``name`` and its shape when it does not fit."""
        x = tensor
        try:
            if self.positions is not None:
                dim = self.position_dim % x.dim() if x.dim() else None
                if dim is None or not -x.dim() <= self.position_dim < x.dim():
                    raise IndexError(f"position_dim {self.position_dim} is out of range")
                x = x[(slice(None),) * dim + (slice(*self.positions),)]
            if self.mean is not None:
                x = (x if x.is_floating_point() else x.float()).mean(dim=self.mean)
            if self.topk is not None:
                if x.dim() == 0 or x.shape[-1] < self.topk:
                    raise IndexError(f"the last dimension is smaller than topk={self.topk}")
                return x.topk(self.topk)
        except (IndexError, RuntimeError) as error:
            raise PlanError(
                f"returning {name!r}: cannot reduce a tensor of shape {list(tensor.shape)} with "
                f"{self}: {error}"
            ) from None
        return x

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": list(self.positions) if self.positions is not None else None,
            "position_dim": self.position_dim,
            "mean": list(self.mean) if self.mean is not None else None,
            "topk": self.topk,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reduction:
        positions = data.get("positions")
        mean = data.get("mean")
        return cls(
            tuple(positions) if positions is not None else None,  # type: ignore[arg-type]
            data.get("position_dim", 1),
            tuple(mean) if mean is not None else None,
            data.get("topk"),
        )


@dataclass(frozen=True)
class Returning:
    """Which entries of a run come back (``None``: all), each one's reduction, and the
    values computed after the run (expression graphs, by the name they are returned as)."""

    names: tuple[str, ...] | None = None
    reductions: Mapping[str, Reduction] = field(default_factory=dict)
    computed: Mapping[str, Graph] = field(default_factory=dict)

    def adding(
        self,
        names: Sequence[str],
        reduction: Reduction | None,
        computed: Mapping[str, Expr] | None = None,
    ) -> Returning:
        """These ``names`` returned too (reduced by ``reduction``, replacing an earlier one),
        and the ``computed`` expressions, each returned under its name."""
        for name in (*names, *(computed or {})):
            if not isinstance(name, str) or not name:
                raise ArgumentTypeError(
                    "returning: names are non-empty strings (a saved key, 'logits', ...), got "
                    f"{name!r}"
                )
        graphs = dict(self.computed)
        for name, expr in (computed or {}).items():
            if not isinstance(expr, Expr):
                raise ArgumentTypeError(
                    f"returning {name}=...: an expression (ts.out, ts.saved, ...), got "
                    f"{type(expr).__name__}"
                )
            graph = Graph.of(expr)
            graph.check_leaves(here=False, output=True)
            graphs[name] = graph
        listed = tuple(dict.fromkeys([*(self.names or ()), *names, *(computed or {})]))
        reductions = dict(self.reductions)
        for name in (*names, *(computed or {})):
            if reduction is None:
                reductions.pop(name, None)
            else:
                reductions[name] = reduction
        return Returning(listed, reductions, graphs)

    def to_json(self, tensor_ref: Callable[[torch.Tensor], str] | None = None) -> dict[str, Any]:
        """The JSON form; ``tensor_ref`` names each constant tensor of a computed value
        in the plan's tensor table."""
        data: dict[str, Any] = {
            "names": list(self.names) if self.names is not None else None,
            "reductions": {k: r.to_json() for k, r in self.reductions.items()},
        }
        if self.computed:
            if tensor_ref is None:
                raise ArgumentTypeError(
                    "returning: computed values need a tensor table (Plan.manifest) to be saved"
                )
            data["computed"] = {
                name: {"expr": g.to_json(), "tensors": [tensor_ref(t) for t in g.tensors]}
                for name, g in self.computed.items()
            }
        return data

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
    ) -> Returning:
        names = data.get("names")
        reductions = data.get("reductions") or {}
        computed = {
            name: Graph.from_json(spec["expr"], [(tensors or {})[ref] for ref in spec["tensors"]])
            for name, spec in (data.get("computed") or {}).items()
        }
        return cls(
            tuple(names) if names is not None else None,
            {k: Reduction.from_json(v) for k, v in reductions.items()},
            computed,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Returning):
            return NotImplemented
        return (
            self.names == other.names
            and self.reductions == other.reductions
            and self.computed.keys() == other.computed.keys()
            and all(g.same_as(other.computed[k]) for k, g in self.computed.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def apply(
        self,
        result: Result,
        model: nn.Module | None = None,
        runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None = None,
    ) -> Result:
        """The returned part of ``result``, reduced (a new ``Result``; ``result`` is kept).

        Computed values are evaluated first, on the whole result: ``ts.out`` reads its
        output, ``ts.saved`` its records (``runs``: a session's earlier runs), ``ts.call``
        the modules of ``model``'s base. Each is returned as a recorded value of its name.
        """
        if self.computed:
            result = self._compute(result, model, runs)
        fields = output_entries(result.output)
        saved_keys = [k for k, v in result.records.items() if v]
        available = [*saved_keys, "output", *fields]
        wanted = self.names
        unknown = [n for n in (wanted or ()) if n not in available]
        unknown += [n for n in self.reductions if n not in available]
        if unknown:
            raise PlanError(
                f"returning {sorted(set(unknown))}: this run produced no such entry; it has "
                f"saved {saved_keys or '(nothing)'} and output entries "
                f"{['output', *fields]}"
            )
        collide = set(saved_keys) & {"output", *fields}
        if collide & set(wanted or self.reductions):
            raise PlanError(
                f"returning {sorted(collide)}: these names are both saved keys and output "
                "entries; rename the Save layer(s)"
            )
        records = {
            key: [self._reduce(key, t) for t in values]
            for key, values in result.records.items()
            if values and (wanted is None or key in wanted)
        }
        return Result(self._output(result.output, fields, wanted), records)

    def _compute(
        self,
        result: Result,
        model: nn.Module | None,
        runs: Mapping[str, Mapping[str, list[torch.Tensor]]] | None,
    ) -> Result:
        taken = {k for k, v in result.records.items() if v}
        taken |= {"output", *output_entries(result.output)}
        clash = sorted(taken & set(self.computed))
        if clash:
            raise PlanError(
                f"returning {clash}: these names are already saved keys or output entries; "
                "give the computed values other names"
            )
        values = RunValues(
            records=result.records,
            runs=runs,
            output=result.output,
            has_output=True,
            model=None if model is None else lineage_of(model).base,
            device=device_of(result.output, result.records) or _device_of_model(model),
        )
        records = dict(result.records)
        for name, graph in self.computed.items():
            try:
                value = graph.evaluate(None, values)
            except ExpressionError as error:
                raise PlanError(f"returning {name!r}: {error}") from None
            if not isinstance(value, (torch.Tensor, tuple)):
                value = torch.tensor(value)
            records[name] = [value]
        return Result(result.output, records)

    def _reduce(self, name: str, value: Any) -> Any:
        reduction = self.reductions.get(name)
        if reduction is None:
            return value
        if not isinstance(value, torch.Tensor):
            raise PlanError(
                f"returning {name!r}: only tensors can be reduced, this is a {type(value).__name__}"
            )
        return reduction.apply(value, name)

    def _output(self, output: Any, fields: list[str], wanted: tuple[str, ...] | None) -> Any:
        whole = wanted is None or "output" in wanted
        if isinstance(output, torch.Tensor):
            return self._reduce("output", output) if whole else None
        if "output" in self.reductions:
            raise PlanError(
                "returning 'output': only a tensor output can be reduced whole; "
                f"name its entries instead: {fields}"
            )
        if isinstance(output, Mapping):
            keep = [k for k in fields if whole or k in wanted]  # type: ignore[operator]
            if not keep:
                return None
            values = {k: self._reduce(k, output[k]) for k in keep}
            return _rebuild_mapping(output, values)
        if isinstance(output, (tuple, list)):
            items = [
                self._reduce(f"output.{i}", v)
                if whole or f"output.{i}" in wanted  # type: ignore[operator]
                else None
                for i, v in enumerate(output)
            ]
            if all(v is None for v in items):
                return None
            return type(output)(items) if type(output) in (tuple, list) else tuple(items)
        return output if whole else None


def _device_of_model(model: nn.Module | None) -> torch.device | None:
    """Where ``model``'s first tensor lives (a run that stopped before any output)."""
    if model is None:
        return None
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def output_entries(output: Any) -> list[str]:
    """The entry names of an output besides ``"output"``: its fields or ``output.<i>``."""
    if isinstance(output, Mapping):
        return [str(k) for k in output if output[k] is not None]
    if isinstance(output, (tuple, list)):
        return [f"output.{i}" for i in range(len(output))]
    return []


def _rebuild_mapping(output: Mapping[str, Any], values: dict[str, Any]) -> Any:
    """A mapping of ``output``'s kind holding only ``values`` (a ModelOutput stays one)."""
    kind = type(output)
    if kind is dict:
        return values
    try:
        return kind(**values)
    except TypeError:
        return values
