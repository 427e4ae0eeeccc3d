"""Results are not held in a host's memory: 30 results of 32 MiB from one key, made,
downloaded and deleted, leave the host's resident memory within 100 MB of where it was.

The host runs in a subprocess, so its resident memory (``VmRSS`` in ``/proc/<pid>/status``)
is its own and not the test's (which downloads the results).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchsurgeon as ts
from torchsurgeon.remote import Client

pytestmark = [
    pytest.mark.slow,  # a host process, 30 runs of 32 MiB each
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc"),
]

RESULTS = 30
ROWS, WIDTH = 2048, 4096  # a 32 MiB float32 output per run
SLACK = 100e6

_HOST = textwrap.dedent(
    f"""
    import sys, torch
    from torch import nn
    from torchsurgeon.remote import Limits, create_app, serve_in_thread
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, {WIDTH})).eval()
    limits = Limits(max_result_bytes=64 << 20, max_result_bytes_per_key=4 << 30,
                    max_queue_per_key=64)
    with serve_in_thread(create_app({{"wide": model}}, limits=limits, workers=2)) as server:
        print(server.url, flush=True)
        sys.stdin.read()  # until the test closes it
    """
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ts.wrap(nn.Sequential(nn.Linear(64, WIDTH)).eval())


def _resident(pid: int) -> int:
    """The process's resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def host() -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://"), url
        yield url, process.pid
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _round(client: Client, model: nn.Module, count: int) -> None:
    """``count`` results made, downloaded and deleted."""
    inputs = torch.randn(ROWS, 64)
    jobs = [client.submit(model, inputs, model_name="wide") for _ in range(count)]
    for job in jobs:
        assert job.result(timeout=120).output.shape == (ROWS, WIDTH)
    for job in jobs:
        job.delete()


def test_memory_returns_after_results_are_deleted(host: tuple[str, int]) -> None:
    url, pid = host
    model = _model()
    with Client(url, progress=False) as client:
        _round(client, model, 4)  # first runs: the allocator and torch settle
        before = _resident(pid)
        inputs = torch.randn(ROWS, 64)
        jobs = [client.submit(model, inputs, model_name="wide") for _ in range(RESULTS)]
        for job in jobs:
            job.wait(timeout=120)
        held = _resident(pid)
        for job in jobs:
            assert job.result(timeout=60).output.shape == (ROWS, WIDTH)
        downloaded = _resident(pid)
        for job in jobs:
            job.delete()
        start = time.monotonic()
        while (after := _resident(pid)) > before + SLACK and time.monotonic() - start < 5:
            time.sleep(0.1)
    mb = [x / 1e6 for x in (before, held, downloaded, after)]
    print(
        f"host resident: {mb[0]:.0f} MB before, {mb[1]:.0f} MB with {RESULTS} results held, "
        f"{mb[2]:.0f} MB after downloads, {mb[3]:.0f} MB after DELETE"
    )
    assert after <= before + SLACK
