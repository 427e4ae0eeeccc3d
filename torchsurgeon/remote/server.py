"""The HTTP server's connection limits: what one socket may cost the host before a request.

A host faces clients that open connections and never finish a request. uvicorn (0.54, its
``h11`` protocol) times out an idle *keep-alive* connection, but a connection that never
completes its first request head holds a file descriptor for ever, and nothing caps how
many may be open — about 20,000 half-open sockets exhaust a process's descriptors.
:func:`server_config` builds the one ``uvicorn.Config`` that ``torchsurgeon serve`` and
:func:`~torchsurgeon.remote.background.serve_in_thread` both run, with
:class:`ServerLimits`:

- ``max_connections`` — a connection past it is closed as soon as it is accepted, and
  uvicorn's ``limit_concurrency`` answers requests past it with a 503;
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

A request *body* that stalls is the app's business: ``Limits.request_idle_seconds``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerLimits", "server_config"]


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection bounds of the HTTP server (seconds and bytes)."""

    max_connections: int = 1024
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: int = 5
    max_header_bytes: int = 16 << 10
    backlog: int = 1024
    shutdown_seconds: int = 10

    def __post_init__(self) -> None:
        for name in ("max_connections", "header_timeout_seconds", "max_header_bytes", "backlog"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got {getattr(self, name)}")


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
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_guarded_protocol(limits),
        ws="none",
        lifespan="on",
        log_level=log_level,
        limit_concurrency=limits.max_connections,
        backlog=limits.backlog,
        timeout_keep_alive=limits.keep_alive_seconds,
        timeout_graceful_shutdown=limits.shutdown_seconds,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )


def _guarded_protocol(limits: ServerLimits) -> type:
    """uvicorn's h11 protocol with a connection cap and a deadline for each request head."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= limits.max_connections:
                self._refused = True
                self.transport = transport
                transport.abort()  # frees the descriptor now; the client sees the drop
                return
            super().connection_made(transport)
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            if not self._refused:
                super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for a whole request head
                self._await_head()
            else:
                self._head_arrived()

        def _await_head(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(
                    limits.header_timeout_seconds, self._head_timeout
                )

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
