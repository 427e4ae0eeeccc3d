"""What travels between client and host besides plans: a request's inputs, a run's result.

Both are safetensors files with a JSON description in their metadata, like a plan file —
no pickle in either direction.

- A *request* holds the plan file's bytes (a ``uint8`` tensor named ``plan``) and the
  model's inputs: positional and keyword arguments that are tensors (``a0``, ``k.<name>``)
  or JSON scalars, or a list of texts for a host-side tokenizer.
- A *result* holds the tensors of a :class:`~torchsurgeon.layers.results.Result` (``r0``,
  ``r1``, ...) and the tree they sit in: the output (a tensor, a tuple, a dict, a
  ``transformers`` ``ModelOutput`` — rebuilt only as an output class the client already
  knows, never by importing a name from the file), the saved entries, and ``topk``
  reductions as ``torch.return_types.topk``. Values that are neither tensors nor JSON
  scalars (a KV cache object) do not travel.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchsurgeon.layers.results import Result
from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.wire import pack, unpack_container
from torchsurgeon.remote.errors import ApiError, RemoteError
from torchsurgeon.remote.limits import Limits

__all__ = [
    "Inputs",
    "decode_request",
    "decode_result",
    "decode_submission",
    "encode_request",
    "encode_result",
    "encode_session",
    "result_nbytes",
]

REQUEST_KEY = "torchsurgeon.request"
RESULT_KEY = "torchsurgeon.result"
_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Inputs:
    """A model call's arguments as they arrived: tensors and scalars, or texts to tokenize."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    text: tuple[str, ...] | None = None
    padding_side: str | None = None
    """For texts: ``"left"``, ``"right"``, or ``None`` (the host's default: left)."""
    call: str = "forward"
    """``"forward"`` (the model's call), ``"generate"`` (``kwargs`` are then the checked
    ``generate`` options; see the host's schema) or ``"train"`` (a training loop over
    ``batches`` with the settings in ``train``)."""
    train: Mapping[str, Any] | None = None
    """For ``call="train"``: ``params`` (tensor names), ``optimizer`` (JSON), ``steps``."""
    batches: tuple[Inputs, ...] = ()
    """For ``call="train"``: each step's inputs (step ``i`` runs batch ``i % len``)."""
    trained: str | None = None
    """In a session: the earlier training run whose trained tensors this run's layers use."""
    alone: bool = False
    """The request asked not to be co-batched with others (``Client.run(co_batch=False)``)."""


# --------------------------------------------------------------------------- requests


def encode_request(
    plan_bytes: bytes,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    call: str = "forward",
    **details: Any,
) -> bytes:
    """A submission: the plan file's bytes and the call's inputs (texts, tensors, scalars).

    With texts, ``kwargs`` may hold ``padding_side="left"`` or ``"right"``: how the host's
    tokenizer pads them (default: left, so the last position is every row's last token).
    ``call="generate"`` asks for ``model.generate(*args, **kwargs)``; ``call="train"`` for
    a training loop (``details``: ``training=`` settings and ``batches=``).
    """
    tensors: dict[str, torch.Tensor] = {"plan": _bytes_tensor(plan_bytes)}
    description = {"version": 1, **_describe_call(args, kwargs, "", tensors, call, **details)}
    return pack(description, tensors, key=REQUEST_KEY)


