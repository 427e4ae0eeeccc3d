"""A host's memory stays flat over thousands of requests.

Every request builds its own rewritten view of the base (and a structure-only twin of it
for the cost estimate), runs it and sends the result back; nothing of it may stay behind —
not the views, not per-model caches keyed by them, not the estimates. Five thousand
sequential two-step plans over HTTP must grow the host's resident memory by less than
50 MB (after a warm-up that lets allocators and caches reach their working size).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
from host_cases import rss
from plan_cases import HIDDEN, full_digest, make_gpt2, token_ids
from requirements import soak

import torchsurgeon as ts
from torchsurgeon.plans import plan
from torchsurgeon.remote import Client, create_app, serve_in_thread

REQUESTS = soak("SOAK_SEQUENTIAL_N", full=5_000, quick=1_000)


@pytest.mark.slow
def test_five_thousand_sequential_requests_leave_memory_flat() -> None:
    model = ts.wrap(make_gpt2())
    generator = torch.Generator().manual_seed(0)
    plans = []
    for i in range(8):  # distinct plans: each request replays its own, onto a fresh view
        vector = torch.randn(HIDDEN, generator=generator)
        probe = ts.select(model).at(f"transformer.h.{i % 3}").insert_after(ts.layers.Add(vector))
        probe = (
            ts.select(probe).at(f"transformer.h.{(i + 1) % 3}").insert_after(ts.layers.Save("s"))
        )
        plans.append(plan(probe).returning("s", mean=[1]))
    ids = token_ids()
    app = create_app({"gpt2": model})
    base = app.state.host.models["gpt2"].base
    digest = full_digest(base)
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        for i in range(100):
            client.run(plans[i % len(plans)], ids)
        gc.collect()
        before = rss()
        start = time.monotonic()
        growth = []
        for i in range(REQUESTS):
            result = client.run(plans[i % len(plans)], ids)
            assert result.saved["s"].shape == (3, HIDDEN)
            if (i + 1) % 1000 == 0:
                gc.collect()
                growth.append((rss() - before) >> 20)
        elapsed = time.monotonic() - start
    print(f"\n{REQUESTS} requests in {elapsed:.0f} s; RSS growth every 1000 (MB): {growth}")
    assert rss() - before < 50 << 20, growth
    assert full_digest(base) == digest
