"""The base of every intervention layer: a small module that is also a piece of data.

An intervention layer is an ordinary ``nn.Module`` with ``forward(x) -> x'`` on one tensor
(which tensor of the call is decided where it is inserted; see
:mod:`torchsurgeon.surgery.sites`). What makes it more than a module is its *spec*: a type
name from the registry, a JSON config and a dict of named tensors. The spec is what a plan
carries and what a remote host rebuilds the layer from — through the registry, which is the
host's allow-list — so every layer must be fully described by it.

Tensors a layer holds (a steering vector, a patch value, a scale) are non-persistent
buffers: they move with ``.to()``, appear in ``torch.func.functional_call``'s view (so
``grad``/``vmap`` run over them) and stay out of ``state_dict``, which stays the base
model's.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.graph import Graph, RunValues
from torchsurgeon.layers.index import Index, as_index
from torchsurgeon.layers.run_state import run_state
from torchsurgeon.surgery.display import TreescopeRepr
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, SiteError
from torchsurgeon.surgery.frozen import shallow_copy
from torchsurgeon.surgery.paths import describe, layer_index_of

__all__ = [
    "GATHER",
    "InterventionLayer",
    "Recorder",
    "Steps",
    "acts_at",
    "layer_class",
    "layer_types",
    "register_layer",
    "steps_from_json",
    "steps_to_json",
]

_REGISTRY: dict[str, type[InterventionLayer]] = {}
GATHER = object()
"""What :meth:`InterventionLayer.on_shard` returns for a layer that needs the full tensor."""


class InterventionLayer(TreescopeRepr, nn.Module):
    """Base class: subclasses name their config and tensor fields and implement ``forward``.

    ``config_fields`` are constructor arguments stored as plain attributes (JSON values);
    ``tensor_fields`` are constructor arguments stored as buffers. ``on`` picks the target
    tensor of the call (None: the primary tensor); ``index`` restricts the layer to part of
    that tensor, where the layer supports it.
    """

    type_name: ClassVar[str] = ""
    config_fields: ClassVar[tuple[str, ...]] = ()
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    takes_index: ClassVar[bool] = True
    reads_input: ClassVar[bool] = False
    """Whether an ``insert_after`` site also passes the module's input (see ``sites``); a
    class attribute here, so the site's lookup never falls through to ``__getattr__``."""
    trainable_fields: ClassVar[tuple[str, ...] | None] = None
    """The tensors ``ts.train`` trains when it is given the whole layer (``None``: every
    floating-point tensor); e.g. a LoRA's ``a`` and ``b``, not its ``scale``."""
    expr_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that may hold an expression (``ts.here``, ``ts.saved(...)``, ...) instead of
    a fixed value: evaluated on every call, with ``ts.here`` the layer's target tensor."""
    grad_site: ClassVar[bool] = False
    """Whether the layer acts on the backward pass (``SaveGrad``, ``ComputeGrad``): ``ts.run``
    hands it the run's list of gradient sites, which ``backward=`` differentiates toward."""
    reads_run: ClassVar[bool] = False
    """Whether the layer reads its run (``ts.saved``, ``ts.call``): ``ts.run`` then hands
    it the run's values. Set on the instance by :meth:`_set_expr`."""
    stops_run: ClassVar[bool] = False
    """Whether the layer can end the forward pass (``Stop``): such a run keeps no output to
    split, so it never shares a co-batched pass."""

    steps: Any = None
    """The generation steps (calls of the layer within one ``ts.run``) it acts at, as JSON:
    ``None`` (every call), an int, ``{"slice": [start, stop, step]}`` or ``{"list": [...]}``."""

    def __init__(
        self,
        *,
        on: int | str | None = None,
        index: Index | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__()
        if on is not None and not isinstance(on, (int, str)):
            raise ArgumentTypeError(
                f"{type(self).__name__}: on= must be an int, a str or None, got {on!r}"
            )
        if index is not None and not self.takes_index:
            raise ArgumentTypeError(f"{type(self).__name__} takes no index=")
        self.on = on
        self.index = as_index(index)
        self.site = ""
        if steps is not None:
            self.steps = steps_to_json(steps, type(self).__name__)

    def on_shard(
        self, shape: tuple[int, ...], split: Any, dtype: torch.dtype, device: torch.device
    ) -> Any:
        """This layer cut to one rank's shard of a full tensor of ``shape`` (its
        :class:`~torchsurgeon.distributed.split.Split` ``split``): a new layer, ``None``
        (the shard holds nothing the layer touches) or :data:`GATHER` (the default: gather
        the full tensor, run the layer on it, keep the shard's part — right for any layer
        that keeps its tensor's shape). Layers whose edit is local to a shard override it."""
        return GATHER

    def _set_tensor(self, name: str, value: torch.Tensor | float | int) -> None:
        if not isinstance(value, torch.Tensor):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ArgumentTypeError(
                    f"{type(self).__name__}: {name} must be a number or a tensor, got "
                    f"{type(value).__name__}"
                )
            value = torch.tensor(float(value))
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ArgumentError(f"{type(self).__name__}: {name} holds NaN or infinite values")
        self.register_buffer(name, value, persistent=False)

    def _set_expr(self, name: str, expr: Expr) -> None:
        """Hold ``expr`` as field ``name``: its graph, its constants as buffers
        ``<name>_c<i>`` (so they move with ``.to()`` and travel as the layer's tensors)."""
        graph = Graph.of(expr)
        graph.check_leaves(here=True, output=False)
        graphs = {**self.__dict__.get("_ts_graphs", {}), name: graph}
        self.__dict__["_ts_graphs"] = graphs
        for i, tensor in enumerate(graph.tensors):
            self._set_tensor(f"{name}_c{i}", tensor)
        if graph.reads() & {"saved", "runs", "call"}:
            self.__dict__["reads_run"] = True

    def _evaluate(self, name: str, x: torch.Tensor, values: RunValues | None = None) -> Any:
        """Field ``name``'s expression on target ``x``, with the run's values (``values``,
        else those of the run the layer is part of, if any)."""
        graph: Graph = self.__dict__["_ts_graphs"][name]
        buffers = self._buffers
        constants = [buffers[f"{name}_c{i}"] for i in range(len(graph.tensors))]
        if constants and constants[0].device != x.device:  # a site with no tensors of its own
            constants = [c.to(x.device) for c in constants]
        if values is None:
            state = run_state(self)
            values = None if state is None else state.values
        try:
            return graph.evaluate(x, values, constants)
        except ExpressionError as error:
            step = self.__dict__.get("_ts_step")
            field = "" if step is None else f"steps.{step}.layer.config.{name}"
            where = self._where() + ("" if step is None else f"(plan step {step}) ")
            raise ExpressionError(f"{where}{name}: {error}", field) from None

    def ts_active(self) -> bool:
        """Whether this call of the layer is one of its ``steps`` (and count the call).

        Sites ask only layers with ``steps`` set. The count belongs to the run: ``ts.run``
        starts it at 0 (the prompt's forward pass in ``generate``), so outside a run there is
        none, and that is an error rather than a guess.
        """
        state = run_state(self)
        calls = None if state is None else state.calls
        if calls is None:
            raise SiteError(
                f"{self._where()}steps={self.steps} counts the calls of the layer within one "
                "ts.run; run the model with ts.run (ts.run(model.generate, ids, ...) for "
                "generation)"
            )
        call = calls[0]
        calls[0] = call + 1
        return acts_at(self.steps, call)

    def _holds_expr(self, name: str) -> bool:
        return name in self.__dict__.get("_ts_graphs", {})

    @classmethod
    def takes_tensor(cls, name: str) -> bool:
        """Whether ``name`` is one of this layer's tensors (fields, expression constants)."""
        if name in cls.tensor_fields:
            return True
        field, _, number = name.rpartition("_c")
        return field in cls.expr_fields and number.isdigit() and len(number) <= 6

    # -- data --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON part of the spec (``on``, ``index`` and the layer's own fields)."""
        out: dict[str, Any] = {
            name: getattr(self, name) for name in self.config_fields if not self._holds_expr(name)
        }
        for name, graph in self.__dict__.get("_ts_graphs", {}).items():
            out[name] = {"expr": graph.to_json()}
        out["on"] = self.on
        if self.steps is not None:
            out["steps"] = self.steps
        if self.takes_index:
            out["index"] = self.index.to_json() if self.index is not None else None
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor part of the spec."""
        out = {
            name: getattr(self, name) for name in self.tensor_fields if not self._holds_expr(name)
        }
        for name, graph in self.__dict__.get("_ts_graphs", {}).items():
            out.update(
                {f"{name}_c{i}": self._buffers[f"{name}_c{i}"] for i in range(len(graph.tensors))}
            )
        return out

    @classmethod
    def from_spec(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> InterventionLayer:
        """Rebuild a layer from :meth:`config` and :meth:`tensors` (as a host does)."""
        kwargs = dict(config)
        tensors = dict(tensors)
        if kwargs.get("index") is not None:
            kwargs["index"] = Index.from_json(kwargs["index"])
        for name in cls.expr_fields:
            value = kwargs.get(name)
            if isinstance(value, dict) and set(value) == {"expr"}:
                constants = []
                while f"{name}_c{len(constants)}" in tensors:
                    constants.append(tensors.pop(f"{name}_c{len(constants)}"))
                kwargs[name] = Graph.from_json(value["expr"], constants).expr()
        if "steps" in kwargs:
            kwargs["steps"] = steps_from_json(kwargs["steps"])
        expected = set(cls.config_fields) | set(cls.tensor_fields) | set(cls.expr_fields)
        expected |= {"on", "steps"}
        expected |= {"index"} if cls.takes_index else set()
        unknown = set(kwargs) | set(tensors)
        unknown -= expected
        if unknown:
            raise ArgumentError(
                f"{cls.type_name}: unknown field(s) {sorted(unknown)}; its fields: "
                f"{sorted(expected)}"
            )
        taken = _constructor_parameters(cls)
        for name in ("on", "index", "steps"):  # a constructor that does not take them gets no None
            if name in kwargs and kwargs[name] is None and name not in taken:
                del kwargs[name]
        return cls(**kwargs, **tensors)

    # -- placement ---------------------------------------------------------------------

    def for_site(self, path: str, n: int) -> InterventionLayer:
        """The copy of this layer that sits at ``path`` (tensors shared, never copied)."""
        copy = shallow_copy(self)
        copy.__dict__["site"] = path
        return copy

    def _where(self) -> str:
        return f"{type(self).__name__} at {describe(self.site)}: "

    def _checked_index(self, x: torch.Tensor) -> tuple[Any, ...]:
        """The index as PyTorch takes it, checked against ``x`` (``...`` when there is none)."""
        if self.index is None:
            return (Ellipsis,)
        self.index.check(tuple(x.shape), where=self._where())
        return self.index.torch

    def extra_repr(self) -> str:
        config = {**self.config(), "index": self.index}
        parts = [
            f"{k}={v}" if k == "index" else f"{k}={v!r}" for k, v in config.items() if v is not None
        ]
        parts += [f"{k}=<{tuple(t.shape)} {t.dtype}>" for k, t in self.tensors().items()]
        return ", ".join(parts)


class Recorder(InterventionLayer):
    """A layer that records tensors into a run's results under a key.

    ``name`` is the key, and may be a template with the fields ``{n}`` (the site's position
    in the selection), ``{layer}`` (the index of the site's block: the last integer segment
    of its path, ``12`` in ``model.layers.12.mlp``) and ``{path}`` (the site's path); ``{{``
    and ``}}`` are literal braces. Without a name the key is the site's path. Recording
    happens only inside ``ts.run``: a plain call of the model passes tensors through and
    keeps nothing. Two recording layers with one key in one model are refused when the
    second is inserted.
    """

    config_fields = ("name",)
    takes_index = False
    ts_records: ClassVar[bool] = True
    """Marks recording layers for the selectors' duplicate-key check (no import needed)."""

    def __init__(
        self, name: str | None = None, *, on: int | str | None = None, steps: Steps = None
    ) -> None:
        super().__init__(on=on, steps=steps)
        if name is not None and not isinstance(name, str):
            raise ArgumentTypeError(f"{type(self).__name__}: name must be a str, got {name!r}")
        if name is not None:
            _template_parts(name, type(self).__name__)  # refuse a bad template now
        self.name = name
        self.key = name or ""

    def for_site(self, path: str, n: int) -> InterventionLayer:
        copy = super().for_site(path, n)
        if self.name is None:
            key = path
        else:
            values = {"n": n, "layer": layer_index_of(path), "path": path}
            pieces = []
            for literal, field in _template_parts(self.name, type(self).__name__):
                pieces.append(literal)
                if field is not None:
                    if values[field] is None:
                        raise SiteError(
                            f"{type(self).__name__}({self.name!r}) at {describe(path)}: the "
                            "path has no layer index (no integer segment) for {layer}; use "
                            "{n} or {path} there"
                        )
                    pieces.append(str(values[field]))
            key = "".join(pieces)
        copy.__dict__["key"] = key or "output"
        return copy


