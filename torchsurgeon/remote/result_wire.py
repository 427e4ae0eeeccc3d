"""A run's result on the wire: a safetensors file with its tree in the metadata.

It holds the tensors of a :class:`~torchsurgeon.layers.results.Result` (``r0``, ``r1``,
...) and the tree they sit in: the output (a tensor, a tuple, a dict, a ``transformers``
``ModelOutput`` — rebuilt only as an output class the client already knows, never by
importing a name from the file), the saved entries, and ``topk`` reductions as
``torch.return_types.topk``. Values that are neither tensors nor JSON scalars (a KV cache
object) do not travel. Requests are :mod:`torchsurgeon.remote.transfer`.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from torchsurgeon.layers.results import Result
from torchsurgeon.plans.errors import PlanFormatError
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.wire import pack, unpack_container
from torchsurgeon.remote.errors import RemoteError

__all__ = ["RESULT_KEY", "decode_result", "encode_result", "result_nbytes", "tensors_in"]

RESULT_KEY = "torchsurgeon.result"
_SCALARS = (bool, int, float, str, type(None))


def result_nbytes(result: Result) -> int:
    """The bytes the result's tensors will take on the wire (before encoding them)."""
    return sum(t.numel() * t.element_size() for t in tensors_in((result.output, result.records)))


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value``'s nested dicts, lists and tuples (``topk`` results too)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def encode_result(result: Result | Mapping[str, Result]) -> bytes:
    """The result's tensors and the tree they sit in, as one safetensors file (a session's
    results, by run name, in one file)."""
    tensors: dict[str, torch.Tensor] = {}

    def tensor(value: torch.Tensor) -> str:
        ref = f"r{len(tensors)}"
        tensors[ref] = value.detach().to("cpu").clone()
        return ref

    def node(value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            return {"tensor": tensor(value)}
        if isinstance(value, torch.return_types.topk):
            return {"topk": [tensor(value.values), tensor(value.indices)]}
        if isinstance(value, Mapping):
            kind = type(value)
            name = None if kind is dict else f"{kind.__module__}.{kind.__qualname__}"
            fields = {str(k): node(v) for k, v in value.items()}
            return {"mapping": name, "fields": {k: v for k, v in fields.items() if v}}
        if isinstance(value, (tuple, list)):
            kind = "list" if isinstance(value, list) else "tuple"
            return {"sequence": kind, "items": [node(v) or {"value": None} for v in value]}
        if isinstance(value, float) and not math.isfinite(value):
            return {"float": repr(value)}
        if isinstance(value, _SCALARS):
            return {"value": value}
        return {}  # not transferable (a cache object, ...): left out

    def describe(result: Result) -> dict[str, Any]:
        return {
            "output": node(result.output) or {"value": None},
            "saved": {key: [node(v) for v in values] for key, values in result.records.items()},
        }

    try:
        if isinstance(result, Mapping):  # a session's results, by run name
            runs = [{"name": name, **describe(r)} for name, r in result.items()]
            return pack({"version": 1, "runs": runs}, tensors, key=RESULT_KEY)
        return pack({"version": 1, **describe(result)}, tensors, key=RESULT_KEY)
    finally:  # `node` calls itself: a closure cycle holding `tensors` (a copy of every
        tensors.clear()  # result tensor) until the cyclic collector runs, if it ever does


def decode_result(data: bytes | torch.Tensor) -> Result | dict[str, Result]:
    """A :class:`Result` from a host's result file (the same class local ``ts.run`` returns).

    ``data`` is the file's bytes or a 1-D ``uint8`` tensor holding them (what
    ``Client`` streams a large download into): then the result's large tensors are views
    of that buffer, with no copy.

    The client trusts the host with numbers, not with code: the file is read with the same
    checked reader as a plan, every entry must be one the encoder writes, and nothing it
    names is imported. A mapping comes back as the ``transformers`` output class it names
    only if that class is a known ``ModelOutput`` (:func:`_output_class`), else as a plain
    ``dict``. A malformed file raises :class:`RemoteError` ``bad_result`` naming the entry.
    """
    size = data.numel() if isinstance(data, torch.Tensor) else len(data)
    limits = PlanLimits(
        max_plan_bytes=size,
        max_tensor_bytes=size,
        max_total_tensor_bytes=size,
        max_tensors=1 << 20,
    )
    try:
        description, tensors = unpack_container(data, RESULT_KEY, limits, "result")
    except PlanFormatError as error:  # PlanLimitError included
        raise _bad_result(error.reason, error.field) from None
    if not isinstance(description, dict) or description.get("version") != 1:
        raise _bad_result("unsupported result version", "version")
    if "runs" in description:
        runs = description["runs"]
        if not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs
        ):
            raise _bad_result("a session result has a list of named runs", "runs")
        return {r["name"]: _decode_one(r, tensors, f"runs.{i}.") for i, r in enumerate(runs)}
    return _decode_one(description, tensors, "")