def encode_session(
    runs: Sequence[tuple[str, bytes, Sequence[Any], Mapping[str, Any], str, Mapping[str, Any]]],
) -> bytes:
    """A session submission: ``(name, plan bytes, args, kwargs, call, details)`` per run, in
    order (``details``: a training run's ``training`` and ``batches``, ``trained``).

    Run ``i``'s plan is tensor ``plan.<i>`` and its input tensors are prefixed ``<i>.``.
    """
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, (name, plan_bytes, args, kwargs, call, details) in enumerate(runs):
        tensors[f"plan.{i}"] = _bytes_tensor(plan_bytes)
        call_description = _describe_call(args, kwargs, f"{i}.", tensors, call, **details)
        described.append({"name": name, **call_description})
    return pack({"version": 1, "runs": described}, tensors, key=REQUEST_KEY)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _describe_call(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    prefix: str,
    tensors: dict[str, torch.Tensor],
    call: str = "forward",
    training: Mapping[str, Any] | None = None,
    batches: Sequence[tuple[Sequence[Any], Mapping[str, Any]]] = (),
    trained: str | None = None,
    alone: bool = False,
) -> dict[str, Any]:
    """One call's inputs as a description; its tensors are added to ``tensors``.

    A training call (``call="train"``) has no inputs of its own: ``batches`` are described
    one by one (their tensors prefixed ``b<i>.``) and ``training`` holds its settings.
    """
    kwargs = dict(kwargs)
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
            tensors[f"{prefix}a{i}"] = value.detach().to("cpu").contiguous()
            described_args.append({"tensor": f"{prefix}a{i}"})
        else:
            described_args.append({"value": _scalar(value, f"argument {i}")})
    padding_side = kwargs.pop("padding_side", None)
    if padding_side is not None and (texts is None or padding_side not in _PADDING_SIDES):
        raise TypeError(
            f"padding_side={padding_side!r}: it is 'left' or 'right', and only for text inputs"
        )
    described_kwargs: dict[str, dict[str, Any]] = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}k.{name}"] = value.detach().to("cpu").contiguous()
            described_kwargs[name] = {"tensor": f"{prefix}k.{name}"}
        else:
            described_kwargs[name] = {"value": _scalar(value, f"keyword argument {name!r}")}
    description: dict[str, Any] = {
        "args": described_args,
        "kwargs": described_kwargs,
        "text": texts,
    }
    if padding_side is not None:
        description["padding_side"] = padding_side
    if call != "forward":
        if call not in _CALLS:
            raise ValueError(f"call={call!r}: one of {', '.join(_CALLS)}")
        description["call"] = call
    if call == "train":
        description["train"] = dict(training or {})
        description["batches"] = [
            _describe_call(a, k, f"{prefix}b{i}.", tensors) for i, (a, k) in enumerate(batches)
        ]
    if trained is not None:
        description["trained"] = trained
    if alone:
        description["alone"] = True
    return description


def _scalar(value: Any, what: str) -> Any:
    if isinstance(value, _SCALARS) and not (isinstance(value, float) and not math.isfinite(value)):
        return value
    raise TypeError(
        f"{what} is a {type(value).__name__}; a remote call takes tensors, finite numbers, "
        "strings, booleans or None"
    )


_PADDING_SIDES = ("left", "right")
_DESCRIPTION_KEYS = {
    "args", "kwargs", "text", "padding_side", "call", "train", "batches", "trained", "alone"
}  # fmt: skip
_CALLS = ("forward", "generate", "train")
_MAX_BATCHES = 256
_MAX_ARGUMENTS = 64


def decode_request(data: bytes, limits: Limits) -> tuple[bytes, Inputs]:
    """``(plan bytes, inputs)`` of a one-run submission; :class:`ApiError` (4xx) naming the
    problem (a session is refused here: read it with :func:`decode_submission`)."""
    runs = decode_submission(data, limits)
    if len(runs) != 1 or runs[0][0] is not None:
        raise ApiError(400, "bad_request", "expected one run, got a session", "runs")
    return runs[0][1], runs[0][2]