@functools.cache
def _constructor_parameters(cls: type) -> frozenset[str]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return frozenset({"on", "index", "steps"} | {p.name for p in parameters})
    return frozenset(p.name for p in parameters)


Steps = int | slice | Sequence[int] | None
"""Which calls of a layer within one run it acts at (a generation step per call)."""
_MAX_STEP_LIST = 4096


def steps_to_json(steps: Steps, owner: str) -> Any:
    """``steps`` checked, as JSON (an int, ``{"slice": [...]}`` or ``{"list": [...]}``)."""
    if isinstance(steps, bool):
        raise ArgumentTypeError(
            f"{owner}: steps= is an int, a slice or a list of ints, got {steps!r}"
        )
    if isinstance(steps, int):
        if steps < 0:
            raise ArgumentError(f"{owner}: steps={steps}: steps count from 0 (the prompt's pass)")
        return steps
    if isinstance(steps, slice):
        bounds = [steps.start, steps.stop, steps.step]
        if not all(b is None or (type(b) is int and b >= 0) for b in bounds) or steps.step == 0:
            raise ArgumentError(f"{owner}: steps={steps}: a slice of ints >= 0 (step > 0)")
        return {"slice": bounds}
    if isinstance(steps, Sequence) and not isinstance(steps, str):
        values = list(steps)
        if not values or len(values) > _MAX_STEP_LIST:
            raise ArgumentError(f"{owner}: steps= lists 1 to {_MAX_STEP_LIST} steps")
        if not all(type(v) is int and v >= 0 for v in values):
            raise ArgumentTypeError(f"{owner}: steps= lists ints >= 0, got {values[:8]!r}")
        return {"list": sorted(set(values))}
    raise ArgumentTypeError(f"{owner}: steps= is an int, a slice or a list of ints, got {steps!r}")


