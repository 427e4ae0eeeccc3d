"""A host's run-time limit, checked before every module call of a hosted model.

A job runs under ``max_run_seconds``. The check that enforces it lives on the hosted base
itself: when a host loads a model (:meth:`~torchsurgeon.remote.hosted.HostedModel.load`),
:func:`guard_deadlines` gives every module of the host's own frozen copy a forward pre-hook
that compares ``time.monotonic()`` with the deadline of the *running thread*, which
:func:`torchsurgeon.layers.graph.deadline` sets around a job (the expression evaluator
checks the same deadline before every node). Outside a
job the deadline is unset and the hook returns at once.

Because the hooks are on the base, every request's view (a copy-on-write rewrite of the
base) shares them for nothing: no per-request copy of the tree. A plan's inserted layers
carry no hook of their own; each is bounded by the cost estimate made before the job was
queued (``max_work``, ``max_activation_bytes``) and followed by a module call that checks.
A run past its deadline stops at the next module call with :class:`JobTimeout`.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from torchsurgeon.layers.guards import current_deadline, current_guard
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.rewrite import Edit, rewrite

__all__ = ["JobTimeout", "guard_deadlines"]


class JobTimeout(RuntimeError):
    """A run went past its deadline."""


def guard_deadlines(base: nn.Module) -> nn.Module:
    """``base`` (a frozen tree) with the deadline check before every module call."""

    def guard(node: nn.Module, path: str) -> nn.Module:
        node.register_forward_pre_hook(_check, prepend=True)
        return node

    edits: dict[str, Edit] = {path: guard for path, _ in iter_nodes(base)}
    return rewrite(base, edits)


def _check(module: nn.Module, args: Any) -> None:
    at = current_deadline()
    if at is not None and time.monotonic() > at:
        raise JobTimeout("the run went past its deadline")
    guard = current_guard()
    if guard is not None:
        guard()  # the host's memory watch (remote/memory.py)
