"""What travels between client and host besides plans: a request's inputs, a run's result.

Both are safetensors files with a JSON description in their metadata, like a plan file —
no pickle in either direction.

- A *request* holds the plan file's bytes (a ``uint8`` tensor named ``plan``) and the
  model's inputs: positional and keyword arguments that are tensors (``a0``, ``k.<name>``)
  or JSON scalars, or a list of texts for a host-side tokenizer.
- A *result* holds the tensors of a :class:`~torchsurgeon.layers.results.Result` (``r0``,
  ``r1``, ...) and the tree they sit in: the output (a tensor, a tuple, a dict, a
  ``transformers`` ``ModelOutput`` — rebuilt by class name from ``transformers`` only), the
  saved entries, and ``topk`` reductions as ``torch.return_types.topk``. Values that are
  neither tensors nor JSON scalars (a KV cache object) do not travel.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchsurgeon.layers.results import Result
from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.wire import pack, unpack_container
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits

__all__ = [
    "Inputs",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
    "result_nbytes",
]

REQUEST_KEY = "torchsurgeon.request"
RESULT_KEY = "torchsurgeon.result"
_SCALARS = (bool, int, float, str, type(None))
_OUTPUT_MODULE = re.compile(r"^transformers(\.[A-Za-z0-9_]+)+$")


@dataclass(frozen=True)
class Inputs:
    """A model call's arguments as they arrived: tensors and scalars, or texts to tokenize."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    text: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- requests


