"""A request on the wire: the plan file's bytes and the model's inputs, as safetensors.

A request holds the plan file's bytes (a ``uint8`` tensor named ``plan``) and the model's
inputs: positional and keyword arguments that are tensors (``a0``, ``k.<name>``) or JSON
scalars, or a list of texts for a host-side tokenizer — with a JSON description in its
metadata, like a plan file: no pickle in either direction. Results are
:mod:`torchsurgeon.remote.result_wire`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.wire import pack, unpack_container
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits

__all__ = [
    "REQUEST_KEY",
    "Inputs",
    "decode_request",
    "decode_submission",
    "encode_request",
    "encode_session",
]

REQUEST_KEY = "torchsurgeon.request"
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
