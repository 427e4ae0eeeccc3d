"""Fuzzing the host: ten thousand mutated requests, never a 5xx, never a stall, no leak.

A host on a loopback port serves a small random GPT-2 (with a tokenizer). A seeded
``random.Random`` mutates a dozen valid requests — different layers, reductions, text and
token inputs — at every level a client controls: the bytes of the request file (flips,
truncation, a lying length prefix), its safetensors header (offsets, shapes and dtypes
that lie), the request description and the plan manifest inside it (any field replaced by
a huge or non-finite number, a boolean, a deep nesting, a long or odd string, a wrong type;
keys added and removed), the input tensors' values, and the HTTP framing itself
(``Content-Length`` lies and junk, over a raw socket). Every answer must be below 500 and
come within 2 s; afterwards the host's memory is within 200 MB of before and the base
model's bytes are unchanged. The counts by status and the slowest answer are printed.
"""

from __future__ import annotations

import copy
import errno
import gc
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from host_cases import raw_file, rss, save_tokenizer
from plan_cases import HIDDEN, full_digest, make_gpt2
from requirements import soak

import torchsurgeon as ts
from torchsurgeon.plans import plan
from torchsurgeon.plans.wire import METADATA_KEY
from torchsurgeon.remote import Limits, create_app, serve_in_thread
from torchsurgeon.remote.transfer import REQUEST_KEY

pytestmark = pytest.mark.slow

SEED = 20_260_611
REQUESTS = soak("FUZZ_N", full=10_000, quick=2_000)
RAW = "@@raw@@"
"""A placeholder string; after ``json.dumps`` it is replaced by raw (non-JSON-able) text."""

WEIRD = [
    "9" * 5000,
    "1" * 25,
    "-9223372036854775809",
    "9223372036854775807",
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "0",
    "-1",
    "1",
    "2",
    "7",
    "65536",
    "3.5",
    "true",
    "false",
    "null",
    '""',
    '"' + "x" * 100_000 + '"',
    '"\\ud800"',
    '"\\u0000"',
    '"../../etc/passwd"',
    '"__class__"',
    '"{n.__class__}"',
    '"{path.nope}"',
    '"transformer.h.*"',
    '"**"',
    '"ts_after"',
    '"int64"',
    '"F8_E4M3"',
    '"t0"',
    "[]",
    "{}",
    "[[]]",
    "[" * 40 + "]" * 40,
    "[" * 3000 + "]" * 3000,
    '{"op": "eval", "code": "1"}',
    '{"op": "==", "field": {"kind": "attr", "name": "weight"}, "value": 0}',
    '{"op": "matches", "field": {"kind": "path"}, "value": "' + "*a" * 300 + '"}',
    '{"slice": [0, null, 0]}',
    '{"list": [99999999]}',
    "[" + "1," * 50_000 + "1]",
    '"' + "é" * 20 + '"',
    "NaN",
    "Infinity",
]
"""Raw JSON texts a mutated field takes (some are not JSON at all)."""


# --------------------------------------------------------------------------- the host


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    directory = tmp_path_factory.mktemp("fuzz") / "gpt2"
    make_gpt2(n_layer=2).save_pretrained(directory)
    save_tokenizer(directory)
    limits = Limits(
        max_request_bytes=1 << 20,
        max_plan_bytes=768 << 10,
        max_tensor_bytes=256 << 10,
        max_result_bytes=1 << 20,
        max_activation_bytes=64 << 20,
        max_run_seconds=2.0,
        max_queue_per_key=64,
    )
    app = create_app({"gpt2": directory}, limits=limits, workers=2)
    with serve_in_thread(app) as server:
        yield server.url, app


# --------------------------------------------------------------------------- valid requests


