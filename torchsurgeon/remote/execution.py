"""Running one request: the rewritten view, a run-time guard, the run, the reductions.

:func:`run_request` is the whole job of a worker, in-process or in a Ray actor: it takes
the view :meth:`~torchsurgeon.remote.hosted.HostedModel.prepare` made, adds a *deadline
guard* — a forward pre-hook on every module of the view, intervention layers included,
placed by one more copy-on-write rewrite, so only this request's view carries it — runs
the model without gradients, applies the plan's reductions
(:mod:`torchsurgeon.plans.returning`) and encodes the result. A run past
``max_run_seconds`` stops at the next module call with a ``timeout`` error. (The guard costs
a shallow copy of every node once per request, ~30 µs a node, and a clock read per module
call; the cost estimate made before the job was queued bounds what one call can do.)

Whatever a run raises is the request's doing — its plan, its inputs — and comes back as a
422 ``run_failed`` naming the exception, never as a host error.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.results import run
from torchsurgeon.plans.errors import PlanError
from torchsurgeon.plans.plan import Plan
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import Inputs, encode_result, result_nbytes
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.rewrite import Edit, rewrite

__all__ = ["JobTimeout", "run_request", "with_deadline"]


class JobTimeout(RuntimeError):
    """A run went past its deadline."""


def with_deadline(view: nn.Module, deadline: float, limit: float) -> nn.Module:
    """``view`` with a check of ``time.monotonic() < deadline`` before every module call."""

    def check(module: nn.Module, args: Any) -> None:
        if time.monotonic() > deadline:
            raise JobTimeout(f"the run went past the limit max_run_seconds={limit:g}")

    def guard(node: nn.Module, path: str) -> nn.Module:
        node.register_forward_pre_hook(check, prepend=True)
        return node

    edits: dict[str, Edit] = {path: guard for path, _ in iter_nodes(view)}
    return rewrite(view, edits)


def run_request(
    hosted: HostedModel, plan: Plan, view: nn.Module, inputs: Inputs, limits: Limits
) -> bytes:
    """Run ``view`` (``plan`` applied to ``hosted``) on ``inputs``; the encoded result."""
    args, kwargs = hosted.call_arguments(inputs)
    guarded = with_deadline(view, time.monotonic() + limits.max_run_seconds, limits.max_run_seconds)
    try:
        with torch.no_grad():
            result = plan.outputs.apply(run(guarded, *args, **kwargs))
    except JobTimeout as error:
        raise ApiError(408, "timeout", str(error)) from None
    except PlanError as error:
        raise ApiError(422, "bad_returning", str(error), "returning") from None
    except Exception as error:  # the plan's or the inputs' doing (the base is never changed)
        raise ApiError(422, "run_failed", f"{type(error).__name__}: {error}") from None
    size = result_nbytes(result)
    if size > limits.max_result_bytes:
        raise ApiError(
            422,
            "result_too_large",
            f"the result holds {size} bytes, over the limit max_result_bytes="
            f"{limits.max_result_bytes}; return fewer entries or reduce them "
            "(plan.returning(name, mean=..., topk=..., positions=...))",
        )
    return encode_result(result)
