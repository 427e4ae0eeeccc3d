"""Remote execution: a host that serves big models to plans, and its client.

The host (``torchsurgeon serve`` or :func:`create_app`) loads each model once and never
changes it; each request carries a plan — data, validated field by field, never code —
that the host replays onto its own copy-on-write view of the base, runs, reduces and sends
back. :class:`Client` sends plans (or rewritten models, planned on the way) and returns the
same ``ts.Result`` a local run gives. Requests run in worker threads, or spread over Ray
actor replicas. A model is served as its ``transformers`` model or, with
:class:`LocalCheckpoint` ``(path, convert=True)``, as its explicit-dataflow conversion.

The web app needs ``fastapi`` and ``uvicorn``; ``Client`` needs ``httpx``; Ray is optional.
"""

from torchsurgeon.remote.client import Client, Job, JobStatus
from torchsurgeon.remote.errors import ApiError, RemoteError
from torchsurgeon.remote.limits import Limits

__all__ = [
    "ApiError",
    "BackgroundServer",
    "Client",
    "Job",
    "JobStatus",
    "Limits",
    "LocalCheckpoint",
    "RayCluster",
    "RemoteError",
    "create_app",
    "serve_in_thread",
]


def __getattr__(name: str) -> object:
    # The server side needs fastapi and uvicorn; importing the client must not.
    if name == "create_app":
        from torchsurgeon.remote.app import create_app

        return create_app
    if name == "LocalCheckpoint":
        from torchsurgeon.remote.checkpoints import LocalCheckpoint

        return LocalCheckpoint
    if name == "RayCluster":
        from torchsurgeon.remote.ray_pool import RayCluster

        return RayCluster
    if name in ("serve_in_thread", "BackgroundServer"):
        from torchsurgeon.remote import background

        return getattr(background, name)
    raise AttributeError(f"module 'torchsurgeon.remote' has no attribute {name!r}")
