"""Serving next to libraries that add attributes to ``object`` (nnsight's ``.save()``).

nnsight 0.8.1 writes a ``save`` method into ``object``'s own type dict at import (its C
extension ``nnsight._c.py_mount``), so every class in the process appears to have a public
attribute ``save``. anyio's typed attribute sets (``SocketAttribute``, ``TLSAttribute``,
``FileStreamAttribute``) check, when their class is created, that every public attribute
has a type annotation — and anyio creates them lazily, on the first request the web app
runs in a thread. With nnsight imported first, that import fails inside the request
(``TypeError: Attribute 'save' is missing its type annotation``) and the host answers 500.

:func:`import_anyio` imports those modules up front (the host calls it before serving).
If something is mounted on ``object`` at that moment it is unmounted for the import and
mounted again right after — with nnsight's own ``unmount``/``mount``, the pair its
extension provides — so both libraries keep working. Once imported, anyio never checks
again.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading

__all__ = ["import_anyio"]

_ANYIO_MODULES = (
    "anyio.abc._sockets",
    "anyio.streams.file",
    "anyio.streams.tls",
    "anyio._backends._asyncio",
)
_LOCK = threading.Lock()


def import_anyio() -> None:
    """Import anyio's lazily created typed attribute sets with ``object`` as CPython has it."""
    if all(name in sys.modules for name in _ANYIO_MODULES):
        return
    with _LOCK:
        mounted = {name: value for name, value in vars(object).items() if name[:1] != "_"}
        mounter = sys.modules.get("nnsight._c") if mounted else None
        if mounted and getattr(mounter, "unmount", None) is None:
            raise RuntimeError(
                f"'object' carries {sorted(mounted)}, added by a library other than nnsight; "
                "anyio (under the web app) refuses to load with it. Start the host before "
                "importing that library"
            )
        for name in mounted:
            mounter.unmount(name)  # type: ignore[union-attr]
        try:
            for module in _ANYIO_MODULES:
                # an anyio without one of these modules has nothing there to check
                with contextlib.suppress(ModuleNotFoundError):
                    importlib.import_module(module)
        finally:
            for name, value in mounted.items():
                # the type dict holds an instancemethod around the function nnsight mounted
                mounter.mount(getattr(value, "__func__", value), name)  # type: ignore[union-attr]
