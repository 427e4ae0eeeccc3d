"""A host many researchers share: hostile input gets a prompt 4xx, and costs are known first.

Each test here is a regression test of one way a request could hurt a shared host: a
header that made the JSON reader quadratic, numbers Python's parser chokes on, predicates
that read any attribute, inputs the model would reject (or silently ignore) only once a
job ran, requests that allocate gigabytes before failing, runs that outlive their time
limit, and text padded so that "the last position" is a pad token. The host serves a small
random GPT-2 with a word-level tokenizer on a loopback port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from host_cases import WORDS, PeakRss, describe, raw_plan, raw_request, save_tokenizer
from plan_cases import HIDDEN, VOCAB, make_gpt2, token_ids
from torch import nn
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon.layers.graph import deadline as graph_deadline
from torchsurgeon.plans import plan
from torchsurgeon.plans.errors import PlanFormatError, PlanLimitError
from torchsurgeon.plans.identity import identity_of
from torchsurgeon.plans.schema import PlanLimits
from torchsurgeon.plans.wire import json_depth
from torchsurgeon.remote import ApiError, Client, Limits, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.deadline import JobTimeout
from torchsurgeon.remote.estimates import estimate
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.transfer import Inputs, encode_request
from torchsurgeon.selectors.predicates import predicate_from_json
from torchsurgeon.surgery.paths import iter_nodes


def host_limits() -> Limits:
    return Limits(
        max_request_bytes=8 << 20,
        max_plan_bytes=6 << 20,
        max_tensor_bytes=2 << 20,
        max_result_bytes=4 << 20,
        max_activation_bytes=256 << 20,
        max_run_seconds=5.0,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hardening") / "gpt2"
    make_gpt2().save_pretrained(directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def local(checkpoint: Path) -> nn.Module:
    return ts.wrap(AutoModelForCausalLM.from_pretrained(checkpoint).eval())


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    with serve_in_thread(create_app({"gpt2": checkpoint}, limits=host_limits())) as server:
        yield server.url


def post(url: str, body: bytes, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/gpt2/jobs", content=body, timeout=timeout)


def scaled(model: nn.Module) -> ts.plans.Plan:
    return plan(ts.select(model).at("transformer.h.0").insert_after(ts.layers.Scale(2.0)))


def noisy(model: nn.Module) -> ts.plans.Plan:
    return plan(ts.select(model).at("transformer.h.0").insert_after(ts.layers.Noise(0.1)))


def assert_refused(response: httpx.Response, status: int, code: str, words: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert words in f"{error['field']}: {error['message']}", error


def wait_for(url: str, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if status["state"] in ("done", "error"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {status}")


# --------------------------------------------------------------------------- 1: linear reading


ADVERSARIAL = {
    "escaped quotes": lambda n: b'{"a":"' + b'\\"' * (n // 2),
    "backslashes": lambda n: b'{"a":"' + b"\\" * n,
    "brackets": lambda n: b"[" * n,
    "strings": lambda n: b"[" + b'"a",' * (n // 4),
    "mixed": lambda n: b'["\\\\\\"[' * (n // 8),
}


def _seconds(text: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        json_depth(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("pattern", sorted(ADVERSARIAL))
def test_measuring_the_nesting_of_json_is_linear(pattern: str) -> None:
    make = ADVERSARIAL[pattern]
    small = _seconds(make(64 << 10))
    assert small < 1.0, f"64 KB of {pattern}: {small:.2f} s"
    large = _seconds(make(1 << 20))
    huge = _seconds(make(4 << 20))
    assert huge < 1.0, f"a 4 MiB header of {pattern} took {huge:.2f} s"
    # 16x the bytes: ~16x the time for a linear scan, 256x for a quadratic one (the small
    # time is floored at 5 ms: below that, fixed costs and caches decide, not the algorithm).
    assert large < 64 * max(small, 5e-3), (pattern, small, large)
    print(f"{pattern}: 64 KB {small * 1e3:.2f} ms, 1 MB {large * 1e3:.1f}, 4 MiB {huge * 1e3:.0f}")


def test_the_depth_scanner_agrees_with_the_parser() -> None:
    texts = [
        b'["a\\"[[[[", [[1]], {"k\\\\": [[]]}]',
        b'[[[["\\\\\\"]]]]"]]]]',
        b'{"a": "]]]]", "b": [[[["\\u005b"]]]]}',
        json.dumps({"x": [[['"[{']]], "y": "\\"}).encode(),
    ]

    def depth(value: Any) -> int:
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        return 0

    for text in texts:
        assert json_depth(text) == depth(json.loads(text)), text


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_an_adversarial_header_does_not_stall_the_host(url: str) -> None:
    header = b'{"a":"' + b'\\"' * (32 << 10)
    body = len(header).to_bytes(8, "little") + header
    answered: list[float] = []

    def health() -> None:
        start = time.perf_counter()
        httpx.get(f"{url}/v1/health", timeout=60)
        answered.append(time.perf_counter() - start)

    start = time.perf_counter()
    checker = threading.Thread(target=lambda: (time.sleep(0.05), health()))
    checker.start()
    response = post(url, body, timeout=60)
    elapsed = time.perf_counter() - start
    checker.join(60)
    assert 400 <= response.status_code < 500, response.text
    assert elapsed < 2.0, f"a 64 KB request took {elapsed:.1f} s to refuse"
    assert answered and answered[0] < 2.0, answered


# --------------------------------------------------------------------------- 8: strict numbers


def test_the_json_reader_takes_numbers_strictly() -> None:
    from torchsurgeon.plans.wire import parse_json  # the one reader of JSON from the wire

    limits = PlanLimits()
    assert parse_json(b"[9223372036854775807, -9223372036854775808, 1.5e300]", "x", limits) == [
        (1 << 63) - 1,
        -(1 << 63),
        1.5e300,
    ]
    refused = {
        b"[" + b"9" * 5000 + b"]": "5000 digits",
        b"[9223372036854775808]": "64-bit range",
        b"[1e400]": "not a finite",
        b"[-1e400]": "not a finite",
        b"[NaN]": "NaN",
        b'{"a": 1, "a": 2}': "repeats the key 'a'",
        b'["\\ud800"]': "surrogate",
        b"[\xff]": "not UTF-8",
    }
    for text, words in refused.items():
        with pytest.raises(PlanFormatError, match=words):
            parse_json(text, "x", limits)
    with pytest.raises(PlanLimitError, match="items"):
        parse_json(b"[" + b"1," * 100 + b"1]", "x", PlanLimits(max_json_items=50))


@pytest.mark.parametrize(
    ("case", "status", "code", "words"),
    [
        ("huge int in the request", 400, "bad_request", "5000 digits"),
        ("huge int in the plan", 422, "invalid_plan", "5000 digits"),
        ("10**400 as a number", 422, "invalid_plan", "401 digits"),
        ("1e400 in the request", 400, "bad_request", "1e400"),
        ("1e400 in the plan", 422, "invalid_plan", "1e400"),
        ("version true", 400, "bad_request", "version"),
        ("schema_version true", 422, "invalid_plan", "schema_version"),
        ("on true", 422, "invalid_plan", "on must be"),
    ],
)
@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_odd_numbers_are_4xx_not_500(
    url: str, local: nn.Module, case: str, status: int, code: str, words: str
) -> None:
    ids = {"a0": token_ids()}
    if case == "huge int in the request":
        body = raw_request(
            scaled(local).to_bytes(),
            describe(kwargs='{"use_cache": {"value": ' + "9" * 5000 + "}}"),
            ids,
        )
    elif case == "huge int in the plan":
        edited = raw_plan(noisy(local), lambda t: t.replace('"seed": 0', '"seed": ' + "9" * 5000))
        body = raw_request(edited, describe(), ids)
    elif case == "10**400 as a number":
        edited = raw_plan(noisy(local), lambda t: t.replace('"std": 0.1', '"std": 1' + "0" * 400))
        body = raw_request(edited, describe(), ids)
    elif case == "1e400 in the request":
        body = raw_request(
            scaled(local).to_bytes(), describe(kwargs='{"use_cache": {"value": 1e400}}'), ids
        )
    elif case == "1e400 in the plan":
        edited = raw_plan(noisy(local), lambda t: t.replace('"std": 0.1', '"std": 1e400'))
        body = raw_request(edited, describe(), ids)
    elif case == "version true":
        body = raw_request(scaled(local).to_bytes(), describe(version="true"), ids)
    elif case == "schema_version true":
        edit = lambda t: t.replace('"schema_version": 1', '"schema_version": true')  # noqa: E731
        body = raw_request(raw_plan(scaled(local), edit), describe(), ids)
    else:
        edited = raw_plan(noisy(local), lambda t: t.replace('"on": null', '"on": true'))
        body = raw_request(edited, describe(), ids)
    assert_refused(post(url, body), status, code, words)


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_what_the_fuzzer_found_is_a_4xx(url: str, local: nn.Module) -> None:
    ids = {"a0": token_ids()}
    # An argument naming its tensor with a non-string (unhashable) value.
    for ref in ('{"a": 1}', "[1]"):
        args = '[{"tensor": ' + ref + "}]"
        body = raw_request(scaled(local).to_bytes(), describe(args=args), ids)
        assert_refused(post(url, body), 400, "bad_request", "malformed input entry")
    # A reduction whose slice step is 0 (the schema let `0 or 1` through).
    recorded = plan(local).returning("logits", positions=slice(0, 2))
    edited = raw_plan(
        recorded, lambda t: t.replace('"positions": [0, 2, null]', '"positions": [0, 2, 0]')
    )
    response = post(url, raw_request(edited, describe(), ids))
    assert_refused(response, 422, "invalid_plan", "returning.reductions.logits")


# --------------------------------------------------------------------------- 9: attr() is data


def test_attr_names_that_are_not_plain_attributes_are_refused_when_built() -> None:
    for name in ("__class__", "_modules", "_parameters", "a.b", "", "x" * 100):
        with pytest.raises(ValueError, match="attr"):
            ts.attr(name)
    step = {"op": "==", "field": {"kind": "attr", "name": "__dict__"}, "value": 1}
    with pytest.raises(ValueError, match="public attribute name"):
        predicate_from_json(step)


def test_attr_reads_only_plain_values_of_the_instance(local: nn.Module) -> None:
    linears = ts.select(local).at_instances_of("Linear")
    mlp = ts.select(local).at("transformer.h.0.mlp.c_fc")
    assert mlp.where(ts.attr("nf") == 4 * HIDDEN).count() == 1  # an int in __dict__
    assert mlp.where(ts.attr("weight") == 0).count() == 0  # a Parameter: never compared
    assert linears.where(ts.attr("training") == False).count() == linears.count()  # noqa: E712
    root = ts.select(local).where(ts.path == "")
    assert root.where(ts.attr("name_or_path").matches("*")).count() == 0  # a property
    assert root.where(ts.attr("config").matches("*")).count() == 0  # an object
    blocks = ts.select(local).at("transformer.h.*")
    assert blocks.where(ts.layer_index == True).paths == ()  # noqa: E712  (not 1)
    assert blocks.where(ts.layer_index == 1).paths == ("transformer.h.1",)


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_a_predicate_on_a_tensor_attribute_is_a_4xx(url: str, local: nn.Module) -> None:
    probe = (
        ts.select(local)
        .at("transformer.h.*.mlp.c_fc")
        .where(ts.attr("nf") == 4 * HIDDEN)
        .insert_after(ts.layers.Save())
    )
    for name in ("weight", "__class__", "name_or_path"):
        edited = raw_plan(plan(probe), lambda t, name=name: t.replace('"nf"', f'"{name}"'))
        response = post(url, raw_request(edited, describe(), {"a0": token_ids()}))
        assert response.status_code == 422, (name, response.text)


# --------------------------------------------------------------------------- 8: inputs' schema


@pytest.mark.parametrize(
    ("case", "args", "kwargs", "tensors", "words"),
    [
        ("an int for input_ids", "[]", '{"input_ids": {"value": 5}}', {}, "input_ids must be"),
        (
            "a cache tensor",
            '[{"tensor": "a0"}]',
            '{"cache": {"tensor": "k.cache"}}',
            {"k.cache": torch.zeros(3)},
            "'cache'",
        ),
        ("an ignored keyword", '[{"tensor": "a0"}]', '{"labelz": {"value": 1}}', {}, "'labelz'"),
        ("null for a tensor", '[{"tensor": "a0"}]', '{"inputs_embeds": {"value": null}}', {}, ""),
        ("a float flag", '[{"tensor": "a0"}]', '{"use_cache": {"value": 1.5}}', {}, "use_cache"),
        (
            "a second positional",
            '[{"tensor": "a0"}, {"tensor": "a1"}]',
            "{}",
            {"a1": "ids"},
            "cache",
        ),
        ("float ids", '[{"tensor": "a1"}]', "{}", {"a1": torch.ones(3, 7)}, "dtype"),
        ("3-d ids", '[{"tensor": "a1"}]', "{}", {"a1": torch.ones(3, 7, 1).long()}, "dimensions"),
        (
            "ids past the vocabulary",
            '[{"tensor": "a1"}]',
            "{}",
            {"a1": "past the vocabulary"},
            "vocab",
        ),
        ("negative ids", '[{"tensor": "a1"}]', "{}", {"a1": -torch.ones(3, 7).long()}, "holds -1"),
        ("too long", '[{"tensor": "a1"}]', "{}", {"a1": torch.ones(1, 33).long()}, "positions"),
        (
            "a mask of another shape",
            '[{"tensor": "a0"}]',
            '{"attention_mask": {"tensor": "k.m"}}',
            {"k.m": torch.ones(3, 6).long()},
            "expected [3, 7]",
        ),
        (
            "a mask of 2s",
            '[{"tensor": "a0"}]',
            '{"attention_mask": {"tensor": "k.m"}}',
            {"k.m": 2 * torch.ones(3, 7).long()},
            "0 and 1",
        ),
        (
            "positions past the model's",
            '[{"tensor": "a0"}]',
            '{"position_ids": {"tensor": "k.p"}}',
            {"k.p": 40 + torch.zeros(3, 7).long()},
            "max_position_embeddings",
        ),
        (
            "nan embeddings",
            "[]",
            '{"inputs_embeds": {"tensor": "k.e"}}',
            {"k.e": torch.full((1, 2, HIDDEN), float("nan"))},
            "NaN",
        ),
    ],
)
@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_inputs_the_model_does_not_take_are_refused_before_queueing(
    url: str, local: nn.Module, case: str, args: str, kwargs: str, tensors: dict, words: str
) -> None:
    made = {"ids": token_ids(), "past the vocabulary": torch.full((3, 7), VOCAB)}
    tensors = {k: made[v] if isinstance(v, str) else v for k, v in tensors.items()}
    if '"a0"' in args:
        tensors["a0"] = token_ids()
    body = raw_request(scaled(local).to_bytes(), describe(args, kwargs), tensors)
    assert_refused(post(url, body), 422, "bad_input", words)


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_a_layer_aimed_at_a_missing_or_none_input_is_a_4xx(url: str, local: nn.Module) -> None:
    # GPT2LMHeadModel calls its GPT2Model with inputs_embeds=None: the layer gets None.
    for on, words in (("inputs_embeds", ""), ("past", "on='past'")):
        probe = ts.select(local).at("transformer").insert_before(ts.layers.Scale(2.0, on=on))
        body = encode_request(plan(probe).to_bytes(), [token_ids()], {})
        assert_refused(post(url, body), 422, "run_failed", words)


# --------------------------------------------------------------------------- 4: costs up front


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_a_broadcast_that_blows_up_is_refused_before_a_byte_is_allocated(
    url: str, local: nn.Module
) -> None:
    steer = ts.layers.Add(torch.ones(100_000, 1, 1, 1))
    probe = ts.select(local).at("lm_head").insert_after(steer)  # logits x 100,000: 806 MB
    for recorded in (plan(probe), plan(probe).returning("logits", topk=1)):
        body = encode_request(recorded.to_bytes(), [token_ids()], {})
        assert len(body) < 500_000
        with PeakRss() as rss:
            response = post(url, body)
            if response.status_code == 202:  # the old host: it ran, and paid
                wait_for(url, response.json()["id"])
        assert 400 <= response.status_code < 500, response.text
        assert rss.growth < 100 << 20, f"RSS grew by {rss.growth >> 20} MB"
        print(f"refused: {response.json()['error']['code']}, peak RSS growth {rss.growth >> 20} MB")
        error = response.json()["error"]
        assert error["code"] in ("limit_exceeded", "result_too_large"), error
    assert error["field"] == "max_activation_bytes" and "100000, 3, 7, 96" in error["message"]


def test_the_estimate_counts_operations_live_bytes_and_the_result(local: nn.Module) -> None:
    hosted = HostedModel.load("gpt2", local)
    recorded = plan(ts.select(local).at("transformer.h.1").insert_after(ts.layers.Save("h1")))
    inputs = Inputs((token_ids(),), {})
    hosted.prepare(recorded, host_limits(), inputs)  # fits
    with pytest.raises(ApiError, match="max_tensor_ops") as few_ops:
        hosted.prepare(recorded, Limits(max_tensor_ops=50), inputs)
    with pytest.raises(ApiError, match="max_activation_bytes") as little_memory:
        hosted.prepare(recorded, Limits(max_activation_bytes=4096), inputs)
    with pytest.raises(ApiError, match="max_result_bytes=10000") as small_results:
        hosted.prepare(recorded, Limits(max_result_bytes=10_000), inputs)  # logits: 8 KB
    assert few_ops.value.status == little_memory.value.status == small_results.value.status == 422
    hosted.prepare(recorded.returning("h1"), Limits(max_result_bytes=10_000), inputs)


class _Unpadded(nn.Module):
    """Reads its mask's values to decide shapes: keeps only the unmasked positions."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[0].nonzero()[:, 0]
        return ids.float()[:, keep] * float(mask.sum())


