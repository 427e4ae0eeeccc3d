"""The host's HTTP API (FastAPI): ``create_app(models, api_keys=..., limits=...)``.

Endpoints, all under ``/v1`` (JSON unless noted; errors are
``{"error": {"code", "message", "field"}}`` with a 4xx status):

- ``GET  /v1/models`` — the served models: name, architecture, identity, tokenizer.
- ``GET  /v1/models/{name}/structure`` — the model's structure without weights, from which
  a client builds a structure-only model (``Client.meta``).
- ``POST /v1/models/{name}/jobs`` — body: a request file (safetensors: the plan's bytes and
  the inputs; see :mod:`torchsurgeon.remote.transfer`). ``202`` with the job's id and
  queue position once every up-front check passed.
- ``GET  /v1/jobs/{id}?since=V&wait=S`` — status (``queued`` + ``position``, ``running``,
  ``done``, ``error`` + message); with ``since``, waits up to ``S`` seconds for a change.
- ``GET  /v1/jobs/{id}/result`` — the result file (safetensors), once ``done``.
- ``DELETE /v1/jobs/{id}`` — forget a job and its result.

With API keys configured, every endpoint wants ``Authorization: Bearer <key>`` (or
``X-API-Key``), and a key sees only its own jobs (another key's job is a ``404``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from torch import nn

from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.host import Host
from torchsurgeon.remote.limits import Limits

__all__ = ["create_app"]

_MAX_WAIT = 30.0


def create_app(
    models: Mapping[str, nn.Module | str | Path],
    *,
    api_keys: Iterable[str] | None = None,
    limits: Limits | None = None,
    workers: int = 2,
    ray_replicas: int | None = None,
    ray_threads: int | None = None,
) -> FastAPI:
    """A FastAPI app serving ``models`` (modules, or local checkpoint directories).

    Each model is loaded once and never changed; each request runs its own rewritten view.
    ``workers`` threads run jobs (or, with ``ray_replicas``, dispatch them to that many Ray
    actors, each running torch with ``ray_threads`` threads; see
    :mod:`torchsurgeon.remote.ray_pool`). The app's ``state.host`` is the
    :class:`~torchsurgeon.remote.host.Host`.
    """
    host = Host(
        models,
        api_keys=api_keys,
        limits=limits,
        workers=workers,
        ray_replicas=ray_replicas,
        ray_threads=ray_threads,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start()
        try:
            yield
        finally:
            await run_in_threadpool(host.stop)

    app = FastAPI(title="torchsurgeon host", version="1", lifespan=lifespan)
    app.state.host = host

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.to_json(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            ApiError(400, "bad_request", str(first.get("msg")), field).to_json(), status_code=400
        )

    def owner(request: Request) -> str:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        return host.owner(key or request.headers.get("x-api-key"))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        owner(request)
        return {"models": host.models_json()}

    @app.get("/v1/models/{name}/structure")
    async def structure(name: str, request: Request) -> dict[str, Any]:
        owner(request)
        return host.model(name).structure.to_json()

    @app.post("/v1/models/{name}/jobs", status_code=202)
    async def submit(name: str, request: Request) -> dict[str, Any]:
        who = owner(request)
        host.model(name)
        body = await _read_body(request, host.limits.max_request_bytes)
        job = await run_in_threadpool(host.submit, who, name, body)
        return host.queue.status(job)

    @app.get("/v1/jobs/{job_id}")
    async def status(
        job_id: str, request: Request, since: int | None = None, wait: float = 0.0
    ) -> dict[str, Any]:
        job = host.queue.get(job_id, owner(request))
        if since is not None and wait > 0:
            await host.queue.wait(job, since, min(wait, _MAX_WAIT))
        return host.queue.status(job)

    @app.get("/v1/jobs/{job_id}/result")
    async def result(job_id: str, request: Request) -> Response:
        job = host.queue.get(job_id, owner(request))
        if job.state == "error" and job.error is not None:
            raise ApiError(422, job.error.code, job.error.message, job.error.field)
        if job.state != "done" or job.result is None:
            raise ApiError(409, "not_ready", f"job {job_id!r} is {job.state}", "job")
        return Response(job.result, media_type="application/octet-stream")

    @app.delete("/v1/jobs/{job_id}")
    async def forget(job_id: str, request: Request) -> dict[str, Any]:
        job = host.queue.get(job_id, owner(request))
        host.queue.forget(job)
        return {"id": job_id, "deleted": True}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "too_large", f"the request is {declared} bytes, over max_request_bytes={limit}"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the request is over max_request_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)