def encode_request(plan_bytes: bytes, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """A submission: the plan file's bytes and the call's inputs (texts, tensors, scalars)."""
    tensors: dict[str, torch.Tensor] = {
        "plan": torch.frombuffer(bytearray(plan_bytes), dtype=torch.uint8)
        if plan_bytes
        else torch.zeros(0, dtype=torch.uint8)
    }
    texts: list[str] | None = None
    described_args: list[dict[str, Any]] = []
    for i, value in enumerate(args):
        if isinstance(value, str) or (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
        ):
            if len(args) != 1:
                raise TypeError("text input must be the only positional argument")
            texts = [value] if isinstance(value, str) else list(value)
        elif isinstance(value, torch.Tensor):
            tensors[f"a{i}"] = value.detach().to("cpu").contiguous()
            described_args.append({"tensor": f"a{i}"})
        else:
            described_args.append({"value": _scalar(value, f"argument {i}")})
    described_kwargs: dict[str, dict[str, Any]] = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[f"k.{name}"] = value.detach().to("cpu").contiguous()
            described_kwargs[name] = {"tensor": f"k.{name}"}
        else:
            described_kwargs[name] = {"value": _scalar(value, f"keyword argument {name!r}")}
    description = {"version": 1, "args": described_args, "kwargs": described_kwargs, "text": texts}
    return pack(description, tensors, key=REQUEST_KEY)


def _scalar(value: Any, what: str) -> Any:
    if isinstance(value, _SCALARS) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    raise TypeError(
        f"{what} is a {type(value).__name__}; a remote call takes tensors, finite numbers, "
        "strings, booleans or None"
    )


def decode_request(data: bytes, limits: Limits) -> tuple[bytes, Inputs]:
    """``(plan bytes, inputs)`` of a submission; :class:`ApiError` (4xx) naming the problem."""
    try:
        description, tensors = unpack_container(
            data, REQUEST_KEY, limits.request_limits(), "request"
        )
    except PlanLimitError as error:
        raise ApiError(413, "too_large", error.reason, error.field) from None
    except PlanFormatError as error:
        raise ApiError(400, "bad_request", error.reason, error.field) from None
    if not isinstance(description, dict) or description.get("version") != 1:
        raise ApiError(400, "bad_request", "unsupported request version", "version")
    plan = tensors.pop("plan", None)
    if plan is None or plan.dtype != torch.uint8 or plan.dim() != 1:
        raise ApiError(400, "bad_request", "the request holds no plan (a 1-D uint8 tensor)", "plan")
    if plan.numel() > limits.max_plan_bytes:
        raise ApiError(
            413,
            "too_large",
            f"the plan is {plan.numel()} bytes, over the limit max_plan_bytes="
            f"{limits.max_plan_bytes}",
            "plan",
        )
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size > limits.max_tensor_bytes:
            raise ApiError(
                413,
                "too_large",
                f"input tensor {name!r} is {size} bytes, over the limit max_tensor_bytes="
                f"{limits.max_tensor_bytes}",
                "inputs",
            )
    used: set[str] = set()

    def read(entry: Any, where: str) -> Any:
        if isinstance(entry, dict) and set(entry) == {"tensor"} and entry["tensor"] in tensors:
            used.add(entry["tensor"])
            return tensors[entry["tensor"]]
        if (
            isinstance(entry, dict)
            and set(entry) == {"value"}
            and isinstance(entry["value"], _SCALARS)
        ):
            return entry["value"]
        raise ApiError(400, "bad_request", f"malformed input entry {entry!r}", where)

    raw_args, raw_kwargs = description.get("args"), description.get("kwargs")
    if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
        raise ApiError(400, "bad_request", "args must be a list and kwargs an object", "inputs")
    args = tuple(read(entry, f"args.{i}") for i, entry in enumerate(raw_args))
    kwargs = {}
    for name, entry in raw_kwargs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ApiError(400, "bad_request", f"bad keyword argument name {name!r}", "kwargs")
        kwargs[name] = read(entry, f"kwargs.{name}")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ApiError(
            400, "bad_request", f"tensors {unused} are not used by any argument", "inputs"
        )
    text = _read_text(description.get("text"), limits)
    if text is not None and args:
        raise ApiError(400, "bad_request", "give text or positional tensors, not both", "text")
    return plan.numpy().tobytes(), Inputs(args, kwargs, text)


def _read_text(text: Any, limits: Limits) -> tuple[str, ...] | None:
    if text is None:
        return None
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        raise ApiError(400, "bad_request", "text must be a non-empty list of strings", "text")
    if len(text) > limits.max_text_items or sum(map(len, text)) > limits.max_text_chars:
        raise ApiError(
            413,
            "too_large",
            f"{len(text)} texts of {sum(map(len, text))} characters; limits are "
            f"max_text_items={limits.max_text_items}, max_text_chars={limits.max_text_chars}",
            "text",
        )
    return tuple(text)


# --------------------------------------------------------------------------- results


def result_nbytes(result: Result) -> int:
    """The bytes the result's tensors will take on the wire (before encoding them)."""
    return sum(t.numel() * t.element_size() for t in _tensors_in((result.output, result.records)))


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def encode_result(result: Result) -> bytes:
    """The result's tensors and the tree they sit in, as one safetensors file."""
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

    description = {
        "version": 1,
        "output": node(result.output) or {"value": None},
        "saved": {key: [node(v) for v in values] for key, values in result.records.items()},
    }
    return pack(description, tensors, key=RESULT_KEY)


def decode_result(data: bytes) -> Result:
    """A :class:`Result` from a host's result file (the same class local ``ts.run`` returns)."""
    limits = PlanLimits(
        max_plan_bytes=len(data),
        max_tensor_bytes=len(data),
        max_total_tensor_bytes=len(data),
        max_tensors=1 << 20,
    )
    description, tensors = unpack_container(data, RESULT_KEY, limits, "result")

    def build(entry: dict[str, Any]) -> Any:
        if "tensor" in entry:
            return tensors[entry["tensor"]]
        if "topk" in entry:
            values, indices = entry["topk"]
            return torch.return_types.topk((tensors[values], tensors[indices]))
        if "mapping" in entry:
            fields = {k: build(v) for k, v in entry["fields"].items()}
            return _mapping(entry["mapping"], fields)
        if "sequence" in entry:
            items = [build(v) for v in entry["items"]]
            return items if entry["sequence"] == "list" else tuple(items)
        if "float" in entry:
            return float(entry["float"])
        return entry.get("value")

    output = build(description["output"])
    records = {str(key): [build(v) for v in values] for key, values in description["saved"].items()}
    return Result(output, records)


def _mapping(name: str | None, fields: dict[str, Any]) -> Any:
    """A ``ModelOutput`` of the named ``transformers`` class, else a plain dict."""
    if name is None:
        return fields
    module_name, _, qualname = name.rpartition(".")
    if not _OUTPUT_MODULE.match(module_name) or not qualname.isidentifier():
        return fields
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        from transformers.utils import ModelOutput
    except ImportError:
        return fields
    cls = getattr(module, qualname, None)
    if isinstance(cls, type) and issubclass(cls, ModelOutput):
        return cls(**fields)
    return fields
