"""NNsight tutorial experiments written twice: nnsight and torchsurgeon give the same numbers.

Each experiment (``parity/experiments/eNN_*.py``) is a pair of functions, one per library,
that return a dict of tensors. On seeded random GPT-2 and Llama models (eager attention,
fp32, nothing downloaded) every pair must agree to ``TOLERANCE`` (max abs diff), and the
torchsurgeon version, run again against a loopback host serving the same checkpoint, must
send exactly one request (one plan, one session, one generation or one training loop) and
get the local result back.

nnsight and torchsurgeon each get their own copy of the model (same seed, same weights), so
whatever nnsight does to the modules it wraps cannot reach the model torchsurgeon rewrites.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hook_reference import make_gpt2, make_llama
from requirements import require
from torch import nn

import torchsurgeon as ts
from parity.experiments import EXPERIMENTS
from parity.families import FAMILIES, Family
from torchsurgeon.layers.training import Training, trainable

TOLERANCE = 1e-6
"""Max abs difference allowed between the two libraries (fp32), and between host and here."""
BUILDERS = {"gpt2": make_gpt2, "llama": make_llama}


def experiment(name: str) -> ModuleType:
    return importlib.import_module(f"parity.experiments.{name}")


def converted(module: ModuleType) -> bool:
    """Whether the experiment's torchsurgeon side runs on the model's conversion."""
    return getattr(module, "CONVERTED", False)


@dataclass(frozen=True)
class Models:
    """One family's models on torchsurgeon's side: wrapped and converted."""

    family: Family
    hf: nn.Module
    """The ``transformers`` model plans run on here, and the host's checkpoint."""
    wrapped: nn.Module
    converted: nn.Module

    def base(self, module: ModuleType) -> nn.Module:
        return self.converted if converted(module) else self.hf

    def model(self, module: ModuleType) -> nn.Module:
        return self.converted if converted(module) else self.wrapped


def build(family: str) -> nn.Module:
    """The family's seeded tiny model (``tests/hook_reference.py``), eager attention."""
    return BUILDERS[family]("eager")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def models(request: pytest.FixtureRequest) -> Models:
    hf = build(request.param)
    return Models(FAMILIES[request.param], hf, ts.wrap(hf), ts.convert(hf))


@pytest.fixture(scope="module")
def lm(models: Models) -> Any:
    """``nnsight.NNsight`` over its own copy of the family's model (same seed, same weights)."""
    nnsight = require("nnsight", "nnsight is not installed (pip install -e '.[test]')")
    return nnsight.NNsight(build(models.family.name))


@pytest.fixture(scope="module")
def client(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A host on 127.0.0.1 serving this family's checkpoint, as ``transformers`` model
    (eager attention) and converted; stopped when the module's tests of the family end."""
    for module in ("fastapi", "uvicorn", "httpx"):
        require(module, f"{module} is not installed (pip install -e '.[test]')")
    from torchsurgeon.remote import Client, LocalCheckpoint, create_app, serve_in_thread

    name = models.family.name
    path = tmp_path_factory.mktemp(f"parity-{name}") / "checkpoint"
    models.hf.save_pretrained(path)
    app = create_app(
        {
            name: LocalCheckpoint(path, attn_implementation="eager"),
            f"{name}-converted": LocalCheckpoint(path, convert=True),
        },
        workers=1,
    )
    with (
        serve_in_thread(app, host="127.0.0.1") as server,
        Client(server.url, progress=False) as connected,
    ):
        yield connected


# --------------------------------------------------------------------------- runners


def as_plans(target: Any) -> Any:
    """A plan for a rewritten model; a session with each run's model planned."""
    if isinstance(target, ts.Session):
        return ts.Session(tuple(replace(r, target=as_plans(r.target)) for r in target.runs))
    return target if isinstance(target, ts.Plan) else ts.plan(target)


def generating(target: Any) -> nn.Module | None:
    """The model whose ``generate`` ``target`` is (a generation), else None."""
    owner = getattr(target, "__self__", None)
    is_generate = getattr(target, "__name__", "") == "generate"
    return owner if isinstance(owner, nn.Module) and is_generate else None


def on_base(model: nn.Module, base: nn.Module) -> nn.Module:
    """``model``'s plan applied to ``base``, as a host applies it."""
    return ts.plans.apply(ts.plan(model), base)


def local(base: nn.Module) -> Callable[..., Any]:
    """``run(target, *inputs)`` here: exactly what a host does with the request.

    ``target`` is a plan, a rewritten model or a session (``ts.plans.execute``), a rewritten
    model's ``generate`` (``ts.run(model.generate, ids, max_new_tokens=...)``), or a training
    loop, ``ts.training(...)`` (``ts.train``); each runs on the plan applied to ``base``.
    """

    def run(target: Any, *inputs: Any, **kwargs: Any) -> Any:
        if isinstance(target, Training):
            names = [f"{path}.{field}" for path, field in trainable(target.model, target.params)]
            return replace(target, model=on_base(target.model, base), params=names).run()
        model = generating(target)
        if model is not None:
            return ts.run(on_base(model, base).generate, *inputs, **kwargs)
        return ts.plans.execute(as_plans(target), base, *inputs, **kwargs)

    return run


class OneRequest:
    """``run(...)`` on the host, counting the requests sent; a backend for ``ts.run`` and
    ``ts.train`` (``backend=``) too, which is how generations and training loops go."""

    def __init__(self, client: Any, model_name: str) -> None:
        self.client, self.model_name, self.calls = client, model_name, 0

    def __call__(self, target: Any, *inputs: Any, **kwargs: Any) -> Any:
        if isinstance(target, Training):
            settings = {"loss": target.loss, "params": target.params, "steps": target.steps}
            return ts.train(
                target.model, target.batches, optimizer=target.optimizer, backend=self, **settings
            )
        if generating(target) is not None:
            return ts.run(target, *inputs, backend=self, **kwargs)
        return self.run(target, *inputs, **kwargs)

    def run(self, target: Any, *inputs: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.client.run(target, *inputs, model_name=self.model_name, **kwargs)

    def generate(self, model: nn.Module, *inputs: Any, **options: Any) -> Any:
        self.calls += 1
        return self.client.generate(model, *inputs, model_name=self.model_name, **options)

    def train(self, model: nn.Module, batches: Any, **settings: Any) -> Any:
        self.calls += 1
        return self.client.train(model, batches, model_name=self.model_name, **settings)


def max_diffs(got: dict[str, Any], want: dict[str, Any]) -> dict[str, float]:
    """Max abs difference per key; the same keys, shapes and dtypes are asserted first."""
    assert sorted(got) == sorted(want)
    diffs = {}
    for key, expected in want.items():
        actual = got[key]
        assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), key
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        assert actual.dtype == expected.dtype, (key, actual.dtype, expected.dtype)
        delta = actual.detach().double() - expected.detach().double()
        diffs[key] = delta.abs().max().item() if delta.numel() else 0.0
    return diffs


def assert_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    over = {k: d for k, d in max_diffs(got, want).items() if not d <= TOLERANCE}
    assert not over, f"max abs diff over {TOLERANCE}: {over}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_nnsight_and_torchsurgeon_agree(
    models: Models, lm: Any, token_ids: torch.Tensor, name: str
) -> None:
    module = experiment(name)
    f = models.family
    want = module.nnsight_version(lm, token_ids, f)
    got = module.ts_version(models.model(module), token_ids, f, local(models.base(module)))
    assert want, "the experiment compares nothing"
    assert_close(got, want)