def _decode_one(
    description: dict[str, Any], tensors: Mapping[str, torch.Tensor], at: str
) -> Result:
    saved = description.get("saved")
    if "output" not in description or not isinstance(saved, dict):
        raise _bad_result("a result has an 'output' entry and a 'saved' object", at + "saved")

    def tensor(ref: Any, where: str) -> torch.Tensor:
        if not isinstance(ref, str) or ref not in tensors:
            raise _bad_result(f"no tensor {ref!r} in the result file", where)
        return tensors[ref]

    def build(entry: Any, where: str) -> Any:
        kind = set(entry) if isinstance(entry, dict) else None
        if kind == {"tensor"}:
            return tensor(entry["tensor"], where)
        if kind == {"topk"} and isinstance(entry["topk"], list) and len(entry["topk"]) == 2:
            values, indices = (tensor(ref, where) for ref in entry["topk"])
            return torch.return_types.topk((values, indices))
        if kind == {"mapping", "fields"} and isinstance(entry["fields"], dict):
            fields = {k: build(v, f"{where}.{k}") for k, v in entry["fields"].items()}
            return _mapping(entry["mapping"], fields)
        if (
            kind == {"sequence", "items"}
            and entry["sequence"] in ("list", "tuple")
            and isinstance(entry["items"], list)
        ):
            items = [build(v, f"{where}.{i}") for i, v in enumerate(entry["items"])]
            return items if entry["sequence"] == "list" else tuple(items)
        if kind == {"float"} and entry["float"] in ("nan", "inf", "-inf"):
            return float(entry["float"])
        if kind == {"value"} and isinstance(entry["value"], _SCALARS):
            return entry["value"]
        if kind == set():  # a value that did not travel (a cache object)
            return None
        raise _bad_result(f"malformed result entry {str(entry)[:200]}", where)

    output = build(description["output"], at + "output")
    records: dict[str, list[Any]] = {}
    for key, values in saved.items():
        if not isinstance(values, list):
            raise _bad_result("a saved entry is a list of values", f"{at}saved.{key}")
        records[str(key)] = [build(v, f"{at}saved.{key}.{i}") for i, v in enumerate(values)]
    return Result(output, records)


def _bad_result(message: str, field: str = "") -> RemoteError:
    return RemoteError(502, "bad_result", f"the host sent a malformed result: {message}", field)


def _mapping(name: Any, fields: dict[str, Any]) -> Any:
    """An instance of the known output class ``name``, else ``fields`` as a plain dict."""
    cls = _output_class(name) if isinstance(name, str) else None
    if cls is None:
        return fields
    try:
        return cls(**fields)
    except (TypeError, ValueError):  # fields this transformers version's class lacks
        return fields


def _output_class(name: str) -> type | None:
    """The ``ModelOutput`` class a result names, looked up without importing anything.

    Known: the classes ``transformers.modeling_outputs`` defines (a table built from that
    module's own namespace), and ``ModelOutput`` classes a ``transformers.models`` module
    that this process has *already imported* defines (``Qwen2VLCausalLMOutputWithPast``:
    its modeling module is loaded once the model was built or loaded here). The name is
    only compared with those tables, never imported or passed to ``getattr``.
    """
    known = _output_classes()
    if name in known:
        return known[name]
    module_name, _, qualname = name.rpartition(".")
    if not module_name.startswith("transformers.models."):
        return None
    module = sys.modules.get(module_name)
    if module is None:
        return None
    from transformers.utils import ModelOutput  # loaded: a transformers module is

    cls = vars(module).get(qualname)
    if (
        isinstance(cls, type)
        and issubclass(cls, ModelOutput)
        and cls.__module__ == module_name
        and cls.__qualname__ == qualname
    ):
        return cls
    return None


@functools.cache
def _output_classes() -> dict[str, type]:
    """``"module.Class" -> class`` of each ``ModelOutput`` in ``transformers.modeling_outputs``."""
    try:
        from transformers import modeling_outputs
        from transformers.utils import ModelOutput
    except ImportError:
        return {}
    return {
        f"{cls.__module__}.{cls.__qualname__}": cls
        for cls in vars(modeling_outputs).values()
        if isinstance(cls, type)
        and issubclass(cls, ModelOutput)
        and cls.__module__ == modeling_outputs.__name__
    }
