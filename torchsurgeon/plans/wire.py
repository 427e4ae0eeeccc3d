"""The plan file: one safetensors file whose metadata holds the JSON manifest.

A plan on disk or on the wire is exactly a safetensors file (8-byte little-endian header
length, a JSON header, raw tensor bytes): the tensors are the layers' tensors (``t0``,
``t1``, ...) and ``__metadata__["torchsurgeon.plan"]`` is the manifest JSON. Nothing here
unpickles or executes anything; ``torch.load`` cannot read the file, and a pickle or a
``torch.save`` zip handed to :func:`unpack` is named as such and refused.

:func:`unpack` checks the container before any tensor is materialised — total size, header
size and JSON nesting depth, every tensor's dtype, shape and byte range, the tensor count
and sizes — and then lets ``safetensors`` load the bytes. The manifest's *meaning* is
checked by :mod:`torchsurgeon.plans.schema`.

Every JSON text torchsurgeon reads from the wire goes through :func:`parse_json`, which is
linear in time in the text's length whatever it holds. The nesting depth is measured before
parsing: escapes are cut out with ``bytes.replace``, then which bytes lie inside strings and
the brackets' running depth are vectorised cumulative sums (no regular expression, so
nothing can backtrack). The parse itself is strict: integers of at most 19 digits inside
the int64 range (Python's own int parser is quadratic in the digits and refuses more than
4,300), finite floats only (``1e400`` would parse as infinity), no ``NaN``/``Infinity``, no
repeated keys in an object, no lone UTF-16 surrogate escape (which no UTF-8 text can hold,
and which would break every answer that quotes the string).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.schema import PlanLimits

__all__ = ["METADATA_KEY", "json_depth", "pack", "parse_json", "unpack", "unpack_container"]

METADATA_KEY = "torchsurgeon.plan"
_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtypes a file may hold, with the torch dtype each one is."""
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
"""A high surrogate escape with no low one after it, or a low one with no high one before."""
_BRACKET_STEPS = np.zeros(256, dtype=np.int8)
_BRACKET_STEPS[[ord("["), ord("{")]] = 1
_BRACKET_STEPS[[ord("]"), ord("}")]] = -1
INT64 = (-(1 << 63), (1 << 63) - 1)


def pack(
    manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key: str = METADATA_KEY
) -> bytes:
    """The file's bytes: ``tensors`` with ``manifest`` as JSON in ``metadata[key]``."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    data: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()  # safetensors refuses two tensors sharing memory
        storages.add(tensor.untyped_storage().data_ptr())
        data[name] = tensor
    return save_safetensors(data, metadata={key: text})


def unpack(data: bytes, limits: PlanLimits) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(manifest JSON value, tensors)`` from a plan file's bytes, container checked first."""
    return unpack_container(data, METADATA_KEY, limits, what="plan")