def decode_submission(data: bytes, limits: Limits) -> list[tuple[str | None, bytes, Inputs]]:
    """``[(run name, plan bytes, inputs)]`` of a submission: one run (named ``None``) or a
    session's runs in order; :class:`ApiError` (4xx) naming the problem.

    This checks the request's *form* — the container, the description's fields, which
    tensor each argument names, the texts' sizes. Whether the model takes these arguments
    (names, dtypes, shapes, token ids in range) is checked against the model by
    :meth:`~torchsurgeon.remote.hosted.HostedModel.call_arguments`.
    """
    try:
        description, tensors = unpack_container(
            data, REQUEST_KEY, limits.request_limits(), "request"
        )
    except PlanLimitError as error:
        raise ApiError(413, "too_large", error.reason, error.field) from None
    except PlanFormatError as error:
        raise ApiError(400, "bad_request", error.reason, error.field) from None
    if not isinstance(description, dict):
        raise ApiError(400, "bad_request", "the request description is not a JSON object")
    version = description.get("version")
    if type(version) is not int or version != 1:  # true == 1 in Python: checked by type
        raise ApiError(
            400, "bad_request", f"unsupported request version {_shown(version)}", "version"
        )
    for name, tensor in tensors.items():
        if name == "plan" or name.startswith("plan."):
            continue
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
    if "runs" not in description:
        call = {k: v for k, v in description.items() if k != "version"}
        runs = [
            (
                None,
                _plan_bytes(tensors, "plan", limits, used),
                _read_call(call, tensors, used, "", limits),
            )
        ]
    else:
        unknown = sorted(set(description) - {"version", "runs"})
        raw_runs = description["runs"]
        if unknown or not isinstance(raw_runs, list) or not raw_runs:
            raise ApiError(
                400, "bad_request", "a session request has a non-empty list 'runs' only", "runs"
            )
        if len(raw_runs) > limits.max_session_runs:
            raise ApiError(
                413,
                "too_large",
                f"{len(raw_runs)} runs, over the limit max_session_runs={limits.max_session_runs}",
                "runs",
            )
        runs = []
        names: set[str] = set()
        for i, raw in enumerate(raw_runs):
            where = f"runs.{i}"
            if not isinstance(raw, dict):
                raise ApiError(400, "bad_request", "a run is a JSON object", where)
            name = raw.get("name")
            if not isinstance(name, str) or not name.isidentifier() or len(name) > 64:
                raise ApiError(
                    400,
                    "bad_request",
                    f"a run's name is an identifier, got {_shown(name)}",
                    f"{where}.name",
                )
            if name in names:
                raise ApiError(400, "bad_request", f"two runs are named {name!r}", f"{where}.name")
            names.add(name)
            call = {k: v for k, v in raw.items() if k != "name"}
            plan = _plan_bytes(tensors, f"plan.{i}", limits, used)
            runs.append((name, plan, _read_call(call, tensors, used, f"{where}.", limits)))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ApiError(
            400,
            "bad_request",
            f"tensors {_shown(unused)} are not used by any argument",
            "inputs",
        )
    return runs


def _plan_bytes(
    tensors: Mapping[str, torch.Tensor], name: str, limits: Limits, used: set[str]
) -> bytes:
    plan = tensors.get(name)
    if plan is None or plan.dtype != torch.uint8 or plan.dim() != 1:
        raise ApiError(400, "bad_request", "the request holds no plan (a 1-D uint8 tensor)", name)
    if plan.numel() > limits.max_plan_bytes:
        raise ApiError(
            413,
            "too_large",
            f"the plan is {plan.numel()} bytes, over the limit max_plan_bytes="
            f"{limits.max_plan_bytes}",
            name,
        )
    used.add(name)
    return plan.numpy().tobytes()