def steps_from_json(data: Any) -> Steps:
    """The ``steps=`` value of its JSON form; an ``ArgumentError`` (a ``ValueError``) when it
    is not one."""
    if data is None or (type(data) is int and data >= 0):
        return data
    if isinstance(data, dict) and set(data) == {"slice"} and _triple(data["slice"]):
        return slice(*data["slice"])
    if isinstance(data, dict) and set(data) == {"list"} and isinstance(data["list"], list):
        return list(data["list"])
    raise ArgumentError(f"steps must be an int, a slice or a list of ints, got {data!r}")


def _triple(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3


def acts_at(steps: Any, call: int) -> bool:
    """Whether a layer with JSON ``steps`` acts at its ``call``-th call (from 0)."""
    if steps is None:
        return True
    if type(steps) is int:
        return call == steps
    if "slice" in steps:
        start, stop, step = steps["slice"]
        start = start or 0
        return call >= start and (stop is None or call < stop) and (call - start) % (step or 1) == 0
    return call in steps["list"]


TEMPLATE_FIELDS = ("n", "layer", "path")
_MAX_NAME = 256


def _template_parts(template: str, owner: str) -> list[tuple[str, str | None]]:
    """``template`` as ``(literal text, field or None)`` pairs; ArgumentError if malformed.

    A small scanner of our own instead of ``str.format``: a name reaches no attribute
    lookups, indexing or format specs, whatever it holds.
    """
    if len(template) > _MAX_NAME:
        raise ArgumentError(f"{owner}: name is {len(template)} characters, over {_MAX_NAME}")
    parts: list[tuple[str, str | None]] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if char in "{}" and template.startswith(char * 2, i):
            literal.append(char)
            i += 2
            continue
        if char == "}":
            raise ArgumentError(f"{owner}: name {template!r} has a single '}}'; write '}}}}'")
        if char == "{":
            end = template.find("}", i)
            field = template[i + 1 : end] if end != -1 else template[i + 1 :]
            if end == -1 or field not in TEMPLATE_FIELDS:
                guess = difflib.get_close_matches(field, TEMPLATE_FIELDS, 1, 0.5)
                hint = f"; did you mean {{{guess[0]}}}?" if guess else ""
                raise ArgumentError(
                    f"{owner}: name {template!r} uses {{{field}}}; a name may only use "
                    "the fields {n}, {layer} and {path} (and {{ }} for literal braces)" + hint
                )
            parts.append(("".join(literal), field))
            literal = []
            i = end + 1
            continue
        literal.append(char)
        i += 1
    if literal or not parts:
        parts.append(("".join(literal), None))
    return parts


def register_layer(cls: type[InterventionLayer]) -> type[InterventionLayer]:
    """Class decorator: add ``cls`` to the registry under ``cls.type_name``."""
    if not cls.type_name:
        raise ArgumentError(f"{cls.__name__} needs a type_name to be registered")
    taken = _constructor_parameters(cls)
    fields = (*cls.config_fields, *cls.tensor_fields, *cls.expr_fields)
    missing = [name for name in fields if name not in taken]
    if missing:
        raise ArgumentTypeError(
            f"{cls.__name__}: a registered layer is rebuilt as cls(**config, **tensors), so "
            f"its constructor must take every config, tensor and expression field by name; "
            f"it does not take {missing}"
        )
    _REGISTRY[cls.type_name] = cls
    return cls


def layer_types() -> dict[str, type[InterventionLayer]]:
    """Every registered layer type by name (the remote host's allow-list)."""
    return dict(_REGISTRY)


def layer_class(type_name: str) -> type[InterventionLayer]:
    """The registered class named ``type_name``; a clear error naming the known ones if none."""
    found = _REGISTRY.get(type_name)
    if found is None:
        known = ", ".join(sorted(_REGISTRY))
        guess = difflib.get_close_matches(str(type_name), _REGISTRY, 1, 0.6)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ArgumentError(
            f"unknown intervention layer type {type_name!r}; registered: {known}{hint}"
        )
    return found