@pytest.mark.slow  # a host on a loopback port
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_request_to_a_host_gives_the_local_result(
    models: Models, client: Any, token_ids: torch.Tensor, name: str
) -> None:
    module = experiment(name)
    f = models.family
    hosted = f"{f.name}-converted" if converted(module) else f.name
    remote = OneRequest(client, hosted)
    got = module.ts_version(models.model(module), token_ids, f, remote)
    assert remote.calls == 1
    want = module.ts_version(models.model(module), token_ids, f, local(models.base(module)))
    assert_close(got, want)


@pytest.fixture(scope="module")
def tp_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A host serving the Llama checkpoint sharded over 2 gloo ranks (``serve --tp 2``), as
    ``transformers`` model and converted."""
    from torchsurgeon.remote import Client, LocalCheckpoint, create_app, serve_in_thread

    path = tmp_path_factory.mktemp("parity-tp") / "checkpoint"
    build("llama").save_pretrained(path)
    checkpoints = {
        "llama": LocalCheckpoint(path, attn_implementation="eager"),
        "llama-converted": LocalCheckpoint(path, convert=True),
    }
    app = create_app(checkpoints, workers=1, tensor_parallel=2)
    with (
        serve_in_thread(app, host="127.0.0.1") as server,
        Client(server.url, progress=False) as connected,
    ):
        yield connected


TP_TOLERANCE = 1e-5
"""Sharded against unsharded: a row-wise layer sums its shards' partial products."""


@pytest.mark.slow  # two ranks and a host on a loopback port
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_tensor_parallel_host_gives_the_local_result(
    tp_client: Any, token_ids: torch.Tensor, name: str
) -> None:
    module = experiment(name)
    hf = build("llama")
    f = FAMILIES["llama"]
    base = ts.convert(hf) if converted(module) else hf
    model = ts.wrap(base)
    remote = OneRequest(tp_client, "llama-converted" if converted(module) else "llama")
    got = module.ts_version(model, token_ids, f, remote)
    assert remote.calls == 1
    want = module.ts_version(model, token_ids, f, local(base))
    over = {k: d for k, d in max_diffs(got, want).items() if not d <= TP_TOLERANCE}
    assert not over, f"max abs diff over {TP_TOLERANCE}: {over}"


def test_every_experiment_module_is_listed() -> None:
    found = sorted(p.stem for p in (Path(__file__).parent / "experiments").glob("e[0-9]*.py"))
    assert found == list(EXPERIMENTS)
    for name in EXPERIMENTS:
        module = experiment(name)
        assert callable(module.nnsight_version) and callable(module.ts_version), name


def test_the_line_counts_in_the_docs_are_current() -> None:
    """``docs/parity.md`` shows the table ``benchmarks/parity_lines.py`` prints now."""
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "parity_lines", root / "benchmarks" / "parity_lines.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows, nnsight_total, ts_total = script.table()
    assert [row[0] for row in rows] == list(EXPERIMENTS)
    docs = (root / "docs" / "parity.md").read_text()
    for name, nnsight_lines, ts_lines in rows:
        assert f"| {name} | {nnsight_lines} | {ts_lines} |" in docs, name
    assert f"| **total** | **{nnsight_total}** | **{ts_total}** |" in docs