def seeds() -> list[tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], dict]]:
    """``(manifest, plan tensors, description, input tensors)`` of a dozen valid requests."""
    model = ts.wrap(make_gpt2(n_layer=2))
    g = torch.Generator().manual_seed(0)
    L = ts.layers
    probes = [
        ts.select(model).at("transformer.h.*").insert_after(L.Save("b{n}")),
        ts.select(model)
        .at("transformer.h.*")
        .where(ts.layer_index.isin([0]))
        .insert_after(L.Add(torch.randn(HIDDEN, generator=g), 0.5)),
        ts.select(model)
        .at("transformer.h.1.mlp")
        .insert_before(L.SetValues(ts.idx[:, -1, [1, 2]], 3.0)),
        ts.select(model).at("transformer.h.0").insert_after(L.Patch(0, [1], index=ts.idx[-1])),
        ts.select(model)
        .at("transformer.h.0.mlp")
        .insert_after(L.Scale(2.0, index=ts.idx[..., :4])),
        ts.select(model).at("transformer.h.0").insert_after(L.Noise(0.1, seed=3)),
        ts.select(model)
        .at_instances_of("GPT2MLP")
        .where(ts.attr("training") == False)  # noqa: E712
        .insert_after(L.Zero(ts.idx[:, 0])),
        ts.select(model)
        .at("transformer.h.0.mlp")
        .insert_after(
            L.LowRankAdapter(
                torch.randn(4, HIDDEN, generator=g), torch.randn(HIDDEN, 4, generator=g), 0.5
            )
        ),
    ]
    plans = [plan(p) for p in probes]
    plans[0] = plans[0].returning("b1", mean=[1])
    plans[2] = plans[2].returning("logits", topk=3, positions=-1)
    ids = torch.randint(0, 12, (3, 6), generator=g)
    inputs: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = [
        ({"args": [{"tensor": "a0"}], "kwargs": {}, "text": None}, {"a0": ids}),
        (
            {
                "args": [],
                "kwargs": {"input_ids": {"tensor": "k.i"}, "attention_mask": {"tensor": "k.m"}},
                "text": None,
            },
            {"k.i": ids, "k.m": torch.ones(3, 6, dtype=torch.long)},
        ),
        ({"args": [], "kwargs": {}, "text": ["the cat sat", "hello world on a mat"]}, {}),
        (
            {"args": [{"tensor": "a0"}], "kwargs": {"use_cache": {"value": False}}, "text": None},
            {"a0": ids},
        ),
    ]
    out = []
    for i, recorded in enumerate(plans):
        manifest, tensors = recorded.manifest()
        description, input_tensors = inputs[i % len(inputs)]
        out.append((manifest, dict(tensors), {"version": 1, **description}, dict(input_tensors)))
    return out


def plan_file(manifest: Any, tensors: dict[str, torch.Tensor], raw: str | None = None) -> bytes:
    return raw_file(tensors, METADATA_KEY, _text(manifest, raw))


def request_file(
    plan_bytes: bytes, description: Any, tensors: dict[str, torch.Tensor], raw: str | None = None
) -> bytes:
    all_tensors = {"plan": torch.frombuffer(bytearray(plan_bytes), dtype=torch.uint8), **tensors}
    return raw_file(all_tensors, REQUEST_KEY, _text(description, raw))


def _text(value: Any, raw: str | None) -> str:
    text = json.dumps(value)
    return text.replace(json.dumps(RAW), raw, 1) if raw is not None else text