def unpack_container(
    data: bytes | torch.Tensor, key: str, limits: PlanLimits, what: str = "plan"
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON in metadata[key], tensors)`` of a safetensors file, within ``limits``.

    The same checked reader serves plans and anything else torchsurgeon ships as
    safetensors + JSON (a host's requests, its results); ``what`` names the kind in
    messages. ``data`` is the file's bytes, or a 1-D ``uint8`` CPU tensor holding them (a
    download streamed into memory): then each tensor of 1 MiB or more is a view of that
    buffer, not a copy, and smaller ones are copied out of it (so a small tensor does not
    keep a large buffer alive).
    """
    buffer = None
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1 or data.device.type != "cpu":
            raise PlanFormatError(
                f"expected bytes or a 1-D uint8 CPU tensor, got a {data.dim()}-D "
                f"{str(data.dtype).removeprefix('torch.')} tensor on {data.device}"
            )
        buffer = data.contiguous()
        size = buffer.numel()
        prefix = memoryview(buffer.numpy())
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        size = len(data)
        prefix = memoryview(data)
    else:
        raise PlanFormatError(f"expected bytes, got {type(data).__name__}")
    if size > limits.max_plan_bytes:
        raise PlanLimitError(
            f"the {what} is {size} bytes, over the limit of {limits.max_plan_bytes}"
        )
    if size < 8:
        raise PlanFormatError(f"truncated: {size} bytes, too short for a {what} header")
    (header_size,) = struct.unpack("<Q", prefix[:8])
    if header_size > limits.max_manifest_bytes or 8 + header_size > size:
        _refuse_other_formats(bytes(prefix[:8]), what)  # a nonsensical header length: say what
    if header_size > limits.max_manifest_bytes:
        raise PlanLimitError(
            f"the header claims {header_size} bytes, over the limit of "
            f"{limits.max_manifest_bytes} (or this is not a {what} file)"
        )
    if 8 + header_size > size:
        raise PlanFormatError(
            f"truncated: the header claims {header_size} bytes but the file has only "
            f"{size - 8} after the length prefix"
        )
    header = parse_json(bytes(prefix[8 : 8 + header_size]), "the safetensors header", limits)
    if not isinstance(header, dict):
        raise PlanFormatError("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(key), str):
        raise PlanFormatError(f"no {key!r} entry in the file's metadata: not a {what}")
    _check_entries(header, size - 8 - header_size, limits)
    manifest = parse_json(metadata[key], f"the {what}'s JSON", limits)
    if buffer is not None:
        return manifest, _views(buffer, header, 8 + header_size)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise PlanFormatError(f"the tensor data is malformed: {error}") from None
    return manifest, tensors


_VIEW_BYTES = 1 << 20


def _views(buffer: torch.Tensor, header: dict[str, Any], start: int) -> dict[str, torch.Tensor]:
    """The tensors of a checked header (:func:`_check_entries`) as views of ``buffer``.

    A tensor whose bytes are not aligned to its element size (a producer other than
    safetensors may write such a file) and any under 1 MiB are copied out instead.
    """
    tensors = {}
    for name, entry in header.items():
        begin, end = (start + o for o in entry["data_offsets"])
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        raw = buffer[begin:end]
        if end - begin < _VIEW_BYTES or begin % dtype.itemsize:
            raw = raw.clone()
        if entry["dtype"] == "BOOL" and bool((raw > 1).any()):
            raise PlanFormatError("a bool tensor holds bytes other than 0 and 1", f"tensors.{name}")
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


def _refuse_other_formats(data: bytes, what: str) -> None:
    """Name a pickle or a zip (``torch.save``) handed in as a safetensors file."""
    is_pickle = data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    is_zip = data[:4] == b"PK\x03\x04"
    if is_pickle or is_zip:
        kind = "a pickle" if data[:1] == b"\x80" else "a zip archive (torch.save writes these)"
        raise PlanFormatError(
            f"this is {kind}, not a {what}: torchsurgeon reads safetensors + JSON only and "
            "never unpickles anything"
        )


def _check_entries(header: dict[str, Any], data_size: int, limits: PlanLimits) -> None:
    if len(header) > limits.max_tensors:
        raise PlanLimitError(f"{len(header)} tensors, over the limit of {limits.max_tensors}")
    total = 0
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        field = f"tensors.{name}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PlanFormatError("malformed tensor entry in the safetensors header", field)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise PlanFormatError(
                f"dtype {dtype!r} is not allowed; allowed: {', '.join(_SAFETENSORS_DTYPES)}", field
            )
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise PlanFormatError(f"bad shape {shape!r}", field)
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if nbytes > limits.max_tensor_bytes:
            raise PlanLimitError(
                f"{nbytes} bytes, over the per-tensor limit of {limits.max_tensor_bytes}", field
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
            and offsets[1] - offsets[0] == nbytes
        ):
            raise PlanFormatError(
                f"data_offsets {offsets!r} do not fit {nbytes} bytes inside the {data_size} data "
                "bytes (truncated file?)",
                field,
            )
        total += nbytes
        ranges.append((offsets[0], offsets[1], name))
    if total > limits.max_total_tensor_bytes:
        raise PlanLimitError(
            f"the tensors hold {total} bytes, over the limit of {limits.max_total_tensor_bytes}"
        )
    ranges.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(ranges):
        if start < end:
            raise PlanFormatError(f"tensors {first!r} and {second!r} overlap in the file")


def json_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (strings skipped), without parsing.

    Linear in ``len(text)`` whatever it holds (see :func:`parse_json`).
    """
    return _shape(_unescaped(bytes(text)))[0]


