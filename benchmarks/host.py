"""A shared host's throughput and overhead: co-batching on vs off, remote vs local, transfer.

Three questions, each answered side by side in one run:

``co-batching``
    8 concurrent clients (8 API keys), each sending small plans that differ per request —
    ``Save`` / ``SetValues`` / ``Add`` / ``Patch`` mixes on a 4-layer random GPT-2, 2 x 16
    token ids, the logits' top 5 at the last position returned — to two hosts started from
    the same checkpoint in their own processes (so clients and server do not share a GIL):
    one with ``--co-batch``, one without. Rounds alternate between the hosts; requests/s is
    the requests of a round over its wall time, and the median of the rounds is printed with
    the ratio. One untimed round per host first (each plan's first request pays for its
    cost estimate). Every remote result is checked against the same plan run alone here.
``overhead``
    One client, one request at a time, against the host without co-batching:
    ``client.run(plan, ids)`` vs ``ts.plans.execute(plan, base, ids)`` here, interleaved;
    the p50 of each and of their difference.
``transfer``
    A plan returning 256 MiB of logits: the time ``job.result()`` takes for the finished
    job (a status call, the download of ``GET /v1/jobs/{id}/result`` and the decode), as
    MB/s (10^6 bytes).

    python benchmarks/host.py              # ~2 minutes on 2 cores
    python benchmarks/host.py --quick      # fewer rounds and requests, a 64 MiB transfer
    python benchmarks/host.py --hidden 64 --vocab 1024   # a model whose pass is mostly fixed cost
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

import torchsurgeon as ts
from torchsurgeon.plans import Plan, execute, plan
from torchsurgeon.remote import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name

KEYS = [f"key-{i}" for i in range(8)]
HIDDEN, LAYERS, VOCAB = 256, 4, 8192


def checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=HIDDEN, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    path = directory / "gpt2"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_host(path: Path, keys_file: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "torchsurgeon.remote.serve", "--model", f"gpt2={path}",
        "--port", str(port), "--api-keys", str(keys_file), "--workers", "2", *options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the host did not start: {process.stderr.read().decode()[-2000:]}")


def plans(base: torch.nn.Module, n: int) -> list[Plan]:
    """``n`` different small plans: Save / SetValues / Add / Patch mixes."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        block = f"transformer.h.{i % LAYERS}"
        kind = i % 4
        if kind == 0:
            probe = ts.select(base).at("transformer.h.*").insert_after(ts.layers.Save("h{layer}"))
        elif kind == 1:
            layer = ts.layers.SetValues(ts.idx[:, -1, [i % HIDDEN, (3 * i) % HIDDEN]], 2.0)
            probe = ts.select(base).at(f"{block}.mlp").insert_before(layer)
        elif kind == 2:
            layer = ts.layers.Add(torch.randn(HIDDEN, generator=g), 1.5)
            probe = ts.select(base).at(block).insert_after(layer)
        else:
            probe = (
                ts.select(base).at(block).insert_after(ts.layers.Patch(0, [1], index=ts.idx[-1]))
            )
            probe = ts.select(probe).at("transformer.h.0").insert_after(ts.layers.Save("h0"))
        out.append(plan(probe).returning("logits", topk=5, positions=-1))
    return out


def ids(i: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1000 + i))


def same(a: ts.Result, b: ts.Result) -> bool:
    x, y = a.output["logits"], b.output["logits"]
    return bool(torch.allclose(x.values, y.values, atol=1e-5) and torch.equal(x.indices, y.indices))


def round_of(
    url: str, work: list[tuple[Plan, torch.Tensor]], per_client: int
) -> tuple[float, list[ts.Result]]:
    """Requests/s of 8 clients sending ``per_client`` requests each at once, and results."""
    results: list[Any] = [None] * len(work)
    barrier = threading.Barrier(len(KEYS) + 1)

    def client(k: int) -> None:
        with Client(url, api_key=KEYS[k], progress=False, model="gpt2") as connected:
            connected.models()
            barrier.wait()
            for j in range(per_client):
                index = k * per_client + j
                results[index] = connected.run(work[index][0], work[index][1])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(KEYS))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return len(work) / (time.perf_counter() - started), results


