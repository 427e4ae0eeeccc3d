"""The client of a torchsurgeon host: send a plan and inputs, get a ``ts.Result`` back.

    client = ts.remote.Client("http://127.0.0.1:8000", api_key=...)
    model = client.meta("gpt2")                      # structure only, no weights
    probe = ts.select(model).at("transformer.h.3").insert_after(ts.layers.Save("h3"))
    result = client.run(probe, input_ids)            # or ts.run(probe, ids, backend=client)

:meth:`Client.run` accepts a :class:`~torchsurgeon.plans.plan.Plan` or a rewritten model
(planned with ``ts.plan``), blocks while showing progress (queue position, running,
downloading; with ``rich``) and returns the same :class:`~torchsurgeon.layers.results.Result`
class a local ``ts.run`` does, so ``ts.run(model, ids, backend=client)`` works.
:meth:`Client.submit` returns a :class:`Job` to poll instead.

Which hosted model runs a plan: ``model_name=`` if given, else the client's default
``model=``, else the hosted model whose identity the plan's base has (its structure, for a
plan made on a structure-only model); if none has, the error names what the plan was built
against and what each hosted model is.

**When the host goes away.** Every call that cannot reach a host this client reached
before (refused, reset, timed out) is retried with exponential backoff for up to
``reconnect_seconds``; after that it is a :class:`~torchsurgeon.remote.errors.RemoteError`
``unreachable`` — never a raw ``httpx`` exception. A host never reached that refuses the
connection fails at once. Each submission carries a request id (``Idempotency-Key``, a
fresh UUID unless ``request_id=`` names one), so a POST retried after a lost answer returns
the job the first one made instead of running it twice. A job waited on across a host
restart is found again in the host's state directory; if the restarted host does not know
it (it keeps no state directory) the error says so.

**A hostile host** cannot exhaust the client: answers are streamed and bounded
(:class:`~torchsurgeon.remote.client_io.AnswerLimits`), and Ctrl-C while a run waits deletes
its job on the host and names it in one line on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from torch import nn

from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.results import Result
from torchsurgeon.layers.session import Session
from torchsurgeon.layers.training import Optimizer, TrainResult, with_tensors
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.structure import Structure
from torchsurgeon.remote.client_io import (
    CANCEL_SECONDS,
    Answer,
    AnswerLimits,
    Progress,
    bounded_build,
    cancelled_on_interrupt,
    check_structure,
    check_url,
    httpx_errors,
    interrupted,
    read_answer,
)
from torchsurgeon.remote.client_request import hosted_model_for, request_of
from torchsurgeon.remote.client_request import training_request as _training_request
from torchsurgeon.remote.errors import RemoteError
from torchsurgeon.remote.result_wire import decode_result
from torchsurgeon.remote.transfer import encode_request

__all__ = ["AnswerLimits", "Client", "Job", "JobStatus"]

_POLL_SECONDS = 10.0
_ANSWER_WAIT = 2.0
"""Seconds a blocking run's submission waits for the result to come back in its answer."""
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class JobStatus:
    """A job's state: ``queued`` (``position`` jobs ahead), ``running``, ``done``, ``error``."""

    id: str
    state: str
    position: int | None = None
    error: RemoteError | None = None
    version: int = 0
    progress: dict[str, Any] | None = None
    """While running: what the run last reported (a training run's ``step``, ``steps`` and
    ``loss``)."""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error")


