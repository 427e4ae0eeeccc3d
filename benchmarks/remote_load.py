"""Remote execution under load: requests/s and latency of a host, beside local execution.

The question a team sharing one hosted model asks: how many plans per second does a host
run, how long does each wait, and what does going through HTTP cost compared with running
the same plan locally? The experiment writes a seeded random GPT-2 checkpoint to a
temporary directory and starts ``python -m torchsurgeon.remote.serve`` on it in a separate
process (so client threads and the server do not share a GIL), bound to 127.0.0.1.

Each request carries a different plan — ``Add`` a seeded random steering vector after
block ``i % n_layer``, ``Save`` every block — returning the logits' top 5 at the last
position and each block's mean over positions (``plan.returning(...)``), on 2 x 16 token
ids. Three ways of running the same 200 plans (8 clients x 25 requests) are timed:

``local``
    ``ts.plans.execute(plan, base, ids)`` in this process, one request after another:
    replay the plan onto the base, ``ts.run``, reduce. What the host does per job.
``local-8-threads``
    The same from 8 threads at once (the torch thread pool is shared).
``remote``
    8 client threads, each with its own ``ts.remote.Client``, 25 ``client.run(plan, ids)``
    calls each: encode, POST, wait (long polling), download, decode.
``remote-ray``
    (``--ray``) the same against ``serve --ray --replicas 2 --threads-per-replica 1`` (two
    replicas of one torch thread each share the 2 cores; their results are checked against
    a local run with 1 thread, since a matmul split over another number of threads sums in
    another order).

Latency is per request (submit to decoded result); requests/s is 200 / wall time. Every
remote result is then checked against its local twin (equal, max abs diff 0).

    python benchmarks/remote_load.py            # GPT-2 with 6 layers, d=256 (~1 minute)
    python benchmarks/remote_load.py --tiny     # 3 layers, d=32: the fixed cost per request
    python benchmarks/remote_load.py --ray      # also 2 Ray replicas
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

import torchsurgeon as ts
from torchsurgeon.plans import Plan, execute, plan
from torchsurgeon.remote import Client

CLIENTS, REQUESTS = 8, 25
SIZES = {
    "default": {"n_layer": 6, "n_embd": 256, "n_head": 8},
    "tiny": {"n_layer": 3, "n_embd": 32, "n_head": 4},
}


def write_checkpoint(path: Path, sizes: dict[str, int]) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=8192, n_positions=64, **sizes)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)


def make_plans(base: torch.nn.Module, count: int) -> list[tuple[Plan, torch.Tensor]]:
    """``count`` different plans with their token ids (seeded)."""
    n_layer, width = base.config.n_layer, base.config.n_embd
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        probe = (
            ts.select(base)
            .at(f"transformer.h.{i % n_layer}")
            .insert_after(ts.layers.Add(torch.randn(width, generator=g), 0.5))
        )
        probe = ts.select(probe).at("transformer.h.*").insert_after(ts.layers.Save("b{n}"))
        recorded = plan(probe).returning("logits", topk=5, positions=-1)
        recorded = recorded.returning(*(f"b{j}" for j in range(n_layer)), mean=[1])
        out.append((recorded, torch.randint(0, 8192, (2, 16), generator=g)))
    return out


def timed(
    work: Callable[[int], Any], jobs: int, threads: int
) -> tuple[float, list[float], list[Any]]:
    """Run ``work(i)`` for every job on ``threads`` threads: wall time, latencies, results."""
    latencies: list[float] = [0.0] * jobs
    results: list[Any] = [None] * jobs

    def worker(first: int) -> None:
        for i in range(first, jobs, threads):
            start = time.perf_counter()
            results[i] = work(i)
            latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return time.perf_counter() - start, latencies, results


def start_host(
    checkpoint: Path, ray: bool, workers: int = 2
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torchsurgeon.remote.serve",
        "--model",
        f"gpt2={checkpoint}",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    if ray:
        command += ["--ray", "--replicas", "2", "--threads-per-replica", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(f"the host exited with status {process.returncode}")
    raise TimeoutError("the host did not start")


def same(a: ts.Result, b: ts.Result) -> bool:
    va, vb = a.output.logits, b.output.logits
    return (
        torch.equal(va.values, vb.values)
        and torch.equal(va.indices, vb.indices)
        and all(torch.equal(a.saved[k], b.saved[k]) for k in b.saved)
        and a.saved.keys() == b.saved.keys()
    )


def row(name: str, wall: float, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (
        f"| {name} | {len(ms) / wall:.1f} | {statistics.median(ms):.1f} | {p99:.1f} | {wall:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 3-layer d=32 model")
    parser.add_argument("--ray", action="store_true", help="also serve with 2 Ray replicas")
    parser.add_argument("--workers", type=int, default=2, help="host worker threads (default 2)")
    args = parser.parse_args()
    sizes = SIZES["tiny" if args.tiny else "default"]
    jobs = CLIENTS * REQUESTS
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "gpt2"
        write_checkpoint(checkpoint, sizes)
        base = ts.wrap(transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval())
        plans = make_plans(base, jobs)

        def run_local(i: int) -> ts.Result:
            with torch.no_grad():  # grad mode is per thread: set it in the worker thread
                return execute(plans[i][0], base, plans[i][1])

        run_local(0)  # warm up
        local = timed(run_local, jobs, 1)
        local8 = timed(run_local, jobs, CLIENTS)
        rows = [row("local", local[0], local[1]), row("local-8-threads", local8[0], local8[1])]
        for mode in ["remote", *(["remote-ray"] if args.ray else [])]:
            process, url = start_host(checkpoint, mode == "remote-ray", args.workers)
            try:
                clients = [Client(url, progress=False) for _ in range(CLIENTS)]
                for client in clients:  # warm up: connection and first run
                    client.run(*plans[0])
                remote = timed(lambda i, c=clients: c[i % CLIENTS].run(*plans[i]), jobs, CLIENTS)
            finally:
                process.terminate()
                process.wait(60)
            twins = local[2]
            if mode == "remote-ray":  # replicas run torch with 1 thread: so does their twin
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                twins = [run_local(i) for i in range(jobs)]
                torch.set_num_threads(threads)
            differ = [i for i in range(jobs) if not same(remote[2][i], twins[i])]
            if differ:
                i = differ[0]
                raise AssertionError(
                    f"{len(differ)} {mode} results differ from local, e.g. request {i}: "
                    f"{remote[2][i]} vs {twins[i]}"
                )
            rows.append(row(mode, remote[0], remote[1]))
    print(
        f"GPT-2 {sizes}, vocab 8192, {jobs} requests of 2 x 16 tokens "
        f"({CLIENTS} clients x {REQUESTS}); every remote result equal to its local twin"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )
    print("\n| method | requests/s | p50 ms | p99 ms | wall s |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
