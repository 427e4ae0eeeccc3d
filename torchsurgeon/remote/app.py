"""The host's HTTP API (FastAPI): ``create_app(models, api_keys=..., limits=...)``.

Endpoints, all under ``/v1`` (JSON unless noted; errors are
``{"error": {"code", "message", "field"}}`` with a 4xx status):

- ``GET  /v1/models`` — the served models: name, architecture, identity, tokenizer.
- ``GET  /v1/models/{name}/structure`` — the model's structure without weights, from which
  a client builds a structure-only model (``Client.meta``).
- ``POST /v1/models/{name}/jobs`` — body: a request file (safetensors: the plan's bytes and
  the inputs; see :mod:`torchsurgeon.remote.transfer`). ``202`` with the job's id and
  queue position once every up-front check passed. An ``Idempotency-Key`` header (the
  client's request id) makes a retried POST return the job the first one made.
- ``GET  /v1/jobs/{id}?since=V&wait=S`` — status (``queued`` + ``position``, ``running``,
  ``done``, ``error`` + message); with ``since``, waits up to ``S`` seconds for a change.
  A job whose result expired is a ``410``.
- ``GET  /v1/jobs/{id}/result`` — the result file (safetensors), once ``done``.
- ``DELETE /v1/jobs/{id}`` — forget a job and its result.

With API keys configured, every endpoint wants ``Authorization: Bearer <key>`` (or
``X-API-Key``), and a key sees only its own jobs (another key's job is a ``404``). Jobs and
results persist in ``state_dir`` (see :mod:`torchsurgeon.remote.jobs`).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from torch import nn

from torchsurgeon.remote.compat import import_anyio
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.host import Host, HostConfig
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.server import CLOSE_KEY, SCOPE_KEY, ServerLimits

__all__ = ["create_app"]

_MAX_WAIT = 30.0
_DISCONNECT_CHECK_SECONDS = 0.5
"""How often a blocking submission checks that its client is still there (a client that
went away gets its job cancelled: its result was to be handed over and forgotten)."""
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CHUNK = 64 << 10  # a stalled download holds this much of its result
_RESULT_TYPE = "application/octet-stream"


def create_app(
    models: Mapping[str, nn.Module | str | Path],
    *,
    api_keys: Iterable[str] | None = None,
    limits: Limits | None = None,
    workers: int = 2,
    processes: bool = False,
    ray_replicas: int | None = None,
    ray_threads: int | None = None,
    state_dir: str | Path | None = None,
    co_batch: bool = False,
    tensor_parallel: int | None = None,
    tensor_parallel_device: str = "cpu",
    ray_cluster: Any = None,
) -> FastAPI:
    """A FastAPI app serving ``models`` (modules, or local checkpoint directories).

    Each model is loaded once and never changed; each request runs its own rewritten view.
    Jobs and results persist in ``state_dir``, so a host started again on it finishes what
    was queued or running. The app's ``state.host`` is the
    :class:`~torchsurgeon.remote.host.Host`.

    Args:
        models: each served model by name (a checkpoint path where the workers are
            processes or Ray actors).
        api_keys: the keys that may submit (None: no keys).
        limits: what one request may cost (:class:`~torchsurgeon.remote.limits.Limits`).
        workers, processes, ray_replicas, ray_threads, state_dir, co_batch,
            tensor_parallel, tensor_parallel_device, ray_cluster: where and how jobs run,
            the fields of :class:`~torchsurgeon.remote.host.HostConfig`.
    """
    import_anyio()  # before serving: see torchsurgeon.remote.compat
    config = HostConfig(
        workers=workers,
        processes=processes,
        co_batch=co_batch,
        state_dir=state_dir,
        tensor_parallel=tensor_parallel,
        tensor_parallel_device=tensor_parallel_device,
        ray_replicas=ray_replicas,
        ray_threads=ray_threads,
        ray_cluster=ray_cluster,
    )
    host = Host(models, config, api_keys=api_keys, limits=limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start()
        try:
            yield
        finally:
            host.stop()  # bounded; called directly: the thread pool may be full at shutdown

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
    async def health() -> JSONResponse:
        store = await run_in_threadpool(host.queue.store.health)  # 503 while writes fail
        replicas = await run_in_threadpool(host.executor.health)  # workers: live, replaced
        if replicas is None:
            return JSONResponse({"ok": store["ok"], "store": store}, 200 if store["ok"] else 503)
        status = 503 if replicas["state"] == "down" or not store["ok"] else 200
        ok = replicas["state"] == "ok" and store["ok"]
        return JSONResponse({"ok": ok, "replicas": replicas, "store": store}, status)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        owner(request)
        return {"models": host.models_json()}

    @app.get("/v1/models/{name}/structure")
    async def structure(name: str, request: Request) -> dict[str, Any]:
        owner(request)
        return host.model(name).structure.to_json()

    @app.post("/v1/models/{name}/jobs", status_code=202, response_model=None)
    async def submit(
        name: str, request: Request, wait: float = 0.0, forget: bool = False
    ) -> dict[str, Any] | Response:
        """Queue a job; with ``wait``, hold the answer up to that many seconds and, if the
        job finished by then, answer with its result file itself (one round trip for a
        small run; ``forget``: the host drops the job once the result is sent, and a result
        that comes while the answer waits goes to it from the worker in memory, without
        touching the store)."""
        who = owner(request)
        host.model(name)
        request_key = request.headers.get("idempotency-key")
        if request_key is not None and not _REQUEST_ID.fullmatch(request_key):
            raise ApiError(
                400,
                "bad_request",
                "Idempotency-Key must be 1 to 128 letters, digits or '._:-' (a UUID fits)",
                "Idempotency-Key",
            )
        limits = host.limits
        body = await _read_body(request, limits.max_request_bytes, limits.request_idle_seconds)
        hand_over = wait > 0 and forget
        job = await run_in_threadpool(host.submit, who, name, body, request_key, hand_over)
        if wait > 0:
            deadline = time.monotonic() + min(wait, _MAX_WAIT)
            status = host.queue.status(job)
            try:
                while status["state"] not in ("done", "error") and time.monotonic() < deadline:
                    left = min(deadline - time.monotonic(), _DISCONNECT_CHECK_SECONDS)
                    await host.queue.wait(job, status["version"], left)
                    status = host.queue.status(job)
                    if hand_over and await request.is_disconnected():
                        host.queue.forget(job)  # nobody can take its result: stop it now
                        return Response(status_code=499)
            except BaseException:  # cancelled: a result held for this answer goes with its job
                if hand_over and host.queue.take(job) is not None:
                    host.queue.forget(job)
                raise
            held = host.queue.take(job) if hand_over else None
            if held is not None:  # straight from the worker, never stored
                host.queue.forget(job)  # before the answer: nothing of it stays held after
                return Response(held, media_type=_RESULT_TYPE, headers={"X-Job-Id": job.id})
            status = host.queue.status(job)
            if status["state"] == "done":
                await run_in_threadpool(host.queue.verify_result, job)  # 500 result_corrupt
                return _result_response(host, job, forget)
            if status["state"] == "error" and forget:
                host.queue.forget(job)
            if status["state"] == "error" and job.error is not None:
                raise ApiError(422, job.error.code, job.error.message, job.error.field)
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
        host.queue.status(job)  # an expired job: 410
        if job.state == "error" and job.error is not None:
            raise ApiError(422, job.error.code, job.error.message, job.error.field)
        if job.state != "done":
            raise ApiError(409, "not_ready", f"job {job_id!r} is {job.state}", "job")
        await run_in_threadpool(host.queue.verify_result, job)  # 500 result_corrupt, never data
        return _result_response(host, job, forget=False)

    @app.delete("/v1/jobs/{job_id}")
    async def forget(job_id: str, request: Request) -> dict[str, Any]:
        job = host.queue.get(job_id, owner(request))
        await run_in_threadpool(host.queue.forget, job, True)  # 507/503 unless really gone
        return {"id": job_id, "deleted": True}

    return app


def _result_response(host: Host, job: Any, forget: bool) -> Response:
    """The finished job's result file, streamed from disk; with ``forget``, the job is
    dropped before the answer goes out (the open file still reads: POSIX keeps it)."""
    try:  # opened here, so a sweep that deletes the file meanwhile cannot cut it short
        stream = open(host.queue.store.result_path(job.id), "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ApiError(410, "expired", f"the result of job {job.id!r} is gone", "job") from None
    size = os.fstat(stream.fileno()).st_size
    if forget:
        try:
            host.queue.forget(job)
        except BaseException:
            stream.close()
            raise
    return _ResultFile(stream, size, {"X-Job-Id": job.id})


async def _read_body(request: Request, limit: int, idle: float) -> bytes:
    """The request body: 413 as soon as it is known to exceed ``limit``, 408 if it stalls
    for ``idle`` or takes longer in all than the server's
    :meth:`~torchsurgeon.remote.server.ServerLimits.body_seconds` of its size."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "too_large", f"the request is {declared} bytes, over max_request_bytes={limit}"
        )
    server = request.scope.get("extensions", {}).get(SCOPE_KEY) or ServerLimits()
    budget = server.body_seconds(int(declared) if declared and declared.isdigit() else limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), min(idle, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # nobody is left to answer: a 400 that is never sent
            raise ApiError(400, "client_disconnected", "the client hung up mid-body") from None
        except asyncio.TimeoutError:
            request.scope.setdefault("extensions", {})[CLOSE_KEY] = True  # the rest: unread
            if loop.time() >= deadline:
                raise ApiError(
                    408,
                    "request_timeout",
                    f"the request body took over request_body_seconds={budget:.3g} s (for its "
                    f"{declared or limit} bytes at {server.min_upload_bytes_per_second} B/s "
                    f"at least, plus {server.request_body_seconds:g} s)",
                    "request_body_seconds",
                ) from None
            raise ApiError(
                408,
                "request_timeout",
                f"the request body stalled for request_idle_seconds={idle:g} s",
                "request_idle_seconds",
            ) from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the request is over max_request_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


class _ResultFile(Response):
    """A result file sent ``_CHUNK`` bytes at a time, read as the client takes them; the file
    is closed and no piece of it stays referenced once the response ends or the client goes
    (a stalled reader holds one chunk, and a gone one nothing)."""

    def __init__(self, stream: Any, size: int, headers: dict[str, str]) -> None:
        headers = {"Content-Length": str(size), **headers}
        super().__init__(None, media_type=_RESULT_TYPE, headers=headers)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            raise RuntimeError("a result response is sent once")
        try:
            done = asyncio.get_running_loop().create_future()

            async def watch() -> None:  # uvicorn's send does not fail once the client is gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not done.done():
                    done.set_result(None)

            watcher = asyncio.ensure_future(watch())
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                while not done.done():
                    chunk = await run_in_threadpool(stream.read, _CHUNK)
                    more = len(chunk) == _CHUNK
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                    chunk = None
                    if not more:
                        break
            finally:
                watcher.cancel()
        finally:
            stream.close()
