"""A job that nobody will take is stopped, not run: ``DELETE`` on a running job stops it at
its next module call (its worker free within a second), and a blocking submission whose
client went away is cancelled the same way.

The hosted model has a slow activation (0.1 s a call), so a 25-token generation would hold
the host's one worker for about 7 s; each test measures how soon the worker serves the
next request instead.
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
from torchsurgeon.plans import plan
from torchsurgeon.remote import Client, create_app, serve_in_thread
from torchsurgeon.remote.transfer import encode_request

pytestmark = pytest.mark.slow  # starts a server


class SlowAct(nn.Module):
    """GELU that takes 0.1 s a call (a stand-in for a big model's layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            time.sleep(0.1)
        return nn.functional.gelu(x)


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[str, Any, nn.Module]]:
    model = make_gpt2()
    for block in model.transformer.h:
        block.mlp.act = SlowAct()
    model = ts.wrap(model.eval())
    app = create_app({"gpt2": model}, workers=1)
    with serve_in_thread(app) as server:
        yield server.url, app.state.host, model


def running(host: Any) -> int:
    """Runs holding a worker (forgotten jobs included, until their run stops)."""
    return sum(host.queue._running.values())


def wait_for(condition: Any, seconds: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_deleting_a_running_job_stops_it_and_frees_its_worker(
    host: tuple[str, Any, nn.Module],
) -> None:
    url, served, model = host
    with Client(url, progress=False) as client:
        long = client.submit(
            plan(model),
            token_ids(length=4)[:1],
            call="generate",
            max_new_tokens=25,
            min_new_tokens=25,
            do_sample=False,
        )
        wait_for(lambda: long.status().state == "running", 30)
        time.sleep(0.3)  # well inside its ~7 s
        assert long.status().state == "running"
        long.delete()
        freed = wait_for(lambda: not running(served), 5)
        start = time.monotonic()
        client.run(plan(model), token_ids())  # the one worker serves the next request
        took = time.monotonic() - start
    print(f"\nworker free {freed:.2f} s after DELETE; next run {took:.2f} s")
    assert freed < 1.0
    assert took < 3.0


def test_a_blocking_submission_whose_client_went_away_is_cancelled(
    host: tuple[str, Any, nn.Module],
) -> None:
    url, served, model = host
    body = encode_request(
        plan(model).to_bytes(),
        (token_ids(length=4)[:1],),
        {"max_new_tokens": 25, "min_new_tokens": 25, "do_sample": False},
        call="generate",
    )
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url) as raw:
        raw.post("/v1/models/gpt2/jobs?wait=30&forget=true", content=body, timeout=1.0)
    gone = time.monotonic()
    wait_for(lambda: not served.queue._jobs, 5)  # forgotten
    wait_for(lambda: not running(served), 5)
    assert time.monotonic() - gone < 2.0