def _unescaped(text: bytes) -> bytes:
    """``text`` without escaped backslashes and escaped quotes.

    ``bytes.replace`` pairs backslashes left to right, as JSON does, so after the first
    replacement every backslash left escapes the byte after it, and after the second every
    quote left opens or closes a string.
    """
    return text.replace(b"\\\\", b"").replace(b'\\"', b"")


def _shape(unescaped: bytes) -> tuple[int, int]:
    """``(deepest nesting, number of items)`` of a JSON text, counted outside strings.

    A byte is inside a string when an odd number of quotes precede it; the depth is the
    running sum of the brackets outside strings; the items are the commas and brackets
    outside strings (every array element and object member but a container's first is
    preceded by a comma). All vectorised: cumulative sums over the bytes.
    """
    if not unescaped:
        return 0, 0
    codes = np.frombuffer(unescaped, dtype=np.uint8)
    outside = (np.cumsum(codes == ord('"'), dtype=np.int32) & 1) == 0
    steps = _BRACKET_STEPS[codes] * outside
    deepest = int(np.cumsum(steps, dtype=np.int32).max())
    items = np.count_nonzero(steps == 1) + np.count_nonzero((codes == ord(",")) & outside)
    return max(0, deepest), int(items)


def parse_json(text: bytes | str, what: str, limits: PlanLimits) -> Any:
    """The JSON value of ``text`` (UTF-8 when bytes), read strictly (see the module docstring).

    Before parsing, the text's nesting depth and its number of items (array elements and
    object members) are measured against ``limits.max_depth`` and ``limits.max_json_items``:
    every item is a Python object to build, maybe a container the garbage collector walks
    again and again, maybe a list entry a layer's constructor loops over.
    :class:`PlanLimitError` when over either; :class:`PlanFormatError` naming ``what`` for
    anything that is not strict JSON.
    """
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = bytes(text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PlanFormatError(f"{what} is not UTF-8: {error}") from None
    unescaped = _unescaped(data)
    depth, items = _shape(unescaped)
    if depth > limits.max_depth:
        raise PlanLimitError(
            f"{what} nests {depth} levels deep, over the limit of {limits.max_depth}"
        )
    if items > limits.max_json_items:
        raise PlanLimitError(
            f"{what} holds about {items} items (array elements and object members), over the "
            f"limit of {limits.max_json_items}"
        )
    if b"\\u" in unescaped and _LONE_SURROGATE.search(unescaped):
        raise PlanFormatError(
            f"{what} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff not in a pair)"
        )

    def refuse_constant(name: str) -> Any:
        raise PlanFormatError(f"{what} holds the non-JSON constant {name}")

    def read_int(digits: str) -> int:
        if len(digits.lstrip("-")) > 19:
            raise PlanFormatError(
                f"{what} holds an integer of {len(digits.lstrip('-'))} digits; integers must "
                f"fit in 64 bits ({INT64[0]}..{INT64[1]})"
            )
        value = int(digits)
        if not INT64[0] <= value <= INT64[1]:
            raise PlanFormatError(
                f"{what} holds the integer {digits}, outside the 64-bit range "
                f"{INT64[0]}..{INT64[1]}"
            )
        return value

    def read_float(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            shown = digits if len(digits) <= 40 else digits[:40] + "..."
            raise PlanFormatError(
                f"{what} holds the number {shown}, which is not a finite 64-bit float"
            )
        return value

    def read_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise PlanFormatError(f"{what} repeats the key {key[:100]!r} in one object")
                seen.add(key)
        return value

    try:
        return json.loads(
            text,
            parse_int=read_int,
            parse_float=read_float,
            parse_constant=refuse_constant,
            object_pairs_hook=read_object,
        )
    except json.JSONDecodeError as error:
        raise PlanFormatError(f"{what} is not valid JSON: {error}") from None
    except RecursionError:  # not reached under the depth limit; never let it escape
        raise PlanLimitError(f"{what} nests too deep (over {limits.max_depth} levels)") from None
