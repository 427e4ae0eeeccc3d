"""A run stops within 1 s of its deadline, for a forward pass of many slow layers and for a
generation of many decode steps: the deadline is checked between layers and steps, not
only around the run.

The hosted model's activation takes a fixed time a call (a stand-in for a big layer, so
the admission estimate, made on meta tensors, does not see it): the forward pass would
take about 5 s and the generation about 8 s under ``max_run_seconds=1.5``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from plan_cases import make_gpt2, token_ids
from torch import nn

import torchsurgeon as ts
from torchsurgeon.remote import Client, Limits, create_app, serve_in_thread

pytestmark = pytest.mark.slow  # starts a server, runs up to the deadline four times

MAX_RUN = 1.5
SLACK = 1.0  # the bound: a run ends within 1 s of its deadline


class SlowAct(nn.Module):
    """GELU that takes ``seconds`` a call on real tensors."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            time.sleep(self.seconds)
        return nn.functional.gelu(x)


def _slow_gpt2(layers: int, seconds: float) -> nn.Module:
    model = make_gpt2(n_layer=layers)
    for block in model.transformer.h:
        block.mlp.act = SlowAct(seconds)
    return ts.wrap(model.eval())


@pytest.fixture(scope="module", params=[False, True], ids=["alone", "co-batched"])
def host(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, nn.Module]]]:
    models = {"deep": _slow_gpt2(24, 0.2), "steps": _slow_gpt2(2, 0.05)}
    limits = Limits(max_run_seconds=MAX_RUN, watchdog_grace_seconds=30.0)
    app = create_app(models, limits=limits, workers=2, co_batch=request.param)
    with serve_in_thread(app) as server:
        yield server.url, models


def _timed_out(url: str, job_id: str) -> tuple[float, float]:
    """``(run_seconds the host measured, seconds until the client saw it end)``."""
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            status: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
            if status["state"] not in ("queued", "running"):
                break
            assert time.monotonic() - start < 30, status
            time.sleep(0.02)
    seen = time.monotonic() - start
    assert status["state"] == "error" and status["error"]["code"] == "timeout", status
    return status["run_seconds"], seen


def test_a_forward_pass_of_slow_layers_stops_within_a_second(
    host: tuple[str, dict[str, nn.Module]],
) -> None:
    url, models = host
    with Client(url, progress=False) as client:
        job = client.submit(models["deep"], token_ids(), model_name="deep")
        ran, seen = _timed_out(url, job.id)
    print(f"forward: ran {ran:.2f} s, seen ending after {seen:.2f} s (limit {MAX_RUN} s)")
    assert ran <= MAX_RUN + SLACK and seen <= MAX_RUN + SLACK + 0.5


def test_a_generation_of_many_steps_stops_within_a_second(
    host: tuple[str, dict[str, nn.Module]],
) -> None:
    url, models = host
    with Client(url, progress=False) as client:
        job = client.submit(
            models["steps"],
            token_ids(length=3),
            model_name="steps",
            call="generate",
            max_new_tokens=25,
            do_sample=False,
        )
        ran, seen = _timed_out(url, job.id)
    print(f"generate: ran {ran:.2f} s, seen ending after {seen:.2f} s (limit {MAX_RUN} s)")
    assert ran <= MAX_RUN + SLACK and seen <= MAX_RUN + SLACK + 0.5