def test_the_estimate_follows_the_values_a_model_reads() -> None:
    model = ts.wrap(_Unpadded())
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    cost = estimate(model, (ids, mask), {}, ts.plans.Plan(identity_of(model)).outputs, Limits())
    assert cost.result_bytes == model(ids, mask).numel() * 4 == 2 * 3 * 4
    assert cost.consulted == {"args.1"}  # the mask's values mattered, the ids' did not


def test_estimates_are_remembered_by_what_they_depend_on(local: nn.Module) -> None:
    hosted = HostedModel.load("gpt2", local)
    recorded = plan(ts.select(local).at("transformer.h.1").insert_after(ts.layers.Save("h1")))
    calls: list[int] = []

    def view() -> nn.Module:
        calls.append(1)
        return hosted._apply(recorded, hosted.structure_only, "exact")

    limits = host_limits()
    mask = torch.ones(3, 7, dtype=torch.long)
    first = hosted.estimates.check(
        recorded, (token_ids(0),), {"attention_mask": mask}, limits, view
    )
    assert "attention_mask" in first.consulted and "args.0" not in first.consulted
    hosted.estimates.check(recorded, (token_ids(1),), {"attention_mask": mask}, limits, view)
    assert len(calls) == 1  # other token ids, same shapes, same mask: known
    padded = mask.clone()
    padded[0, :3] = 0
    hosted.estimates.check(recorded, (token_ids(1),), {"attention_mask": padded}, limits, view)
    assert len(calls) == 2  # the mask's values were read: estimated again
    hosted.estimates.check(recorded, (token_ids(batch=4),), {}, limits, view)
    assert len(calls) == 3  # another shape


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_a_run_that_would_fail_fails_when_submitted(url: str, local: nn.Module) -> None:
    bad_index = (
        ts.select(local)
        .at("transformer.h.0")
        .insert_after(ts.layers.SetValues(ts.idx[:, :, [99]], 1.0))
    )
    body = encode_request(plan(bad_index).to_bytes(), [token_ids()], {})
    assert_refused(post(url, body), 422, "run_failed", "out of range")
    unknown = plan(ts.select(local).at("transformer.h.0").insert_after(ts.layers.Save("b0")))
    body = encode_request(unknown.returning("b9").to_bytes(), [token_ids()], {})
    assert_refused(post(url, body), 422, "bad_returning", "'b9'")