def _read_call(
    description: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    used: set[str],
    where: str,
    limits: Limits,
) -> Inputs:
    """One call's :class:`Inputs` from its description (``args``, ``kwargs``, ``text``)."""
    unknown = sorted(set(description) - _DESCRIPTION_KEYS)
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown request field(s) {_shown(unknown)}; a request has "
            f"{', '.join(sorted(_DESCRIPTION_KEYS))}",
            where + unknown[0][:64],
        )

    def read(entry: Any, at: str) -> Any:
        if (
            isinstance(entry, dict)
            and set(entry) == {"tensor"}
            and isinstance(entry["tensor"], str)
            and entry["tensor"] in tensors
            and not entry["tensor"].startswith("plan")
        ):
            if entry["tensor"] in used:
                raise ApiError(400, "bad_request", f"tensor {entry['tensor']!r} is used twice", at)
            used.add(entry["tensor"])
            return tensors[entry["tensor"]]
        if (
            isinstance(entry, dict)
            and set(entry) == {"value"}
            and isinstance(entry["value"], _SCALARS)
        ):
            return entry["value"]
        raise ApiError(400, "bad_request", f"malformed input entry {_shown(entry)}", at)

    raw_args, raw_kwargs = description.get("args"), description.get("kwargs")
    if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
        raise ApiError(
            400, "bad_request", "args must be a list and kwargs an object", where + "inputs"
        )
    if len(raw_args) + len(raw_kwargs) > _MAX_ARGUMENTS:
        raise ApiError(
            413,
            "too_large",
            f"{len(raw_args) + len(raw_kwargs)} arguments, over the limit of {_MAX_ARGUMENTS}",
            where + "inputs",
        )
    args = tuple(read(entry, f"{where}args.{i}") for i, entry in enumerate(raw_args))
    kwargs = {}
    for name, entry in raw_kwargs.items():
        if not name.isidentifier() or len(name) > 64:
            raise ApiError(
                400, "bad_request", f"bad keyword argument name {_shown(name)}", where + "kwargs"
            )
        kwargs[name] = read(entry, f"{where}kwargs.{name}")
    text = _read_text(description.get("text"), limits)
    if text is not None and args:
        raise ApiError(
            400, "bad_request", "give text or positional tensors, not both", where + "text"
        )
    padding_side = description.get("padding_side")
    if padding_side is not None and (text is None or padding_side not in _PADDING_SIDES):
        raise ApiError(
            400,
            "bad_request",
            f"padding_side is 'left' or 'right' (or absent: left), and only with text; got "
            f"{_shown(padding_side)}",
            where + "padding_side",
        )
    call = description.get("call", "forward")
    if call not in _CALLS:
        raise ApiError(
            400,
            "bad_request",
            f"call is one of {', '.join(_CALLS)}, got {_shown(call)}",
            where + "call",
        )
    trained = description.get("trained")
    if trained is not None and (not isinstance(trained, str) or not trained.isidentifier()):
        raise ApiError(400, "bad_request", "trained names an earlier run", where + "trained")
    alone = description.get("alone", False)
    if type(alone) is not bool:
        raise ApiError(400, "bad_request", "alone is true or false", where + "alone")
    training, batches = description.get("train"), description.get("batches")
    if call != "train":
        if training is not None or batches is not None:
            raise ApiError(
                400, "bad_request", "train and batches go with call='train'", where + "call"
            )
        return Inputs(args, kwargs, text, padding_side, call, trained=trained, alone=alone)
    if args or kwargs or text is not None:
        raise ApiError(
            400, "bad_request", "a training call's inputs are its batches", where + "args"
        )
    if not isinstance(training, dict):
        raise ApiError(400, "bad_request", "a training call has a 'train' object", where + "train")
    if not isinstance(batches, list) or not 0 < len(batches) <= _MAX_BATCHES:
        raise ApiError(
            400,
            "bad_request",
            f"a training call has 1 to {_MAX_BATCHES} batches",
            where + "batches",
        )
    read_batches = []
    for i, batch in enumerate(batches):
        at = f"{where}batches.{i}."
        if not isinstance(batch, dict) or {"train", "batches", "call", "trained"} & set(batch):
            raise ApiError(400, "bad_request", "a batch is one call's inputs", at[:-1])
        read_batches.append(_read_call(batch, tensors, used, at, limits))
    return Inputs(args, kwargs, None, None, call, training, tuple(read_batches), trained)


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


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: an error message quotes what was sent, never all of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