# --------------------------------------------------------------------------- mutations


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON value (the root excluded)."""
    if not isinstance(value, (dict, list)):
        return []
    places = []
    for key, child in value.items() if isinstance(value, dict) else enumerate(value):
        places.append((*path, key))
        places.extend(_places(child, (*path, key)))
    return places


def _mutate_json(rng: random.Random, value: Any) -> tuple[Any, str | None]:
    """A copy of ``value`` with one field changed, and the raw text its placeholder takes."""
    value = copy.deepcopy(value)
    places = _places(value)
    if not places:
        return value, None
    *parents, last = rng.choice(places)
    node = value
    for key in parents:
        node = node[key]
    action = rng.random()
    if action < 0.1 and isinstance(node, dict):
        del node[last]
        return value, None
    if action < 0.2 and isinstance(node, dict):
        node[rng.choice(["run", "code", "__proto__", "extra", str(last) + "_"])] = 1
        return value, None
    if action < 0.3:
        node[last] = rng.choice([True, None, [], {}, "", 0, -1, 1.5, [1, 2], {"a": 1}])
        return value, None
    node[last] = RAW
    return value, rng.choice(WEIRD)


def _lying_header(rng: random.Random, body: bytes) -> bytes:
    """``body`` (a safetensors file) with one tensor entry of its header lying."""
    (size,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + size])
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return body[:8] + b"{" + body[9:]
    entry = header[rng.choice(names)]
    lie = rng.randrange(7)
    if lie == 0:
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 8]
    elif lie == 1:
        entry["data_offsets"] = [0, 1 << 62]
    elif lie == 2:
        entry["shape"] = [1 << 40, 1 << 40]
    elif lie == 3:
        entry["shape"] = [-1]
    elif lie == 4:
        entry["dtype"] = rng.choice(["F8_E4M3", "I64", "F64", "U8", "C64", "object"])
    elif lie == 5:
        entry["data_offsets"] = list(reversed(entry["data_offsets"]))
    else:
        header[rng.choice(names)] = dict(entry)  # two tensors on the same bytes
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body[8 + size :]


def mutated(rng: random.Random, seed: tuple[Any, ...]) -> tuple[str, bytes]:
    """``(kind of mutation, request body)``."""
    manifest, plan_tensors, description, input_tensors = seed
    kind = rng.choices(
        [
            "valid",
            "bytes",
            "truncate",
            "length",
            "header",
            "plan-header",
            "description",
            "manifest",
            "values",
        ],
        weights=[3, 14, 6, 5, 8, 6, 20, 30, 8],
    )[0]
    plan_bytes = plan_file(manifest, plan_tensors)
    body = request_file(plan_bytes, description, input_tensors)
    if kind == "bytes":
        data = bytearray(body)
        (size,) = struct.unpack("<Q", body[:8])
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(8 + size) if rng.random() < 0.6 else rng.randrange(len(data))
            data[at] = rng.randrange(256)
        body = bytes(data)
    elif kind == "truncate":
        body = body[: rng.randrange(len(body))]
    elif kind == "length":
        (size,) = struct.unpack("<Q", body[:8])
        lie = rng.choice(
            [0, 1, size - 1, size + 1, size * 2, len(body), 1 << 63, rng.getrandbits(64)]
        )
        body = struct.pack("<Q", lie % (1 << 64)) + body[8:]
    elif kind == "header":
        body = _lying_header(rng, body)
    elif kind == "plan-header":
        body = request_file(_lying_header(rng, plan_bytes), description, input_tensors)
    elif kind == "description":
        changed, raw = _mutate_json(rng, description)
        body = request_file(plan_bytes, changed, input_tensors, raw)
    elif kind == "manifest":
        changed, raw = _mutate_json(rng, manifest)
        body = request_file(plan_file(changed, plan_tensors, raw), description, input_tensors)
    elif kind == "values":
        tensors = {k: v.clone() for k, v in input_tensors.items()}
        plans = dict(plan_tensors)
        if tensors and rng.random() < 0.6:
            name = rng.choice(sorted(tensors))
            tensors[name] = rng.choice(
                [
                    torch.full_like(tensors[name], rng.choice([-1, 96, 1 << 40])),
                    tensors[name].float(),
                    tensors[name].to(torch.int8),
                    tensors[name][:, :0],
                    tensors[name].reshape(-1),
                    torch.zeros(1, 40, dtype=torch.long),
                ]
            )
        elif plans:
            name = rng.choice(sorted(plans))
            if plans[name].is_floating_point():
                plans[name] = torch.full_like(plans[name], rng.choice([float("nan"), 1e38]))
        body = request_file(plan_file(manifest, plans), description, tensors)
    return kind, body


# --------------------------------------------------------------------------- the raw socket


def framing_lie(rng: random.Random, port: int, body: bytes) -> tuple[str, float]:
    """Send ``body`` with a lying or junk ``Content-Length``; the status line's code."""
    lie = rng.randrange(6)
    headers = [b"POST /v1/models/gpt2/jobs HTTP/1.1", b"Host: 127.0.0.1"]
    payload = body
    if lie == 0:
        headers.append(b"Content-Length: %d" % (len(body) + rng.randint(1, 5000)))
    elif lie == 1:
        headers.append(b"Content-Length: %d" % max(0, len(body) - rng.randint(1, 500)))
    elif lie == 2:
        headers.append(rng.choice([b"Content-Length: -5", b"Content-Length: abc"]))
    elif lie == 3:
        headers.append(b"Content-Length: 99999999999999999999999")
    elif lie == 4:
        headers += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    else:
        headers.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n" % (len(body) + 100) + body + b"\r\n"  # the chunk is short
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
        try:
            connection.sendall(b"\r\n".join(headers) + b"\r\n\r\n" + payload)
            connection.shutdown(socket.SHUT_WR)
            reply = connection.recv(64)
        except (TimeoutError, ConnectionError):
            reply = b""
        except OSError as error:  # the host closed first, before our shutdown (ENOTCONN)
            if error.errno != errno.ENOTCONN:
                raise
            reply = b""
    elapsed = time.perf_counter() - start
    if not reply:
        return "closed", elapsed
    return reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "junk", elapsed