class Job:
    """A submitted job: poll :meth:`status`, fetch :meth:`result` (which waits)."""

    def __init__(self, client: Client, job_id: str, model_name: str) -> None:
        self.client = client
        self.id = job_id
        self.model_name = model_name

    def status(self, *, since: int | None = None, wait: float = 0.0) -> JobStatus:
        """The job's status; with ``since``, wait up to ``wait`` s for it to change."""
        params: dict[str, Any] = {}
        if since is not None:
            params = {"since": since, "wait": wait}
        reconnects = self.client.reconnects
        try:
            data = self.client._json("GET", f"/v1/jobs/{self.id}", params=params)
        except RemoteError as error:
            if error.status == 404 and self.client.reconnects > reconnects:
                raise RemoteError(
                    404,
                    "job_lost",
                    f"job {self.id} is unknown to the host after it came back; it keeps jobs "
                    "across restarts only with a state directory (torchsurgeon serve "
                    "--state-dir)",
                    "job",
                ) from None
            raise
        error = data.get("error")
        return JobStatus(
            id=self.id,
            state=data["state"],
            position=data.get("position"),
            error=RemoteError(422, error["code"], error["message"], error.get("field", ""))
            if error
            else None,
            version=data.get("version", 0),
            progress=data.get("progress") if isinstance(data.get("progress"), dict) else None,
        )

    def wait(self, timeout: float | None = None, on_status: Any = None) -> JobStatus:
        """Block until the job finishes (long polling); ``on_status`` sees each change.

        Ctrl-C deletes the job on the host (one line on stderr names it) and re-raises.
        """
        with cancelled_on_interrupt(self):
            deadline = None if timeout is None else time.monotonic() + timeout
            status = self.status()
            while not status.finished:
                if on_status is not None:
                    on_status(status)
                left = _POLL_SECONDS if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {self.id} is still {status.state} after {timeout} s")
                status = self.status(since=status.version, wait=min(left, _POLL_SECONDS))
            return status

    def result(self, timeout: float | None = None, *, progress: bool = False) -> Result:
        """The job's :class:`Result`, waiting for it (Ctrl-C: as in :meth:`wait`), or the
        :class:`RemoteError` it failed with."""
        with cancelled_on_interrupt(self), Progress(progress, self.model_name) as shown:
            status = self.wait(timeout, on_status=shown.update)
            if status.error is not None:
                raise status.error
            shown.update(JobStatus(self.id, "downloading"))
            return decode_result(self.client._request("GET", f"/v1/jobs/{self.id}/result").body)

    def delete(self) -> None:
        """Forget the job on the host, with its result (it then no longer counts against the
        key's ``max_result_bytes_per_key``); a queued job leaves the queue."""
        self.client._request("DELETE", f"/v1/jobs/{self.id}")

    def __repr__(self) -> str:
        return f"Job({self.id!r}, model={self.model_name!r})"