def main() -> None:
    global HIDDEN, VOCAB  # the model's shape, which the plans and inputs above read
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"width ({HIDDEN})")
    parser.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary ({VOCAB})")
    args = parser.parse_args()
    HIDDEN, VOCAB = args.hidden, args.vocab
    rounds, per_client, sequential = (2, 4, 20) if args.quick else (4, 8, 60)
    transfer_mib = 64 if args.quick else 256
    torch.set_num_threads(1)
    print(f"torchsurgeon {ts.__version__}, torch {torch.__version__}, {cpu_name()}, "
          f"{os.cpu_count()} cores; GPT-2 of {LAYERS} layers, width {HIDDEN}, "
          f"vocab {VOCAB}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = checkpoint(root)
        keys_file = root / "keys.txt"
        keys_file.write_text("\n".join(KEYS))
        base = ts.wrap(transformers.GPT2LMHeadModel.from_pretrained(path).eval())
        off, off_url = start_host(path, keys_file, "--max-result-mb", str(transfer_mib + 16))
        on, on_url = start_host(path, keys_file, "--co-batch", "--batch-window-ms", "5")
        try:
            n = len(KEYS) * per_client
            work = list(zip(plans(base, n), [ids(i) for i in range(n)], strict=True))
            want = [execute(p, base, x) for p, x in work]
            for url in (off_url, on_url):  # warm-up: each plan's first estimate, not timed
                round_of(url, work, per_client)
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(rounds):
                for name, url in (("off", off_url), ("on", on_url)):
                    rate, got = round_of(url, work, per_client)
                    assert all(same(g, w) for g, w in zip(got, want, strict=True)), name
                    rates[name].append(rate)
            on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
            print(f"\nco-batching, {len(KEYS)} clients x {per_client} requests, {rounds} rounds "
                  "each (every result equal to its solo run):")  # fmt: skip
            for name, rate in (("off", off_rate), ("on", on_rate)):
                shown = ", ".join(f"{r:.1f}" for r in rates[name])
                print(f"  {name:<4} {rate:7.1f} req/s   (rounds: {shown})")
            print(f"  ratio on/off: {on_rate / off_rate:.2f}x")

            remote_t, local_t = [], []
            with Client(off_url, api_key=KEYS[0], progress=False, model="gpt2") as client:
                small = work[1][0]
                for i in range(sequential):
                    x = ids(5000 + i)
                    t = time.perf_counter()
                    execute(small, base, x)
                    local_t.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    client.run(small, x)
                    remote_t.append(time.perf_counter() - t)
                diffs = sorted(r - loc for r, loc in zip(remote_t, local_t, strict=True))
                print(
                    f"\nsequential overhead, {sequential} requests (a SetValues plan, 2 x 16 ids):"
                )
                print(f"  local  p50 {1e3 * statistics.median(local_t):7.2f} ms")
                print(f"  remote p50 {1e3 * statistics.median(remote_t):7.2f} ms")
                print(f"  remote - local p50 {1e3 * statistics.median(diffs):7.2f} ms")

                rows = transfer_mib * 2**20 // (4 * VOCAB * 32)
                big = plan(base).returning("logits")
                x = torch.randint(0, VOCAB, (rows, 32), generator=torch.Generator().manual_seed(9))
                job = client.submit(big, x)
                job.wait()
                t = time.perf_counter()
                result = job.result()  # one status call, then the download and the decode
                elapsed = time.perf_counter() - t
                size = result.output["logits"].numel() * 4
                print(f"\ntransfer of a {size / 2**20:.0f} MiB result (download + decode):")
                print(f"  {elapsed * 1e3:.0f} ms, {size / elapsed / 1e6:.0f} MB/s")
        finally:
            for process in (off, on):
                process.terminate()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
