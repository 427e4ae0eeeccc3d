"""The HTTP server's connection limits: what one socket may cost the host before a request.

A host faces clients that open connections and never finish a request. uvicorn (0.54, its
``h11`` protocol) times out an idle *keep-alive* connection, but a connection that never
completes its first request head holds a file descriptor for ever, and nothing caps how
many may be open — about 20,000 half-open sockets exhaust a process's descriptors.
:func:`server_config` builds the one ``uvicorn.Config`` that ``torchsurgeon serve`` and
:func:`~torchsurgeon.remote.background.serve_in_thread` both run, with
:class:`ServerLimits`:

- ``max_connections`` — a connection past it is closed as soon as it is accepted (or takes
  an unauthenticated one's place: below), and uvicorn's ``limit_concurrency`` answers
  requests past it with a 503;
- ``header_timeout_seconds`` — a request head (the request line and headers) must arrive
  within it, from the moment the connection opens or the previous response ends; else the
  connection is closed. This is the protocol subclass below: uvicorn has no such setting;
- ``keep_alive_seconds`` — an idle connection between requests is closed after it;
- ``max_header_bytes`` — a request head larger than this is a 400 (h11's
  ``max_incomplete_event_size``);
- ``backlog`` — connections the kernel queues before they are accepted;
- ``shutdown_seconds`` — on SIGTERM, open requests get this long to finish before they
  are cancelled (uvicorn's ``timeout_graceful_shutdown``), so a stalled upload or a long
  poll cannot keep the host from stopping.

Connections under attack. A connection is *unauthenticated* until one of its request heads
carries a valid key (``Authorization: Bearer <key>`` or ``X-API-Key``, checked as the app's
:class:`~torchsurgeon.remote.host.Host` checks it; on a host without keys, any whole head).
Unauthenticated connections may hold at most ``max_unauthenticated`` of the
``max_connections`` slots (default: half), at most ``max_unauthenticated_per_address`` from
one client address, and get ``unauthenticated_header_seconds`` (short) for each head. A new
connection that finds its address's share full takes the place of that address's oldest
unauthenticated connection; one that finds the unauthenticated share or the whole cap full,
of the oldest of the address holding the most. So half-open sockets reopened in a loop only
ever displace each other, a connection that has shown a key is never displaced and keeps
the rest of the cap, and only a cap full of authenticated connections refuses a new one.
Under attack a request without a key (a bare health probe) may be cut: send the key.

The request *body* is the app's: ``Limits.request_idle_seconds`` bounds a pause, and
:meth:`ServerLimits.body_seconds` the whole body — ``request_body_seconds`` plus its declared
size (else ``max_request_bytes``) at ``min_upload_bytes_per_second``; past it, a ``408``
naming ``request_body_seconds``, and the connection closes. A body the app left unread when
it answered must end within ``request_body_seconds`` more.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SCOPE_KEY", "ServerLimits", "server_config"]

SCOPE_KEY = "torchsurgeon.server"
"""Where a request's ASGI ``scope["extensions"]`` holds the server's :class:`ServerLimits`."""
CLOSE_KEY = "torchsurgeon.close"
"""Set there by the app: close the connection after the response (its body is unread)."""


_BOUNDS: dict[str, tuple[float, float]] = {
    "max_connections": (1, 1 << 20),
    "header_timeout_seconds": (1e-3, 86_400),
    "keep_alive_seconds": (0, 86_400),
    "max_header_bytes": (1 << 10, 1 << 24),
    "backlog": (1, 1 << 20),
    "shutdown_seconds": (0, 86_400),
}
"""``(lowest, highest)`` of the numeric fields :meth:`ServerLimits.__post_init__` checks."""


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection bounds of the HTTP server (seconds and bytes)."""

    max_connections: int = 1024
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: int = 5
    max_header_bytes: int = 16 << 10
    backlog: int = 1024
    shutdown_seconds: int = 10
    max_unauthenticated: int | None = None
    """Connections without a valid key yet, all addresses together (None: half the cap)."""
    max_unauthenticated_per_address: int = 32
    unauthenticated_header_seconds: float = 2.0
    """The head deadline of a connection that has not shown a valid key."""
    request_body_seconds: float = 10.0
    """A request body's deadline, plus the time its size takes at the minimum rate."""
    min_upload_bytes_per_second: int = 256 << 10

    def __post_init__(self) -> None:
        """Refuse a nonsense bound (NaN, infinite, out of range) naming the field."""
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            whole = name != "header_timeout_seconds"
            if (
                isinstance(value, bool)
                or not isinstance(value, int if whole else (int, float))
                or not math.isfinite(value)
                or not low <= value <= high
            ):
                raise ValueError(
                    f"ServerLimits.{name} must be a finite {'integer' if whole else 'number'} "
                    f"in [{low:g}, {high:g}], got {value!r}"
                )

    def unauthenticated_cap(self) -> int:
        """Unauthenticated connections at most, all addresses together."""
        share = self.max_unauthenticated
        return max(1, self.max_connections // 2) if share is None else share

    def body_seconds(self, size: int) -> float:
        """The deadline of a request body of ``size`` bytes (declared, or the largest allowed)."""
        return self.request_body_seconds + size / self.min_upload_bytes_per_second

    def check_shares(self) -> None:
        """``ValueError`` unless the attack-facing limits are positive and fit the cap."""
        for name in (
            "max_unauthenticated_per_address",
            "unauthenticated_header_seconds",
            "request_body_seconds",
            "min_upload_bytes_per_second",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServerLimits.{name} must be positive and finite, got {value}")
        if not 0 < self.unauthenticated_cap() <= self.max_connections:
            raise ValueError(
                f"ServerLimits.max_unauthenticated must be 1 to max_connections="
                f"{self.max_connections}, got {self.max_unauthenticated}"
            )


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    log_level: str = "info",
) -> Any:
    """The ``uvicorn.Config`` of a torchsurgeon host: ``app`` with these connection limits."""
    import uvicorn  # the server side's dependency; building the CLI parser must not need it

    limits = limits or ServerLimits()
    limits.check_shares()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_guarded_protocol(limits, _key_check(app)),
        ws="none",
        lifespan="on",
        log_level=log_level,
        limit_concurrency=limits.max_connections + 1,  # a connection let in is served
        backlog=limits.backlog,
        timeout_keep_alive=limits.keep_alive_seconds,
        timeout_graceful_shutdown=limits.shutdown_seconds,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )


