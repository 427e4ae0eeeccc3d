"""Serve an app from a background thread: for notebooks, tests and benchmarks.

``with serve_in_thread(app) as server: Client(server.url)...`` binds ``127.0.0.1`` on a
free port (the socket is bound before the thread starts, so there is no race for the
port), runs uvicorn in a daemon thread, waits until it accepts requests, and on exit asks
it to stop and joins the thread — which also stops the host's workers (app lifespan).
The server runs the same configuration as ``torchsurgeon serve``
(:func:`~torchsurgeon.remote.server.server_config`: connection cap, request-head timeout,
keep-alive, bounded shutdown).
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from torchsurgeon.remote.compat import import_anyio
from torchsurgeon.remote.server import ServerLimits, server_config

__all__ = ["BackgroundServer", "serve_in_thread"]


class BackgroundServer:
    """A uvicorn server running in a thread; ``url`` is where it listens."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
    ) -> None:
        import_anyio()  # an app made elsewhere still needs it: see torchsurgeon.remote.compat
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it, small responses wait ~40 ms for
        # delayed ACKs (uvicorn sets it on the sockets it binds itself, not on given ones).
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = server_config(
            app, host=self.host, port=self.port, limits=limits, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped while starting (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self if self._server.started else self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None
) -> BackgroundServer:
    """Start serving ``app`` in a background thread; stop it with ``.stop()`` or ``with``."""
    return BackgroundServer(app, host, port, limits).start()