# --------------------------------------------------------------------------- the test


def test_ten_thousand_mutated_requests(served: tuple[str, Any]) -> None:
    url, app = served
    host = app.state.host
    base = host.models["gpt2"].base
    digest = full_digest(base)
    rng = random.Random(SEED)
    corpus = seeds()
    port = int(url.rsplit(":", 1)[1])
    statuses: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    slowest = (0.0, "")
    server_errors: list[str] = []
    accepted: list[str] = []

    def record(kind: str, status: str, elapsed: float, detail: Callable[[], str]) -> None:
        nonlocal slowest
        statuses[status] += 1
        by_kind.setdefault(kind, Counter())[status] += 1
        if elapsed > slowest[0]:
            slowest = (elapsed, kind)
        if status.isdigit() and int(status) >= 500:
            server_errors.append(f"{kind}: {status} {detail()[:300]}")

    with httpx.Client(base_url=url, timeout=10.0) as client:
        for manifest, plan_tensors, description, inputs in corpus * 3:  # warm up: first runs
            body = request_file(plan_file(manifest, plan_tensors), description, inputs)
            assert client.post("/v1/models/gpt2/jobs", content=body).status_code == 202
        gc.collect()
        before = rss()
        start = time.monotonic()
        for i in range(REQUESTS):
            seed = corpus[i % len(corpus)]
            if rng.random() < 0.02:
                status, elapsed = framing_lie(rng, port, mutated(rng, seed)[1])
                record("framing", status, elapsed, lambda: "")
                continue
            if rng.random() < 0.02:
                params = rng.choice(
                    [{"since": "1" * 30, "wait": "1"}, {"wait": "1e400"}, {"wait": "nan"}, {}]
                )
                t0 = time.perf_counter()
                try:
                    response = client.get(f"/v1/jobs/{rng.getrandbits(64):x}", params=params)
                    status = str(response.status_code)
                except httpx.TransportError as error:
                    status = type(error).__name__
                record("status", status, time.perf_counter() - t0, lambda: "")
                continue
            kind, body = mutated(rng, seed)
            t0 = time.perf_counter()
            try:
                response = client.post("/v1/models/gpt2/jobs", content=body)
            except httpx.TransportError as error:  # the host hung up without answering
                record(kind, type(error).__name__, time.perf_counter() - t0, lambda: "")
                continue
            elapsed = time.perf_counter() - t0
            record(kind, str(response.status_code), elapsed, lambda r=response: r.text)
            if response.status_code == 202:
                accepted.append(response.json()["id"])
        total = time.monotonic() - start
        finished = Counter()  # every accepted job ends, and how
        for job_id in accepted:
            state = client.get(f"/v1/jobs/{job_id}", params={"since": 0, "wait": 5}).json()
            while state["state"] in ("queued", "running"):
                version = state["version"]
                state = client.get(f"/v1/jobs/{job_id}", params={"since": version, "wait": 5})
                state = state.json()
            code = state.get("error", {}).get("code", "done")
            finished[code] += 1
            if code == "internal":
                server_errors.append(f"job {job_id}: {state['error']}")
    gc.collect()
    after = rss()
    print(f"\n{REQUESTS} requests in {total:.1f} s; by status: {dict(sorted(statuses.items()))}")
    print(f"slowest answer: {slowest[0] * 1000:.0f} ms ({slowest[1]})")
    print(f"RSS before {before >> 20} MB, after {after >> 20} MB; jobs ended: {dict(finished)}")
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:>12}: {dict(sorted(counts.items()))}")
    assert not server_errors, server_errors[:5]
    hung_up = sum(n for status, n in statuses.items() if status.endswith("Error"))
    assert hung_up <= REQUESTS // 1000, f"{hung_up} requests got no answer at all"
    assert slowest[0] < 2.0, slowest
    assert after - before < 200 << 20, (before >> 20, after >> 20)
    assert full_digest(base) == digest
    assert statuses["202"] > 100, "too few requests survived to be run: the corpus is broken"


def test_the_fuzzer_is_deterministic() -> None:
    corpus = seeds()

    def bodies() -> list[bytes]:
        rng = random.Random(7)
        return [mutated(rng, corpus[i % len(corpus)])[1] for i in range(60)]

    assert bodies() == bodies()