# --------------------------------------------------------------------------- 5: run-time limit


class _Sleep(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            time.sleep(0.3)
        return x * 1.0


class _Slow(nn.Module):
    """Three sleeping submodules called in turn: no ModuleList, no Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _Sleep(), _Sleep(), _Sleep()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Slow()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_the_run_time_limit_is_checked_before_every_module_call() -> None:
    model = _Outer().eval()
    app = create_app({"slow": model}, limits=Limits(max_run_seconds=0.4))
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        start = time.monotonic()
        with pytest.raises(RemoteError, match=r"timeout.*max_run_seconds=0.4"):
            client.run(plan(ts.wrap(model)), torch.ones(2, 3), timeout=30)
        assert time.monotonic() - start < 5


def test_the_deadline_guard_sits_on_every_module_of_the_hosted_base(local: nn.Module) -> None:
    hosted = HostedModel.load("gpt2", local)
    unguarded = [path for path, node in iter_nodes(hosted.base) if not node._forward_pre_hooks]
    assert unguarded == []
    probe = ts.select(hosted.base).at("transformer.h.1.mlp").insert_after(ts.layers.Scale(2.0))
    view, _ = hosted.prepare(plan(probe), Limits())
    layers = {path for path, node in iter_nodes(view) if ".ts_" in path}
    unguarded = [p for p, n in iter_nodes(view) if not n._forward_pre_hooks and p not in layers]
    assert unguarded == [] and layers  # every module of a request's view shares the check
    assert all(not node._forward_pre_hooks for _, node in iter_nodes(ts.wrap(local)))
    with graph_deadline(time.monotonic() - 1), pytest.raises(JobTimeout):
        view(token_ids())  # past its deadline: the first module call stops the run
    view(token_ids())  # no deadline outside a job


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_a_patch_with_millions_of_rows_is_refused_at_once(url: str, local: nn.Module) -> None:
    probe = ts.select(local).at("lm_head").insert_after(ts.layers.Patch(0, [1]))
    rows = ",".join(["1"] * 1_900_000)
    manifest = raw_plan(
        plan(probe),
        lambda t: t.replace('"source_rows": [0]', '"source_rows": 0').replace(
            '"target_rows": [1]', f'"target_rows": [{rows}]'
        ),
    )
    start = time.monotonic()
    response = post(url, raw_request(manifest, describe(), {"a0": token_ids()}))
    assert 400 <= response.status_code < 500, response.text
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------- correct by default


def _last_logits(model: nn.Module, words: str, edit: nn.Module | None = None) -> torch.Tensor:
    """The logits at the last token of ``words`` run alone, unpadded, on ``model``."""
    ids = torch.tensor([[WORDS.index(w) + 2 for w in words.split()]])
    if edit is not None:
        model = ts.select(model).at("transformer.h.0").insert_after(edit)
    with torch.no_grad():
        return model(ids).logits[0, -1]


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_texts_are_left_padded_with_matching_positions(url: str, local: nn.Module) -> None:
    texts = ["the cat sat on the mat", "hello world", "a dog sat"]
    with Client(url, progress=False) as client:
        got = client.run(plan(local), texts).output.logits
        edit = ts.layers.SetValues(ts.idx[:, -1], 0.0)
        probe = ts.select(local).at("transformer.h.0").insert_after(edit)
        edited = client.run(probe, texts).output.logits
        right = client.run(plan(local), texts, padding_side="right").output.logits
    for i, text in enumerate(texts):
        alone = _last_logits(local, text)
        torch.testing.assert_close(got[i, -1], alone, atol=1e-5, rtol=0)
        # The edit at idx[:, -1] lands on each row's real last token.
        torch.testing.assert_close(
            edited[i, -1], _last_logits(local, text, edit), atol=1e-5, rtol=0
        )
        assert (edited[i, -1] - alone).abs().max() > 1e-3
        # Padded on the right when asked: the last token sits at the text's own length.
        length = len(text.split())
        torch.testing.assert_close(right[i, length - 1], alone, atol=1e-5, rtol=0)


@pytest.mark.slow  # starts, or talks to, a host on a loopback port
def test_padding_side_is_checked(url: str, local: nn.Module) -> None:
    with pytest.raises(TypeError, match="padding_side"):
        encode_request(plan(local).to_bytes(), [token_ids()], {"padding_side": "left"})
    description = '{"version": 1, "args": [], "kwargs": {}, "text": ["a"], "padding_side": "up"}'
    assert_refused(post(url, raw_request(plan(local).to_bytes(), description)), 400, "bad_request")
    extra = '{"version": 1, "args": [], "kwargs": {}, "text": ["a"], "run": "this"}'
    response = post(url, raw_request(plan(local).to_bytes(), extra))
    assert_refused(response, 400, "bad_request", "unknown request field")


def test_the_estimate_follows_inputs_indexed_by_python_lists() -> None:
    """``if pad in input_ids[:, [-1, 0]]`` (transformers' padding check) reads known values."""

    class ListIndexed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            if 0 in input_ids[:, [-1, 0]]:
                return self.emb(input_ids) * 0
            return self.emb(input_ids)

    module = ListIndexed()
    hosted = HostedModel.load("toy", module)
    _, cost = hosted.prepare(
        plan(ts.wrap(module)), Limits(), Inputs(args=(torch.tensor([[1, 2, 3]]),))
    )
    assert cost is not None and cost.consulted == {"args.0"}


def test_estimates_are_shared_by_plans_that_differ_only_in_tensor_values() -> None:
    """Another steering vector costs the same: the cache keys on dtypes and shapes only."""
    module = make_gpt2()
    hosted = HostedModel.load("gpt2", module)
    calls = []

    def vectors(seed: int) -> ts.Plan:
        g = torch.Generator().manual_seed(seed)
        layer = ts.layers.Add(torch.randn(HIDDEN, generator=g))
        return plan(ts.select(hosted.base).at("transformer.h.1").insert_after(layer))

    inputs = Inputs(args=(token_ids(),))
    for seed in (1, 2):
        before = len(hosted.estimates._entries)
        hosted.prepare(vectors(seed), Limits(), inputs)
        calls.append(len(hosted.estimates._entries) - before)
    assert calls == [1, 0]  # the second plan found the first's estimate
    longer = Inputs(args=(token_ids(length=9),))
    before = len(hosted.estimates._entries)
    hosted.prepare(vectors(3), Limits(), longer)
    assert len(hosted.estimates._entries) == before + 1  # another shape: estimated again
