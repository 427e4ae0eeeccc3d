"""The one worker type: the models a worker holds, and how it serves requests given as bytes.

Every executor runs requests through a :class:`Worker` — a thread of the HTTP process, a
spawned process (:mod:`torchsurgeon.remote.spawned`), a Ray replica or a Ray rank
(:mod:`torchsurgeon.remote.ray_pool`). A worker reads each request with the host's limits
(the HTTP process already checked and estimated it: ``estimate=False``), runs it — one
request alone, several of one batch key in one merged pass
(:mod:`torchsurgeon.remote.batching`) — and answers one :data:`Outcome` per request. A
sharded worker differs only in how it loaded its models (each a
:class:`~torchsurgeon.remote.sharded_models.OnShards`).

An outcome is plain data that crosses any process boundary the same way:
``("result", bytes)``, ``("error", ApiError record)`` or ``("alone", None)`` — run this
request again alone (its merged pass ran out of time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits

__all__ = ["OVERRUN_FIELD", "RUN_ALONE", "Outcome", "Worker", "described", "overran", "settled"]

RUN_ALONE = "run_alone"
"""A request's outcome when its merged pass ran out of time: queue it again to run alone,
so each request of the pass is judged on its own cost."""

Outcome = tuple[str, Any]
"""``("result", bytes)``, ``("error", record)`` or ``("alone", None)``."""


OVERRUN_FIELD = "watchdog_grace_seconds"
"""The field of a ``timeout`` whose run did not stop by itself and was killed or abandoned
(an overrun: counted against its key, ``Limits.max_overruns_per_key``)."""


def overran(what: str) -> ApiError:
    """The ``408 timeout`` of a run stopped from outside at its deadline."""
    return ApiError(
        408,
        "timeout",
        f"the run went past its deadline (max_run_seconds + watchdog_grace_seconds); {what}",
        OVERRUN_FIELD,
    )


def settled(outcome: Outcome) -> bytes | ApiError | str:
    """An outcome as the queue takes it: the result bytes, the :class:`ApiError`, or
    :data:`RUN_ALONE`."""
    kind, value = outcome
    if kind == "result":
        return value
    if kind == "alone":
        return RUN_ALONE
    return ApiError.from_record(value)


def described(model: Any) -> dict[str, Any]:
    """What the HTTP process needs to build a structure-only stand-in of a served model."""
    return {
        "structure": model.structure.to_json(),
        "takes_text": model.takes_text,
        "converted": model.converted,
        "attn_implementation": model.attn_implementation,
    }


class Worker:
    """Models loaded once, serving requests given as bytes (see the module docstring)."""

    def __init__(self, models: Mapping[str, Any], limits: Limits) -> None:
        """Args:
        models: each served model by name (a :class:`HostedModel`, or its sharded
            counterpart with the same ``prepare``/``call_arguments``/``merged_view``).
        limits: the host's limits, which every request is read with.
        """
        self.models = dict(models)
        self.limits = limits
        self.served = 0

    @classmethod
    def load(
        cls, sources: Mapping[str, Mapping[str, Any]], limits: Limits, threads: int | None = None
    ) -> Worker:
        """A worker holding each checkpoint (``LocalCheckpoint.to_json()`` form) whole."""
        if threads is not None:
            torch.set_num_threads(threads)
        models = {
            name: HostedModel.load(name, LocalCheckpoint.from_json(dict(checkpoint)))
            for name, checkpoint in sources.items()
        }
        return cls(models, limits)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each model's structure, whether it takes text, and how it was loaded."""
        return {name: described(m) for name, m in self.models.items()}

    def fingerprints(self) -> dict[str, str | None]:
        """Each base's weight fingerprint, computed now (to check nothing changed it)."""
        from torchsurgeon.plans.identity import identity_of

        return {name: identity_of(m.base).fingerprint for name, m in self.models.items()}

    def pid(self) -> int:
        """This worker's process id (a sign of life)."""
        return os.getpid()

    def serve(self, name: str, requests: Sequence[bytes]) -> list[Outcome]:
        """One outcome per request: one request alone, several in one merged pass."""
        from torchsurgeon.remote.batching import BatchPart, run_batch
        from torchsurgeon.remote.execution import prepare_submission, run_submission

        self.served += len(requests)
        hosted = self.models.get(name)
        if hosted is None:
            missing = ApiError(404, "not_found", f"no model {name!r} on this worker", "model")
            return [("error", missing.to_record())] * len(requests)
        if len(requests) == 1:
            out = []
            for request in requests:
                try:
                    runs = prepare_submission(hosted, request, self.limits, estimate=False)
                    out.append(("result", run_submission(hosted, runs, self.limits)))
                except Exception as error:  # reported as the job's error
                    out.append(_failed(error))
            return out
        parts, out = [], []
        for request in requests:
            try:
                runs = prepare_submission(hosted, request, self.limits, estimate=False)
                parts.append(BatchPart(hosted, runs[0]))
                out.append(None)
            except Exception as error:  # this request's error; the rest merge
                out.append(_failed(error))
        try:
            merged = iter(run_batch(parts, self.limits))
        except Exception as error:  # a worker survives anything a batch does
            return [o if o is not None else _failed(error) for o in out]
        return [o if o is not None else _outcome(*next(merged)) for o in out]


def _outcome(result: bytes | None, failure: Any) -> Outcome:
    if failure is None and result is not None:
        return "result", result
    if failure == RUN_ALONE:
        return "alone", None
    return _failed(failure)


def _failed(error: BaseException) -> Outcome:
    if isinstance(error, ApiError):
        return "error", error.to_record()
    return "error", ApiError(500, "internal", f"{type(error).__name__}: {error}").to_record()