def _key_check(app: Any) -> Callable[[list[tuple[bytes, bytes]]], bool]:
    """Whether a request head's headers carry a key the app's host accepts (as the app reads
    it: ``Authorization: Bearer``, else ``X-API-Key``); any head when there is no host."""
    from torchsurgeon.remote.errors import ApiError

    owner = getattr(getattr(getattr(app, "state", None), "host", None), "owner", None)
    if owner is None:
        return lambda headers: True

    def valid(headers: list[tuple[bytes, bytes]]) -> bool:
        found = dict(headers)  # uvicorn lower-cases the names
        bearer = found.get(b"authorization", b"")
        key = bearer[7:].strip() if bearer[:7].lower() == b"bearer " else b""
        key = key or found.get(b"x-api-key", b"")
        try:
            owner(key.decode("latin-1") or None)
        except ApiError:
            return False
        return True

    return valid


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _guarded_protocol(
    limits: ServerLimits, valid: Callable[[list[tuple[bytes, bytes]]], bool]
) -> type:
    """uvicorn's h11 protocol with the connection cap, the unauthenticated shares and a
    deadline for each request head (see the module's docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict[Any, None] = {}  # unauthenticated connections, oldest first
    by_address: dict[str, dict[Any, None]] = {}

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None
        _refused = False
        _trusted = False
        _peer = ""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.transport = transport
            self._peer = _address(transport)
            if not self._make_room():
                self._refused = True
                transport.abort()  # frees the descriptor now; the client sees the drop
                return
            super().connection_made(transport)
            waiting[self] = None
            by_address.setdefault(self._peer, {})[self] = None
            self._await_head()

        def _make_room(self) -> bool:
            """Displace an unauthenticated connection where a share is full; False when the
            cap is full of authenticated ones."""
            mine = by_address.get(self._peer, {})
            full = len(self.server_state.connections) >= limits.max_connections
            if len(mine) >= limits.max_unauthenticated_per_address:
                next(iter(mine))._displace()
            elif full or len(waiting) >= limits.unauthenticated_cap():
                if not waiting:
                    return False
                next(iter(max(by_address.values(), key=len)))._displace()
            return True

        def _displace(self) -> None:
            self._unwait()
            self.server_state.connections.discard(self)  # its slot is free now
            self.transport.abort()

        def _unwait(self) -> None:
            waiting.pop(self, None)
            mine = by_address.get(self._peer)
            if mine is not None:
                mine.pop(self, None)
                if not mine:
                    del by_address[self._peer]

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            if self._body_timer is not None:
                self._body_timer.cancel()
            self._unwait()
            if not self._refused:
                super().connection_lost(exc)

        def handle_events(self) -> None:
            scope = self.scope
            super().handle_events()
            if self.scope is not scope:  # a request head arrived
                self._head_arrived()
                self.scope.setdefault("extensions", {})[SCOPE_KEY] = limits  # type: ignore[typeddict-item]
                if not self._trusted and valid(self.headers):
                    self._trusted = True
                    self._unwait()
            if self.conn.their_state is h11.IDLE:  # waiting for (the rest of) a head
                self._await_head()

        def on_response_complete(self) -> None:
            extensions = self.scope.get("extensions") or {}
            if extensions.get(CLOSE_KEY):  # the app gave up on the body: nobody reads it
                self.transport.close()
            elif self.conn.their_state is h11.SEND_BODY and self._body_timer is None:
                # a body the app left unread gets request_body_seconds more to arrive
                self._body_timer = self.loop.call_later(
                    limits.request_body_seconds, self._body_timeout
                )
            super().on_response_complete()

        def _await_head(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                seconds = (
                    limits.header_timeout_seconds
                    if self._trusted
                    else min(limits.unauthenticated_header_seconds, limits.header_timeout_seconds)
                )
                self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def _body_timeout(self) -> None:
            self._body_timer = None
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
