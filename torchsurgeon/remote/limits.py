"""What one request may cost a host: sizes, saves, queue depth, run time.

A host shares one model among many users, so every request is bounded, and going over a
bound is a clear 4xx answer naming the limit (``413``/``422``/``429``) — never a crash or a
stuck worker. The run-time limit is checked between blocks of the model while it runs (a
job past it stops with a ``timeout`` error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torchsurgeon.layers.base import layer_types
from torchsurgeon.plans.schema import PlanLimits

__all__ = ["Limits"]

_NO_BACKWARD = frozenset({"SaveGrad"})
"""Layers a host refuses: it runs forward passes only, so no gradient would ever arrive."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds of a host (bytes unless named otherwise)."""

    max_request_bytes: int = 64 << 20
    """A whole submission: the plan plus the inputs."""
    max_plan_bytes: int = 32 << 20
    max_tensor_bytes: int = 16 << 20
    """Any one tensor of a plan or of the inputs."""
    max_steps: int = 256
    max_saves: int = 64
    """Recording layers in the rewritten model."""
    max_text_items: int = 64
    max_text_chars: int = 64 << 10
    max_result_bytes: int = 64 << 20
    max_queue_per_key: int = 32
    """Jobs one API key may have queued or running at once."""
    max_run_seconds: float = 60.0
    result_ttl_seconds: float = 600.0
    """How long a finished job's result is kept for download."""

    def plan_limits(self) -> PlanLimits:
        """The plan reader's limits (layer allow-list: the registry minus backward-only ones)."""
        return PlanLimits(
            max_plan_bytes=self.max_plan_bytes,
            max_steps=self.max_steps,
            max_tensor_bytes=self.max_tensor_bytes,
            max_total_tensor_bytes=self.max_plan_bytes,
            allowed_layers=frozenset(layer_types()) - _NO_BACKWARD,
        )

    def request_limits(self) -> PlanLimits:
        """The container limits of a submission (plan bytes travel inside it)."""
        return PlanLimits(
            max_plan_bytes=self.max_request_bytes,
            max_tensor_bytes=self.max_request_bytes,  # the plan and each input: checked apart
            max_total_tensor_bytes=self.max_request_bytes,
            max_tensors=64,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        return cls(**data)
