"""The remote host and client: results equal local runs exactly, bad requests get 4xx.

A host serving a GPT-2 (with a tokenizer) and a Llama, both small random checkpoints saved
with ``save_pretrained``, runs in this process on a free loopback port. Every test that
uses ``host`` runs against in-process worker threads, and again (marked slow) against two
Ray actor replicas. Each remote result is compared with its local twin: the same plan
applied to a base loaded from the same checkpoint, run with ``ts.run`` (dtype equal, max
abs diff 0).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from plan_cases import (
    BLOCKS,
    HIDDEN,
    MALFORMED,
    VOCAB,
    full_digest,
    good_plan,
    layer_cases,
    make_gpt2,
    make_llama,
    rewrite_with,
    save_tokenizer,
    token_ids,
)
from requirements import require
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import torchsurgeon as ts
from torchsurgeon.plans import Plan, apply, execute, identity_of, plan
from torchsurgeon.plans.wire import pack
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.serve import add_serve_parser, parse_models, read_api_keys
from torchsurgeon.remote.transfer import REQUEST_KEY, encode_request

KEYS = ("key-alice", "key-bob")
LIMITS = Limits(
    max_request_bytes=8 << 20,
    max_plan_bytes=4 << 20,
    max_tensor_bytes=1 << 20,
    max_steps=64,
    max_saves=16,
    max_result_bytes=4 << 20,
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hosted")
    make_gpt2().save_pretrained(root / "gpt2")
    save_tokenizer(root / "gpt2", extra=("plans",))
    make_llama().save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


def load_local(path: Path) -> nn.Module:
    return ts.wrap(AutoModelForCausalLM.from_pretrained(path).eval())


@pytest.fixture(scope="module")
def local(checkpoints: dict[str, Path]) -> dict[str, nn.Module]:
    """The local twins' bases: loaded from the same checkpoints the host serves."""
    return {name: load_local(path) for name, path in checkpoints.items()}


@dataclass
class Hosting:
    url: str
    app: Any
    mode: str
    digests: dict[str, Any]

    def base_digests(self) -> dict[str, Any]:
        host = self.app.state.host
        if self.mode == "ray":
            return {"replicas": host.executor.fingerprints()}
        return {name: full_digest(m.base) for name, m in host.models.items()}

    def assert_bases_unchanged(self) -> None:
        assert self.base_digests() == self.digests


