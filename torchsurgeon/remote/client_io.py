"""How the client reads a host's answers: streamed, bounded, never trusted to be small.

A host could be hostile (or compromised). Every answer body is read from the socket in
pieces and counted: over its bound (:class:`AnswerLimits`) the read stops and the client
raises :class:`~torchsurgeon.remote.errors.RemoteError` ``too_large`` naming the bound. A
compressed body is inflated piece by piece, and refused once it grows past
``max_compression_ratio`` times the bytes that came in. JSON is parsed with nesting depth
and item count measured first; a model structure is bounded in nodes and depth before and
while it is built. Also here: the client's checks on its URL, its Ctrl-C handling and its
progress line.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch
from torch import nn

from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.wire import parse_json
from torchsurgeon.remote.errors import RemoteError

if TYPE_CHECKING:
    import httpx

__all__ = ["Answer", "AnswerLimits"]

_PIECE = 1 << 20
"""Bytes read from the socket, or inflated, at a time."""
_RATIO_FLOOR = 1 << 20
"""Inflated bytes any compressed answer may reach before its ratio is checked."""
CANCEL_SECONDS = 2.0
"""Seconds each call that cancels a job interrupted with Ctrl-C may take."""
_ENCODINGS = {"": None, "identity": None, "gzip": 16, "x-gzip": 16, "deflate": 32}


@dataclass(frozen=True)
class AnswerLimits:
    """Bounds on what the client takes from a host.

    Args:
        max_result_bytes: a result file's bytes (a plan's result cannot be larger on a
            host with its default ``max_result_bytes``; raise it for bigger results).
        max_json_bytes: a JSON answer's bytes (a status, a model list, a structure).
        max_json_depth: a JSON answer's nesting depth.
        max_json_items: a JSON answer's array elements and object members.
        max_compression_ratio: inflated bytes per compressed byte of a compressed answer.
        max_structure_nodes: modules the client builds from a served structure.
        max_structure_depth: module nesting depth of a served ``tree`` structure.
    """

    max_result_bytes: int = 1 << 30
    max_json_bytes: int = 32 << 20
    max_json_depth: int = 32
    max_json_items: int = 1 << 22
    max_compression_ratio: int = 100
    max_structure_nodes: int = 20_000
    max_structure_depth: int = 64


@dataclass
class Answer:
    """A host's answer, read whole within its bound: status, headers and body."""

    status: int
    headers: httpx.Headers
    body: bytes | torch.Tensor

    @property
    def is_result(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/octet-stream")

    def text(self, limit: int = 200) -> str:
        data = self.body if isinstance(self.body, bytes) else b"<binary>"
        return data[:limit].decode("utf-8", "replace")

    def json(self, limits: AnswerLimits, what: str) -> Any:
        """The body as JSON; :class:`RemoteError` if it is not, or nests too deep."""
        bounds = PlanLimits(max_depth=limits.max_json_depth, max_json_items=limits.max_json_items)
        if not isinstance(self.body, bytes):
            raise RemoteError(502, "bad_response", f"{what} answered binary data, not JSON")
        try:
            return parse_json(self.body, f"the answer to {what}", bounds)
        except PlanLimitError as error:
            bound = "max_json_depth" if "levels deep" in error.reason else "max_json_items"
            raise RemoteError(
                502,
                "too_large",
                f"{error.reason} (the client's {bound}={getattr(limits, bound)})",
                bound,
            ) from None
        except PlanFormatError as error:
            raise RemoteError(502, "bad_response", f"{error.reason}: {self.text()!r}") from None


def check_url(url: str) -> str:
    """``url`` without a trailing slash; :class:`ValueError` unless it is ``http(s)://host``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"not a host URL: {url!r} ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"a host URL starts with http:// or https://, got {url!r} (e.g. http://127.0.0.1:8000)"
        )
    if not parts.hostname:
        raise ValueError(f"the host URL {url!r} names no host (e.g. http://127.0.0.1:8000)")
    return url.rstrip("/")


def read_answer(response: httpx.Response, limits: AnswerLimits, what: str) -> Answer:
    """The answer of a streamed ``response``, its body read within its bound.

    A result file (``application/octet-stream``, status < 400) may hold
    ``max_result_bytes`` and comes as a ``uint8`` tensor (filled in place when its length
    is announced); anything else ``max_json_bytes``, as bytes. A body cut short is an
    ``httpx`` transport error (retried like an unreachable host).
    """
    import httpx

    answer = Answer(response.status_code, response.headers, b"")
    result = answer.is_result and response.status_code < 400
    limit, bound = (
        (limits.max_result_bytes, "max_result_bytes")
        if result
        else (limits.max_json_bytes, "max_json_bytes")
    )
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        raise RemoteError(
            502, "bad_response", f"{what} answered in content-encoding {encoding!r}, not gzip"
        )
    declared = response.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise RemoteError(502, "bad_response", f"{what} answered Content-Length {declared!r}")
    size = None if declared is None else int(declared)
    if size is not None and size > limit:
        raise _too_large(what, f"announces {size} bytes", bound, limit)
    if response.is_stream_consumed:  # already read and decoded (a test transport)
        data = response.content
        if len(data) > limit:
            raise _too_large(what, f"holds {len(data)} bytes", bound, limit)
        answer.body = torch.frombuffer(bytearray(data), dtype=torch.uint8) if result else data
        return answer
    if _ENCODINGS[encoding] is None and size is not None and result:
        buffer = torch.empty(size, dtype=torch.uint8)
        into, filled = memoryview(buffer.numpy()), 0
        for chunk in response.iter_raw(_PIECE):
            if filled + len(chunk) > size:
                raise httpx.RemoteProtocolError("the body is longer than Content-Length")
            into[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != size:
            raise httpx.RemoteProtocolError(f"the body ended at {filled} of {size} bytes")
        answer.body = buffer
        return answer
    data = _inflated(response, encoding, limits, what, limit, bound)
    answer.body = torch.frombuffer(data, dtype=torch.uint8) if result and data else bytes(data)
    return answer


def _inflated(
    response: httpx.Response,
    encoding: str,
    limits: AnswerLimits,
    what: str,
    limit: int,
    bound: str,
) -> bytearray:
    """The body of ``response``, inflated piece by piece if compressed, counted as it grows."""
    wbits = _ENCODINGS[encoding]
    inflater = None if wbits is None else zlib.decompressobj(wbits + zlib.MAX_WBITS)
    data, raw = bytearray(), 0
    ratio = limits.max_compression_ratio
    for chunk in response.iter_raw(_PIECE):
        raw += len(chunk)
        pieces = [chunk] if inflater is None else _inflate(inflater, chunk, what)
        for piece in pieces:
            data += piece
            if len(data) > limit:
                raise _too_large(what, f"holds over {limit} bytes", bound, limit)
            if inflater is not None and len(data) > max(_RATIO_FLOOR, ratio * raw):
                raise RemoteError(
                    502,
                    "too_large",
                    f"{what} answered {raw} compressed bytes that inflate to over {len(data)}, "
                    f"over AnswerLimits max_compression_ratio={ratio}",
                    "max_compression_ratio",
                )
    return data


def _inflate(inflater: Any, chunk: bytes, what: str) -> Iterator[bytes]:
    """``chunk`` inflated, at most :data:`_PIECE` bytes at a time."""
    try:
        while True:
            piece = inflater.decompress(chunk, _PIECE)
            yield piece
            chunk = inflater.unconsumed_tail
            if not chunk and len(piece) < _PIECE:
                return
    except zlib.error as error:
        raise RemoteError(502, "bad_response", f"{what} answered corrupt gzip: {error}") from None


def _too_large(what: str, detail: str, bound: str, limit: int) -> RemoteError:
    how = "max_result_bytes=" if bound == "max_result_bytes" else f"limits=AnswerLimits({bound}="
    return RemoteError(
        502,
        "too_large",
        f"the answer to {what} {detail}, over the client's {bound}={limit} "
        f"(Client(..., {how}...) to take more)",
        bound,
    )


# ----------------------------------------------------------------- structures


def check_structure(data: Mapping[str, Any], limits: AnswerLimits) -> None:
    """:class:`RemoteError` ``too_large`` if a served ``tree`` structure has more nodes, or
    deeper paths, than the client builds."""
    nodes = data.get("nodes") or ()
    if not isinstance(nodes, list):
        return  # Structure.from_json says what is wrong with it
    if len(nodes) > limits.max_structure_nodes:
        raise _structure_too_large(f"has {len(nodes)} nodes", "max_structure_nodes", limits)
    for node in nodes:
        path = node.get("path") if isinstance(node, dict) else None
        if isinstance(path, str) and path.count(".") >= limits.max_structure_depth:
            raise _structure_too_large(
                f"nests node {path[:80]!r}... {path.count('.') + 1} deep",
                "max_structure_depth",
                limits,
            )


class _TooManyModules(Exception):
    """Raised inside a structure's build: not a ``RuntimeError`` that it would catch."""


@contextlib.contextmanager
def bounded_build(limits: AnswerLimits) -> Iterator[None]:
    """Count the modules this thread builds; stop the build past ``max_structure_nodes``.

    A served ``transformers`` config names its size (``num_hidden_layers=20000``), which
    the client only learns by building it: a global module-registration hook counts the
    submodules registered in this thread and aborts the build at the bound.
    """
    thread, count = threading.get_ident(), 0

    def counted(module: nn.Module, name: str, submodule: Any) -> None:
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            if count > limits.max_structure_nodes:
                raise _TooManyModules

    handle = nn.modules.module.register_module_module_registration_hook(counted)
    try:
        yield
    except _TooManyModules:
        raise _structure_too_large(
            f"builds over {limits.max_structure_nodes} modules", "max_structure_nodes", limits
        ) from None
    finally:
        handle.remove()


def _structure_too_large(detail: str, bound: str, limits: AnswerLimits) -> RemoteError:
    value = getattr(limits, bound)
    return RemoteError(
        502,
        "too_large",
        f"the served structure {detail}, over the client's {bound}={value} "
        f"(Client(..., limits=AnswerLimits({bound}=...)) to build more)",
        bound,
    )


# ----------------------------------------------------------------- the terminal


@contextlib.contextmanager
def cancelled_on_interrupt(job: Any) -> Iterator[None]:
    """On Ctrl-C while waiting for ``job``: :func:`interrupted` (a job already guarded is
    left to its guard)."""
    if getattr(job, "_guarded", False):
        yield
        return
    job._guarded = True
    try:
        yield
    except KeyboardInterrupt:
        raise interrupted(job.client, job.id) from None
    finally:
        job._guarded = False


def interrupted(client: Any, job_id: str | None) -> KeyboardInterrupt:
    """Delete the job ``job_id`` on the host, say so in one line on stderr, and return the
    ``KeyboardInterrupt`` to raise (short: no ``httpx`` frames)."""
    if job_id is None:
        line = f"the host at {client.url} did not name the job; it may still run there"
    else:
        line = f"job {job_id} {_cancel(client, job_id)}"
    print(f"torchsurgeon: interrupted; {line}", file=sys.stderr, flush=True)
    return KeyboardInterrupt(line)


def _cancel(client: Any, job_id: str) -> str:
    """Delete an interrupted job on the host, quickly and once: what became of it."""
    import httpx

    try:
        answer = client._http.request("DELETE", f"/v1/jobs/{job_id}", timeout=CANCEL_SECONDS)
    except httpx.HTTPError as error:
        return f"may still run on {client.url}: its DELETE failed ({type(error).__name__})"
    if answer.status_code >= 400 and answer.status_code != 404:
        return f"may still run on {client.url}: its DELETE answered HTTP {answer.status_code}"
    return f"deleted on {client.url}"


class Progress:
    """A one-line rich status on stderr: queued (position), running, downloading."""

    def __init__(self, enabled: bool, model: str) -> None:
        self._status: Any = None
        self._model = model
        if enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status(f"{model}: submitted")

    def update(self, status: Any) -> None:
        if self._status is None:
            return
        text = status.state
        if status.state == "queued" and status.position is not None:
            text = f"queued (position {status.position})"
        step, steps, loss = ((status.progress or {}).get(k) for k in ("step", "steps", "loss"))
        if status.state == "running" and all(
            isinstance(v, (int, float)) for v in (step, steps, loss)
        ):
            text = f"training: step {step}/{steps}, loss {float(loss):.4g}"  # type: ignore[arg-type]
        self._status.update(f"{self._model}: {text}")

    def __enter__(self) -> Progress:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()


def httpx_errors() -> type[Exception]:
    """``httpx.HTTPError`` (imported when needed: the client's one optional dependency)."""
    import httpx

    return httpx.HTTPError