class Client:
    """A connection to a torchsurgeon host at ``url``."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float = 60.0,
        progress: bool = True,
        reconnect_seconds: float = 60.0,
        max_result_bytes: int | None = None,
        limits: AnswerLimits | None = None,
    ) -> None:
        """Connect to ``url`` (``http(s)://host[:port]``; anything else is a ``ValueError``).

        Args:
            timeout: seconds for one HTTP call.
            reconnect_seconds: how long to keep retrying a host that answered before and
                cannot be reached now (restarting, overloaded). A host this client never
                reached, refusing the connection, fails at once.
            max_result_bytes: the largest result file taken (default
                ``limits.max_result_bytes``, 1 GiB).
            limits: the bounds on every answer (see :class:`AnswerLimits`).
        """
        import httpx  # the client's one dependency beyond torchsurgeon's own

        self.url = check_url(url)
        limits = limits or AnswerLimits()
        if max_result_bytes is not None:
            limits = dataclasses.replace(limits, max_result_bytes=max_result_bytes)
        self.limits = limits
        headers = {"Accept-Encoding": "gzip, deflate"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.model = model
        self.progress = progress
        self.reconnect_seconds = reconnect_seconds
        self.reconnects = 0  # calls that reached the host only after retrying
        self._reached = False  # whether the host ever took a connection from this client
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._metas: dict[str, nn.Module] = {}
        self._hosted: list[dict[str, Any]] | None = None

    # ----------------------------------------------------------------- the host

    def models(self) -> list[dict[str, Any]]:
        """The hosted models: name, architecture, identity, tokenizer."""
        return list(self._json("GET", "/v1/models")["models"])

    def structure(self, name: str) -> Structure:
        """The hosted model's structure (no weights), within ``limits``' structure bounds."""
        data = self._json("GET", f"/v1/models/{name}/structure")
        check_structure(data, self.limits)
        return Structure.from_json(data)

    def meta(self, name: str) -> nn.Module:
        """A structure-only (meta device) copy of the hosted model, to select and plan against.

        It is pinned to the hosted model's identity, so plans made from it run exactly there
        and apply to a local copy of the same checkpoint.
        """
        if name not in self._metas:
            structure = self.structure(name)
            with bounded_build(self.limits):  # a served config names its own size
                self._metas[name] = structure.build()
        return self._metas[name]

    # ----------------------------------------------------------------- running

    def submit(
        self,
        plan_or_model: Plan | nn.Module | Session,
        *inputs: Any,
        model_name: str | None = None,
        request_id: str | None = None,
        backward: Expr | None = None,
        call: str = "forward",
        co_batch: bool = True,
        **kwargs: Any,
    ) -> Job:
        """Send a plan (or a rewritten model, planned here) and inputs; returns the :class:`Job`.

        A :class:`~torchsurgeon.layers.session.Session` is sent whole, as one request (its
        runs carry their own inputs); its result is one ``Result`` per run, by name.

        ``inputs`` are tensors (token ids), or one text / list of texts for a model with a
        tokenizer; ``kwargs`` are keyword arguments of the model call (tensors or scalars).
        ``request_id`` (default: a fresh UUID) is the submission's ``Idempotency-Key``: the
        host runs one job per id and key, however often the request arrives.
        ``co_batch=False`` asks a co-batching host to run this request alone. ``backward``
        is a scalar expression the host differentiates after the forward pass
        (``SaveGrad`` layers then record gradients; see ``ts.run``).
        """
        name, body = self._request_of(
            plan_or_model, inputs, kwargs, model_name, backward, call, co_batch
        )
        data = self._json(
            "POST",
            f"/v1/models/{name}/jobs",
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Idempotency-Key": request_id or uuid.uuid4().hex,
            },
        )
        return Job(self, data["id"], name)

    def _request_of(
        self,
        plan_or_model: Plan | nn.Module | Session,
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any],
        model_name: str | None,
        backward: Expr | None,
        call: str,
        co_batch: bool,
    ) -> tuple[str, bytes]:
        """``(hosted model name, request bytes)`` of a submission."""
        plan, body = request_of(plan_or_model, inputs, kwargs, backward, call, co_batch)
        return model_name or self.model or self._model_for(plan), body

    def _blocking(
        self, name: str, body: bytes, timeout: float | None, progress: bool | None
    ) -> Result:
        """Submit and wait. A run that finishes within :data:`_ANSWER_WAIT` seconds comes back
        in the answer to the submission itself — one round trip, and the host drops the job
        once sent; a longer one is followed as a :class:`Job` (progress shown, then
        downloaded and deleted)."""
        path = f"/v1/models/{name}/jobs"
        headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": uuid.uuid4().hex}
        wait = {"wait": _ANSWER_WAIT, "forget": "true"}
        try:
            answer = self._request("POST", path, params=wait, content=body, headers=headers)
        except KeyboardInterrupt:  # the same request id again names the job, to delete it
            raise interrupted(self, self._job_id(path, body, headers)) from None
        if answer.is_result:
            return decode_result(answer.body)
        data = answer.json(self.limits, "POST")
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RemoteError(502, "bad_response", f"POST answered {answer.text()!r}")
        job = Job(self, data["id"], name)
        result = job.result(timeout, progress=self.progress if progress is None else progress)
        with contextlib.suppress(RemoteError):  # else the host forgets it after its TTL
            self._request("DELETE", f"/v1/jobs/{job.id}", retry=False)
        return result

    def run(
        self,
        plan_or_model: Plan | nn.Module | Session,
        *inputs: Any,
        model_name: str | None = None,
        progress: bool | None = None,
        timeout: float | None = None,
        backward: Expr | None = None,
        co_batch: bool = True,
        **kwargs: Any,
    ) -> Result:
        """Run remotely and wait: the :class:`Result`, as a local ``ts.run`` would give.

        The job is deleted on the host once its result is here (it no longer counts against
        the key's ``max_result_bytes_per_key``).
        """
        name, body = self._request_of(
            plan_or_model, inputs, kwargs, model_name, backward, "forward", co_batch
        )
        return self._blocking(name, body, timeout, progress)

    def generate(
        self,
        plan_or_model: Plan | nn.Module,
        *inputs: Any,
        model_name: str | None = None,
        progress: bool | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Result:
        """``model.generate(*inputs, **options)`` on the host with the plan's layers applied at
        every step (``steps=`` on a layer picks steps); what ``ts.run(model.generate, ...)``
        gives locally, saves per step.

        ``options``: ``max_new_tokens`` (required), ``attention_mask``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``min_new_tokens``,
        ``eos_token_id``, ``pad_token_id``, ``use_cache``, and ``seed`` (required with
        ``do_sample=True``: the host seeds its generator with it — locally, the same tokens
        come from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``). Anything
        else is refused with a 4xx naming it.
        """
        name, body = self._request_of(
            plan_or_model, inputs, options, model_name, None, "generate", True
        )
        return self._blocking(name, body, timeout, progress)

    def train(
        self,
        model: nn.Module,
        batches: Any,
        *,
        loss: Expr,
        params: Any,
        optimizer: Optimizer,
        steps: int,
        model_name: str | None = None,
        progress: bool | None = None,
        timeout: float | None = None,
    ) -> TrainResult:
        """``ts.train(model, batches, ...)`` on the host, in one request: the trained tensors,
        the loss of every step, and ``model`` with the trained tensors put in (here). While it
        runs, the job's status reports each step's loss (shown by the progress line)."""
        plan, settings, calls = _training_request(model, batches, loss, params, optimizer, steps)
        name = model_name or self.model or self._model_for(plan)
        body = encode_request(plan.to_bytes(), (), {}, "train", training=settings, batches=calls)
        result = self._blocking(name, body, timeout, progress)
        losses = [float(x) for x in result.records["loss"][0]]
        tensors = {k: v[0] for k, v in result.records.items() if k != "loss"}
        return TrainResult(tensors, losses, with_tensors(model, tensors))

    def _model_for(self, plan: Plan) -> str:
        """The hosted model whose identity the plan's base has (the list is fetched once);
        else a 404 naming what the plan was built against and what each hosted model is."""
        for refresh in (False, True):
            if self._hosted is None or refresh:
                self._hosted = self.models()
            name, refusal = hosted_model_for(plan, self._hosted)
            if name is not None:
                return name
        raise RemoteError(404, "not_found", refusal)

    # ----------------------------------------------------------------- http

    def _request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Answer:
        """One call, its answer streamed within ``limits``; retried with backoff while the
        host cannot be reached (``retry``)."""

        def send() -> Answer:
            with self._http.stream(method, path, **kwargs) as response:
                self._reached = True
                return read_answer(response, self.limits, f"{method} {path}")

        return self._retried(send, method, path, retry)

    def _retried(self, send: Callable[[], Answer], method: str, path: str, retry: bool) -> Answer:
        """``send()``, retried with backoff while the host cannot be reached (``retry``); an
        HTTP error answer is raised as :class:`RemoteError`. A refused connection to a host
        this client never reached fails at once: nothing is listening there."""
        import httpx

        give_up = time.monotonic() + (self.reconnect_seconds if retry else 0.0)
        backoff, attempts = _FIRST_BACKOFF, 0
        while True:
            attempts += 1
            try:
                answer = send()
                break
            except httpx.TransportError as failure:
                left = give_up - time.monotonic()
                if not isinstance(failure, httpx.ConnectError):
                    self._reached = True  # it took the connection, then failed
                elif not self._reached:
                    raise RemoteError(
                        503,
                        "unreachable",
                        f"the host at {self.url} did not answer {method} {path}: nothing "
                        f"accepts connections there ({failure}); is the host running?",
                    ) from None
                if left <= 0:
                    raise RemoteError(
                        503,
                        "unreachable",
                        f"the host at {self.url} did not answer {method} {path} "
                        f"({attempts} attempts over reconnect_seconds={self.reconnect_seconds:g}"
                        f"; last: {type(failure).__name__}: {failure})",
                    ) from None
                time.sleep(min(backoff, left))
                backoff = min(2 * backoff, _MAX_BACKOFF)
        if attempts > 1:
            self.reconnects += 1
        if answer.status >= 400:
            try:
                error = answer.json(self.limits, f"{method} {path}")["error"]
                code, message = str(error["code"]), str(error["message"])
                field = str(error.get("field", ""))
            except (RemoteError, KeyError, TypeError, AttributeError):
                code, message, field = "http_error", answer.text(500), ""
            raise RemoteError(answer.status, code, message, field)
        return answer

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        data = self._request(method, path, **kwargs).json(self.limits, f"{method} {path}")
        if not isinstance(data, dict):
            raise RemoteError(502, "bad_response", f"{method} {path} answered {data!r:.200}")
        return data

    def _job_id(self, path: str, body: bytes, headers: dict[str, str]) -> str | None:
        """The id of the job an interrupted submission made (resent, quickly, with its
        ``Idempotency-Key``); None if the host does not say."""
        with contextlib.suppress(RemoteError, httpx_errors()):
            again = {"content": body, "headers": headers, "timeout": CANCEL_SECONDS}
            data = self._request("POST", path, retry=False, **again).json(self.limits, path)
            if isinstance(data, dict) and isinstance(data.get("id"), str):
                return data["id"]
        return None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"