@pytest.fixture(scope="module", params=["threads", pytest.param("ray", marks=pytest.mark.slow)])
def host(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Iterator[Hosting]:
    if request.param == "ray":
        require("ray", "the Ray variant needs `pip install ray`")
    ray_replicas = 2 if request.param == "ray" else None
    app = create_app(
        checkpoints, api_keys=KEYS, limits=LIMITS, workers=4, ray_replicas=ray_replicas
    )
    with serve_in_thread(app) as server:
        hosting = Hosting(server.url, app, request.param, {})
        hosting.digests = hosting.base_digests()
        yield hosting


@pytest.fixture
def client(host: Hosting) -> Iterator[Client]:
    with Client(host.url, api_key=KEYS[0], progress=False) as connected:
        yield connected


def assert_same_result(got: ts.Result, want: ts.Result) -> None:
    """Every output field and saved tensor equal: dtype, shape, every value."""
    for field in ("logits",):
        a, b = got.output[field], want.output[field]
        if isinstance(b, torch.return_types.topk):
            assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max().item() == 0
    assert got.saved.keys() == want.saved.keys()
    for key, value in want.saved.items():
        assert got.saved[key].dtype == value.dtype, key
        assert torch.equal(got.saved[key], value), key


def post_raw(host: Hosting, model: str, body: bytes, key: str | None = KEYS[0]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{host.url}/v1/models/{model}/jobs", content=body, headers=headers)


# --------------------------------------------------------------------------- discovery


def test_models_list_their_identity(client: Client, local: dict[str, nn.Module]) -> None:
    hosted = {m["name"]: m for m in client.models()}
    assert set(hosted) == {"gpt2", "llama"}
    for name, model in local.items():
        assert hosted[name]["identity"] == identity_of(model).to_json()
    assert hosted["gpt2"]["tokenizer"] and not hosted["llama"]["tokenizer"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_meta_has_the_hosted_structure_and_identity(
    client: Client, local: dict[str, nn.Module], name: str
) -> None:
    structure_only = client.meta(name)
    assert all(t.is_meta for t in structure_only.parameters())
    assert [p for p, _ in structure_only.named_modules()] == [
        p for p, _ in local[name].named_modules()
    ]
    assert identity_of(structure_only) == identity_of(local[name])


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("type_name", sorted(layer_cases()))
def test_every_layer_type_through_the_host_equals_local(
    client: Client, local: dict[str, nn.Module], family: str, type_name: str
) -> None:
    probe = rewrite_with(local[family], family, type_name)
    ids = token_ids(seed=len(type_name))
    assert_same_result(client.run(probe, ids), ts.run(probe, ids))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_mix_of_rewrites_with_reductions_equals_local(
    client: Client, local: dict[str, nn.Module], family: str
) -> None:
    blocks = BLOCKS[family]
    probe = (
        ts.select(local[family])
        .at(f"{blocks}.*")
        .where(ts.layer_index.isin([0, 2]))
        .at("mlp")
        .insert_after(ts.layers.Add(torch.linspace(-1, 1, HIDDEN), 2.0))
    )
    probe = ts.select(probe).at(f"{blocks}.1").insert_after(ts.layers.Patch(0, [1, 2]))
    probe = ts.select(probe).at(f"{blocks}.*").insert_after(ts.layers.Save("b{n}"))
    recorded = plan(probe).returning("logits", topk=4, positions=-1).returning("b1", mean=[1])
    ids = token_ids(seed=5)
    got = client.run(recorded, ids)
    want = recorded.outputs.apply(ts.run(probe, ids))
    assert set(got.saved) == {"b1"} and got.saved["b1"].shape == (3, HIDDEN)
    assert_same_result(got, want)


def test_plan_made_on_meta_runs_on_the_host_and_applies_locally(
    client: Client, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    structure_only = client.meta("llama")
    probe = (
        ts.select(structure_only)
        .at_instances_of("LlamaMLP")
        .where(ts.layer_index >= 1)
        .at("down_proj")
        .insert_before(ts.layers.SetValues(ts.idx[1:, -1, [3, 7]], 5.0))
    )
    probe = ts.select(probe).at("model.layers.*").insert_after(ts.layers.Save("block{n}"))
    path = plan(probe).save(tmp_path / "llama.tsplan")
    ids = token_ids(seed=9)
    remote = client.run(Plan.load(path), ids)
    fresh = load_local(checkpoints["llama"])  # a base loaded again from the checkpoint
    assert_same_result(remote, ts.run(apply(Plan.load(path), fresh), ids))


def test_ts_run_with_the_client_as_backend(client: Client, local: dict[str, nn.Module]) -> None:
    probe = rewrite_with(client.meta("gpt2"), "gpt2", "Add")
    ids = token_ids(seed=3)
    got = ts.run(probe, ids, backend=client)
    assert isinstance(got, ts.Result)
    assert_same_result(got, execute(plan(probe), local["gpt2"], ids))


def test_text_inputs_go_through_the_host_tokenizer(
    client: Client, local: dict[str, nn.Module], checkpoints: dict[str, Path]
) -> None:
    probe = rewrite_with(local["gpt2"], "gpt2", "Save")
    texts = ["the cat sat on the mat", "hello world"]
    got = client.run(probe, texts)
    encoded = AutoTokenizer.from_pretrained(checkpoints["gpt2"])(
        texts, return_tensors="pt", padding=True, padding_side="left"
    )
    mask = encoded["attention_mask"]  # left-padded, with positions counted from each row's start
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = ts.run(
        probe, input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions
    )
    assert_same_result(got, want)


def test_submit_returns_a_job_to_poll(client: Client, local: dict[str, nn.Module]) -> None:
    probe = rewrite_with(local["llama"], "llama", "Noise")
    job = client.submit(probe, token_ids())
    status = job.wait(timeout=60)
    assert status.state == "done" and status.error is None
    assert_same_result(job.result(), ts.run(probe, token_ids()))
    shown = client.run(probe, token_ids(), progress=True)  # a rich status line on stderr
    assert_same_result(shown, ts.run(probe, token_ids()))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("case", "build", "words"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_plans_get_4xx_naming_the_problem(
    host: Hosting, client: Client, local: dict[str, nn.Module], case: str, build, words: str
) -> None:
    body = encode_request(build(good_plan(local["gpt2"])), [token_ids()], {})
    response = post_raw(host, "gpt2", body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in ("invalid_plan", "limit_exceeded")
    assert words in f"{error['field']}: {error['message']}"
    host.assert_bases_unchanged()
    assert client.run(good_plan(local["gpt2"]), token_ids()).saved["h2"].shape == (3, 7, HIDDEN)
    host.assert_bases_unchanged()


def _plan_bytes(model: nn.Module, *layers_at: tuple[str, nn.Module]) -> bytes:
    probe = model
    for where, layer in layers_at:
        probe = ts.select(probe).at(where).insert_after(layer)
    return plan(probe).to_bytes()


@pytest.mark.parametrize(
    ("case", "status", "code", "words"),
    [
        ("unknown-model", 404, "not_found", "no model 'gpt5'"),
        ("pickle-body", 400, "bad_request", "pickle"),
        ("empty-body", 400, "bad_request", "truncated"),
        ("too-large", 413, "too_large", "max_request_bytes"),
        ("no-plan", 400, "bad_request", "no plan"),
        ("plan-too-large", 413, "too_large", "max_plan_bytes=4194304"),
        ("input-too-large", 413, "too_large", "input tensor 'a0'"),
        ("save-grad", 422, "needs_backward", "SaveGrad, which act on the backward pass"),
        ("too-many-saves", 422, "limit_exceeded", "max_saves=16"),
        ("identity-mismatch", 409, "identity_mismatch", "LlamaForCausalLM, this base is a GPT2"),
        ("path-not-in-base", 422, "plan_does_not_fit", "'transformer.h.7'"),
        ("text-without-tokenizer", 422, "no_tokenizer", "'llama' has no tokenizer"),
        ("bad-input", 400, "bad_request", "not used by any argument"),
    ],
)
def test_bad_requests_get_4xx_and_the_host_keeps_serving(
    host: Hosting,
    client: Client,
    local: dict[str, nn.Module],
    case: str,
    status: int,
    code: str,
    words: str,
) -> None:
    import pickle

    import safetensors.torch

    gpt2, llama = local["gpt2"], local["llama"]
    ids = [token_ids()]
    model = "gpt2"
    if case == "unknown-model":
        body, model = encode_request(plan(gpt2).to_bytes(), ids, {}), "gpt5"
    elif case == "pickle-body":
        body = pickle.dumps({"plan": "x"})
    elif case == "empty-body":
        body = b""
    elif case == "too-large":
        body = b"\0" * (LIMITS.max_request_bytes + 1)
    elif case == "no-plan":
        description = '{"version": 1, "args": [{"tensor": "a0"}], "kwargs": {}}'
        body = safetensors.torch.save({"a0": ids[0]}, metadata={REQUEST_KEY: description})
    elif case == "plan-too-large":
        body = encode_request(b"\0" * (LIMITS.max_plan_bytes + 1), ids, {})
    elif case == "input-too-large":
        big = torch.zeros(LIMITS.max_tensor_bytes // 8 + 1, dtype=torch.long)
        body = encode_request(plan(gpt2).to_bytes(), [big], {})
    elif case == "save-grad":
        body = encode_request(_plan_bytes(gpt2, ("transformer.h.0", ts.layers.SaveGrad())), ids, {})
    elif case == "too-many-saves":
        saves = [(f"transformer.h.{i % 3}", ts.layers.Save(f"s{i}")) for i in range(17)]
        body = encode_request(_plan_bytes(gpt2, *saves), ids, {})
    elif case == "identity-mismatch":
        body = encode_request(_plan_bytes(llama, ("model.layers.0", ts.layers.Save())), ids, {})
    elif case == "path-not-in-base":
        recorded = plan(ts.select(gpt2).at("transformer.h.2").insert_after(ts.layers.Save()))
        manifest, tensors = recorded.manifest()
        manifest["steps"][0]["selection"][0]["arg"] = "transformer.h.7"
        body = encode_request(pack(manifest, tensors), ids, {})
    elif case == "text-without-tokenizer":
        body, model = encode_request(plan(llama).to_bytes(), ["hello world"], {}), "llama"
    else:
        plan_tensor = torch.frombuffer(bytearray(plan(gpt2).to_bytes()), dtype=torch.uint8)
        description = {"version": 1, "args": [], "kwargs": {}, "text": None}
        body = pack(description, {"plan": plan_tensor, "a0": ids[0]}, key=REQUEST_KEY)
    response = post_raw(host, model, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"], error
    host.assert_bases_unchanged()
    assert client.run(plan(gpt2), token_ids()).output.logits.shape == (3, 7, VOCAB)


def test_run_time_errors_are_job_errors(client: Client, local: dict[str, nn.Module]) -> None:
    probe = ts.select(local["gpt2"]).at("transformer.h.0").insert_after(ts.layers.Save("b0"))
    with pytest.raises(RemoteError, match=r"bad_returning.*'b9'.*saved \['b0'\]") as error:
        client.run(plan(probe).returning("b9"), token_ids())
    assert error.value.code == "bad_returning"
    oversized = plan(probe).returning("b0")
    with pytest.raises(RemoteError, match=r"result_too_large.*max_result_bytes"):
        client.run(oversized, torch.randint(0, VOCAB, (1100, 32)))
    bad_index = (
        ts.select(local["gpt2"])
        .at("transformer.h.0")
        .insert_after(ts.layers.SetValues(ts.idx[:, :, [99]], 1.0))
    )
    with pytest.raises(RemoteError, match=r"run_failed.*out of range"):
        client.run(bad_index, token_ids())


def test_api_keys_are_required_and_isolate_jobs(host: Hosting, local: dict[str, nn.Module]) -> None:
    body = encode_request(plan(local["gpt2"]).to_bytes(), [token_ids()], {})
    assert post_raw(host, "gpt2", body, key=None).status_code == 401
    assert post_raw(host, "gpt2", body, key="key-mallory").json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{host.url}/v1/models").status_code == 401
    with (
        Client(host.url, KEYS[0], progress=False) as alice,
        Client(host.url, KEYS[1], progress=False) as bob,
    ):
        job = alice.submit(plan(local["gpt2"]), token_ids())
        job.wait(timeout=60)
        stolen = type(job)(bob, job.id, "gpt2")
        for attempt in (stolen.status, stolen.result):
            with pytest.raises(RemoteError) as error:
                attempt()
            assert error.value.status == 404
        with pytest.raises(RemoteError, match="404"):
            bob._json("DELETE", f"/v1/jobs/{job.id}")
        assert job.result().output.logits.shape == (3, 7, VOCAB)


# --------------------------------------------------------------------------- a tight host


@pytest.fixture(scope="module")
def tight(checkpoints: dict[str, Path]) -> Iterator[tuple[str, Any]]:
    limits = Limits(max_queue_per_key=2, max_run_seconds=60.0)
    app = create_app({"gpt2": checkpoints["gpt2"]}, api_keys=KEYS, limits=limits, workers=1)
    with serve_in_thread(app) as server:
        yield server.url, app


def test_queue_positions_and_the_per_key_limit(
    tight: tuple[str, Any], local: dict[str, nn.Module]
) -> None:
    url, app = tight
    host = app.state.host
    release = threading.Event()
    blocker = host.queue.submit(host.owner(KEYS[0]), "gpt2", lambda _: release.wait(30) and b"")
    with Client(url, KEYS[0], progress=False) as alice, Client(url, KEYS[1], progress=False) as bob:
        try:
            mine = alice.submit(plan(local["gpt2"]), token_ids())
            theirs = bob.submit(plan(local["gpt2"]), token_ids())
            assert (mine.status().state, mine.status().position) == ("queued", 0)
            assert (theirs.status().state, theirs.status().position) == ("queued", 1)
            with pytest.raises(RemoteError, match=r"queue_full.*max_queue_per_key=2") as error:
                alice.submit(plan(local["gpt2"]), token_ids())
            assert error.value.status == 429
        finally:
            release.set()
        assert mine.result(timeout=60).output.logits.shape == (3, 7, VOCAB)
        assert theirs.result(timeout=60).output.logits.shape == (3, 7, VOCAB)
    assert blocker.state == "done"


def test_run_time_limit_stops_a_job(
    checkpoints: dict[str, Path], local: dict[str, nn.Module]
) -> None:
    app = create_app({"gpt2": checkpoints["gpt2"]}, limits=Limits(max_run_seconds=0.0))
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        with pytest.raises(RemoteError, match=r"timeout.*max_run_seconds=0") as error:
            client.run(plan(local["gpt2"]), token_ids())
        assert error.value.status == 422  # the job failed; fetching its result says so


# --------------------------------------------------------------------------- load


@pytest.mark.slow
def test_loopback_load_8_clients_25_requests_each(
    host: Hosting, local: dict[str, nn.Module]
) -> None:
    failures: list[str] = []

    def one_client(worker: int) -> None:
        with Client(host.url, KEYS[worker % 2], progress=False) as client:
            for i in range(25):
                family = ("gpt2", "llama")[(worker + i) % 2]
                g = torch.Generator().manual_seed(1000 * worker + i)
                blocks = BLOCKS[family]
                probe = (
                    ts.select(local[family])
                    .at(f"{blocks}.{i % 3}")
                    .insert_after(ts.layers.Add(torch.randn(HIDDEN, generator=g), 0.5))
                )
                probe = ts.select(probe).at(f"{blocks}.*").insert_after(ts.layers.Save("b{n}"))
                ids = torch.randint(0, VOCAB, (2, 8), generator=g)
                try:
                    assert_same_result(client.run(probe, ids), ts.run(probe, ids))
                except Exception as error:  # collected: a thread cannot fail the test itself
                    failures.append(f"client {worker} request {i}: {error!r}")

    start = time.monotonic()
    threads = [threading.Thread(target=one_client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.monotonic() - start
    assert not failures, failures[:3]
    assert elapsed < 120, f"200 requests took {elapsed:.1f} s"
    host.assert_bases_unchanged()
    if host.mode == "ray":
        served = host.app.state.host.executor.served()
        assert len(served) == 2 and min(served) > 0, served


# --------------------------------------------------------------------------- the command


def test_serve_parser_reads_models_and_keys(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="torchsurgeon")
    add_serve_parser(parser.add_subparsers(dest="command"))
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nkey-alice\n\nkey-bob  # bob\n")
    args = parser.parse_args(
        [
            "serve",
            "--model",
            f"gpt2={checkpoints['gpt2']}",
            "--api-keys",
            str(keys),
            "--ray",
            "--replicas",
            "2",
            "--port",
            "9001",
        ]
    )
    assert args.port == 9001 and args.ray and args.replicas == 2 and callable(args.handler)
    assert parse_models(args.model) == {"gpt2": checkpoints["gpt2"]}
    assert read_api_keys(keys) == ["key-alice", "key-bob"]
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_models(["gpt2"])
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        parse_models([f"x={tmp_path}"])


@pytest.mark.slow
def test_serve_command_runs_a_host(
    checkpoints: dict[str, Path], local: dict[str, nn.Module], tmp_path: Path
) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    keys = tmp_path / "keys.txt"
    keys.write_text("key-alice\n")
    command = [
        sys.executable,
        "-m",
        "torchsurgeon.remote.serve",
        "--model",
        f"gpt2={checkpoints['gpt2']}",
        "--port",
        str(port),
        "--api-keys",
        str(keys),
    ]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, "the serve command exited"
            assert time.monotonic() < deadline, "the serve command did not start"
            time.sleep(0.2)
        probe = rewrite_with(local["gpt2"], "gpt2", "Scale")
        with Client(url, "key-alice", progress=False) as client:
            assert_same_result(client.run(probe, token_ids()), ts.run(probe, token_ids()))
    finally:
        server.terminate()
        server.wait(30)
