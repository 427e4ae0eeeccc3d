"""Methods with ``backend=``: the same results as locally, in one request per batch.

A loopback host serves the tiny seeded GPT-2 and Llama of ``tests/hook_reference.py``, saved
with ``save_pretrained``. Each method runs locally on the checkpoint loaded here and on the
host with ``backend=`` on ``client.meta(name)`` — a structure-only model, so nothing can
read weights locally — and the results agree to 1e-6. The backend counts the requests it
sends: a sweep that is one batch (``max_rows=None``) is one request, whatever the method.
It also keeps what came back, to check that a known metric travels as one number a row
rather than as logits. The gradient, generation and training methods (attribution
patching, steering, LoRA, probes fitted on the host) are one request each too, with the
same scores, tokens, trained tensors and losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, make_gpt2, make_llama
from torch import nn
from transformers import AutoModelForCausalLM

import torchsurgeon as ts
from torchsurgeon import methods as M
from torchsurgeon.remote import Client, RemoteError, create_app, serve_in_thread

pytestmark = pytest.mark.slow  # starts a host on a loopback port

TOL = 1e-6
FAMILY = pytest.mark.parametrize("family", ["gpt2", "llama"])


class Counting:
    """A backend that counts its requests and keeps their results, forwarding to a client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.requests = 0
        self.sent: list[Any] = []
        self.results: list[Any] = []

    def run(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        self.sent.append(target)
        result = self.client.run(target, *args, **kwargs)
        self.results.append(result)
        return result

    def generate(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        self.sent.append(target)
        result = self.client.generate(target, *args, **kwargs)
        self.results.append(result)
        return result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods_hosted")
    make_gpt2().save_pretrained(root / "gpt2")
    make_llama().save_pretrained(root / "llama")
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


@pytest.fixture(scope="module")
def local(checkpoints: dict[str, Path]) -> dict[str, nn.Module]:
    return {
        name: ts.wrap(AutoModelForCausalLM.from_pretrained(path).eval())
        for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def client(checkpoints: dict[str, Path]) -> Iterator[Client]:
    app = create_app(checkpoints, workers=2)
    with serve_in_thread(app) as server, Client(server.url, progress=False) as connected:
        yield connected


@pytest.fixture
def backend(client: Client) -> Counting:
    return Counting(client)


def ids_of(seed: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def corrupt(clean: torch.Tensor, position: int) -> torch.Tensor:
    corrupted = clean.clone()
    corrupted[:, position] = (corrupted[:, position] + 11) % (VOCAB - 2) + 2
    return corrupted


def padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` with row ``r`` left-padded by ``pads[r]`` tokens (its last ones dropped)."""
    out = ids.clone()
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        out[row] = torch.cat([torch.zeros(pad, dtype=ids.dtype), ids[row, : ids.shape[1] - pad]])
        mask[row, :pad] = 0
    return out, mask


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def assert_same_grid(got: M.EffectGrid, want: M.EffectGrid) -> None:
    assert got.shape == want.shape
    assert (got.row_labels, got.col_labels) == (want.row_labels, want.col_labels)
    assert diff(got.values, want.values) <= TOL
    for name in ("clean_metric", "corrupted_metric"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert abs(a - b) <= TOL, name


def only_metric_rows(backend: Counting) -> bool:
    """Every result that came back held the metric per row only (no output, no logits)."""
    return all(
        all(r.output is None and set(r.saved) == {"metric_rows"} for r in results.values())
        for results in backend.results
    )


# --------------------------------------------------------------------------- sweeps


@FAMILY
@pytest.mark.parametrize("over", ["resid", "heads"])
def test_activation_patching_on_the_host_is_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str, over: str
) -> None:
    clean = ids_of(1)
    corrupted = corrupt(clean, 3)
    metric = M.LogitDiff(correct=[5, 9], wrong=[7, 3])
    want = M.activation_patching(local[family], clean, corrupted, metric, over=over)
    got = M.activation_patching(
        client.meta(family), clean, corrupted, metric, over=over, backend=backend
    )
    assert_same_grid(got, want)
    assert backend.requests == 1
    assert only_metric_rows(backend)  # the logit difference was computed on the host
    if over == "resid":  # sites before the differing token: run on the host, effect 0
        assert float(got.values[:, :3].abs().max()) <= TOL


def test_activation_patching_with_max_rows_is_one_request_per_pass(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    clean = ids_of(2, batch=1, length=5)
    corrupted = corrupt(clean, 1)
    metric = M.AnswerProbability(17)
    want = M.activation_patching(local["llama"], clean, corrupted, metric, over="heads")
    got = M.activation_patching(
        client.meta("llama"), clean, corrupted, metric, over="heads", max_rows=6, backend=backend
    )
    assert_same_grid(got, want)
    assert backend.requests == 3  # 12 heads, 4 a pass beside the clean and corrupted rows


def test_a_python_metric_reads_the_logits_sent_back(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    clean = ids_of(3)
    corrupted = corrupt(clean, 4)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -2, 3] - logits[:, -1, :].mean(-1)

    want = M.activation_patching(local["gpt2"], clean, corrupted, metric, positions=[3, 4, 5])
    got = M.activation_patching(
        client.meta("gpt2"), clean, corrupted, metric, positions=[3, 4, 5], backend=backend
    )
    assert_same_grid(got, want)
    assert backend.requests == 1
    (results,) = backend.results
    (result,) = results.values()
    assert set(result.saved) == set() and result.output["logits"].shape[-1] == VOCAB


def test_a_local_model_runs_on_the_host_too(local: dict[str, nn.Module], backend: Counting) -> None:
    clean = ids_of(4)
    corrupted = corrupt(clean, 2)
    metric = M.LogitDiff(5, 9)
    want = M.activation_patching(local["llama"], clean, corrupted, metric)
    got = M.activation_patching(local["llama"], clean, corrupted, metric, backend=backend)
    assert_same_grid(got, want)
    assert backend.requests == 1


@FAMILY
def test_causal_tracing_computes_the_noise_and_the_answer_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    prompt = ids_of(5, batch=1)[0]
    want = M.causal_tracing(local[family], prompt, subject=[1, 2], samples=3)
    got = M.causal_tracing(client.meta(family), prompt, subject=[1, 2], samples=3, backend=backend)
    assert_same_grid(got, want)
    assert backend.requests == 1  # std, answer and sweep: one request
    assert only_metric_rows(backend)
    assert float(got.values.abs().max()) > 0  # restoring a state moves the metric


@pytest.mark.parametrize("over", ["mlp", "attn"])
def test_causal_tracing_with_given_std_answer_and_max_rows(
    client: Client, local: dict[str, nn.Module], backend: Counting, over: str
) -> None:
    prompt = ids_of(6, batch=1, length=5)
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    options: dict[str, Any] = {"answer": 12, "std": 0.5, "over": over, "samples": 2}
    options |= {"subject": [0], "attention_mask": mask, "layers": [0, 2]}
    want = M.causal_tracing(local["llama"], prompt, **options)
    got = M.causal_tracing(client.meta("llama"), prompt, max_rows=7, backend=backend, **options)
    assert_same_grid(got, want)
    assert backend.requests == 4  # 8 sites, 2 a pass (2 rows each beside the 3 fixed ones)


@FAMILY
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_knockout_on_the_host_is_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str, mode: str
) -> None:
    ids = ids_of(7)
    metric = M.LogitDiff(correct=4, wrong=[8, 9])
    want = M.head_knockout(local[family], ids, metric, mode=mode)
    got = M.head_knockout(client.meta(family), ids, metric, mode=mode, backend=backend)
    assert_same_grid(got, want)
    assert backend.requests == 1  # mode="mean": the reference batch in the same request
    (results,) = backend.results
    assert set(results) == ({"reference", "sweep"} if mode == "mean" else {"sweep"})
    (session,) = backend.sent
    assert len(session.runs[-1].target.steps) == 3  # one layer per block, not one per head


def test_head_knockout_on_padded_prompts_with_a_reference_batch(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    ids, mask = padded(ids_of(8, batch=3), [0, 2, 1])
    reference, reference_mask = padded(ids_of(9, batch=2, length=5), [1, 0])
    options: dict[str, Any] = {"mode": "mean", "attention_mask": mask}
    options |= {"reference_ids": reference, "reference_mask": reference_mask}
    metric = M.AnswerProbability([3, 4, 5])
    want = M.head_knockout(local["llama"], ids, metric, **options)
    got = M.head_knockout(client.meta("llama"), ids, metric, backend=backend, **options)
    assert_same_grid(got, want)
    assert backend.requests == 1
    assert only_metric_rows(backend) is False  # the reference run returns the head means
    assert set(backend.results[0]["sweep"].saved) == {"metric_rows"}


def test_head_means_and_knockout_heads_take_the_means_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    ids, mask = padded(ids_of(10, batch=3), [2, 0, 0])
    want = M.head_means(local["gpt2"], ids, reference_mask=mask)
    got = M.head_means(client.meta("gpt2"), ids, reference_mask=mask, backend=backend)
    assert got.shape == want.shape and diff(got, want) <= TOL
    assert backend.requests == 1
    heads = [(0, 1), (2, 3)]
    model = M.knockout_heads(
        client.meta("gpt2"), heads, mode="mean", reference_ids=ids, backend=backend
    )
    assert backend.requests == 2
    twin = M.knockout_heads(local["gpt2"], heads, mode="mean", reference_ids=ids)
    probe = ids_of(11)
    remote_logits = client.run(ts.plans.plan(model).returning("logits"), probe).output["logits"]
    assert diff(remote_logits, twin(probe).logits) <= TOL


# --------------------------------------------------------------------------- reading methods


@FAMILY
def test_logit_lens_decodes_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    prompt, mask = padded(ids_of(12, batch=1), [2])
    for kwargs in ({}, {"attention_mask": mask, "layers": [0, -1]}):
        want = M.logit_lens(local[family], prompt, **kwargs)
        got = M.logit_lens(client.meta(family), prompt, backend=backend, **kwargs)
        assert got.log_probs.shape == want.log_probs.shape
        assert diff(got.log_probs, want.log_probs) <= TOL
        assert torch.equal(got.top_ids, want.top_ids)
        assert got.position_labels == want.position_labels
    assert backend.requests == 2


@FAMILY
def test_force_neurons_runs_both_passes_in_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    ids, mask = padded(ids_of(13, batch=3), [0, 1, 3])
    neurons = {0: [3, 17], -1: [40]}
    options: dict[str, Any] = {"rows": slice(1, None), "attention_mask": mask}
    want = M.force_neurons(local[family], ids, neurons, 4.0, **options)
    got = M.force_neurons(client.meta(family), ids, neurons, 4.0, backend=backend, **options)
    assert diff(got.logits, want.logits) <= TOL
    assert diff(got.base_logits, want.base_logits) <= TOL
    assert diff(got.shift, want.shift) <= TOL
    assert torch.equal(got.top_ids, want.top_ids)
    assert got.forced_rows == want.forced_rows
    assert backend.requests == 1


@FAMILY
def test_steering_vector_takes_both_means_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    positive, positive_mask = padded(ids_of(14, batch=3), [0, 2, 1])
    negative = ids_of(15, batch=2, length=5)
    options: dict[str, Any] = {"layer": 1, "positive_mask": positive_mask}
    want = M.steering_vector(local[family], positive, negative, **options)
    got = M.steering_vector(client.meta(family), positive, negative, backend=backend, **options)
    assert got.shape == want.shape and diff(got, want) <= TOL
    assert backend.requests == 1
    (results,) = backend.results
    assert {r.saved["side_mean"].shape for r in results.values()} == {want.shape}


@pytest.mark.parametrize("position", [-1, None])
def test_residual_features_and_probes_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting, position: int | None
) -> None:
    ids, mask = padded(ids_of(16, batch=8, length=6), [0, 1, 0, 2, 0, 0, 3, 0])
    options: dict[str, Any] = {"position": position, "attention_mask": mask, "layers": [0, 2]}
    want = M.residual_features(local["llama"], ids, **options)
    got = M.residual_features(client.meta("llama"), ids, backend=backend, **options)
    assert got.shape == want.shape and diff(got, want) <= TOL
    assert backend.requests == 1
    chunked = M.residual_features(
        client.meta("llama"), ids, batch_size=3, backend=backend, **options
    )
    assert diff(chunked, want) <= TOL
    assert backend.requests == 1 + 3
    labels = (ids[:, -1] % 2) if position is not None else ids % 2
    local_probe = M.train_probe(local["llama"], ids, labels, steps=20, **options)
    remote_probe = M.train_probe(
        client.meta("llama"), ids, labels, steps=20, backend=backend, **options
    )
    assert diff(remote_probe.accuracy, local_probe.accuracy) <= TOL
    assert backend.requests == 5


@FAMILY
def test_embedding_noise_std_on_the_host(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    want = M.embedding_noise_std(local[family])
    got = M.embedding_noise_std(client.meta(family), backend=backend)
    assert got == want
    assert backend.requests == 1


# --------------------------------------------------------------------------- gradients


@FAMILY
@pytest.mark.parametrize("over", ["resid", "heads"])
def test_attribution_patching_runs_the_backward_pass_on_the_host_in_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str, over: str
) -> None:
    clean, mask = padded(ids_of(18, batch=3), [0, 2, 1])
    corrupted = corrupt(clean, 5)
    cases: list[dict[str, Any]] = [
        {"metric": M.LogitDiff(correct=[5, 9, 3], wrong=[7, 3, 4])},
        {"metric": M.AnswerProbability(17), "attention_mask": mask},
    ]
    for options in cases:
        want = M.attribution_patching(local[family], clean, corrupted, over=over, **options)
        got = M.attribution_patching(
            client.meta(family), clean, corrupted, over=over, backend=backend, **options
        )
        assert_same_grid(got, want)
        assert float(want.values.abs().max()) > 0
    assert backend.requests == len(cases)
    for results in backend.results:  # the scores and the metric, not activations or grads
        (result,) = results.values()
        assert result.output is None and set(result.saved) == {"scores", "metric_rows"}
    assert all(r.target.backward is not None for session in backend.sent for r in session.runs)


def test_attribution_patching_with_a_python_metric_takes_a_second_request(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    clean, mask = padded(ids_of(19, batch=2), [1, 0])
    corrupted = corrupt(clean, 4)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 3] - logits[:, -2, :].logsumexp(-1)

    options: dict[str, Any] = {"attention_mask": mask, "layers": [0, 2]}
    want = M.attribution_patching(local["llama"], clean, corrupted, metric, **options)
    got = M.attribution_patching(
        client.meta("llama"), clean, corrupted, metric, backend=backend, **options
    )
    assert_same_grid(got, want)
    assert backend.requests == 2  # the logits, then the backward pass from their gradient
    assert set(backend.results[1]["run"].saved) == {"scores"}


# --------------------------------------------------------------------------- generation


@FAMILY
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [1, -1]])
def test_steer_generates_on_the_host_in_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str, positions: Any
) -> None:
    ids, mask = padded(ids_of(20, batch=3, length=6), [0, 2, 1])
    vector = 3 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    options: dict[str, Any] = {"layers": [0, 1], "scale": 2.0, "positions": positions}
    options |= {"max_new_tokens": 5, "attention_mask": mask}
    for decoding in ({"do_sample": False}, {"do_sample": True, "top_k": 8, "seed": 5}):
        want = M.steer(local[family], ids, vector, **options, **decoding)
        got = M.steer(client.meta(family), ids, vector, backend=backend, **options, **decoding)
        assert torch.equal(got.sequences, want.sequences)
        assert (got.new_labels, got.positions, got.layers) == (
            want.new_labels,
            want.positions,
            want.layers,
        )
        unsteered = M.steer(local[family], ids, vector, **{**options, "scale": 0.0}, **decoding)
        assert not torch.equal(unsteered.sequences, want.sequences)  # the vector steers
    assert backend.requests == 2  # one generate request per call
    assert all(isinstance(r.output, torch.Tensor) and not r.records for r in backend.results)


def test_steer_on_the_host_stops_rows_at_their_end_token(
    client: Client, local: dict[str, nn.Module], backend: Counting
) -> None:
    ids = ids_of(21, batch=3, length=6)
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    options: dict[str, Any] = {"layers": [0], "scale": 0.5, "max_new_tokens": 4}
    options |= {"positions": "generated", "do_sample": False}
    first = M.steer(local["llama"], ids, vector, **options)
    end = int(first.new_tokens[0, 0])  # row 0 ends after the prompt's pass, the others not
    options |= {"eos_token_id": end, "pad_token_id": 1}
    want = M.steer(local["llama"], ids, vector, **options)
    got = M.steer(client.meta("llama"), ids, vector, backend=backend, **options)
    assert torch.equal(got.sequences, want.sequences)
    assert want.new_tokens[0, 1:].tolist() == [1, 1, 1] and want.new_tokens.shape[1] == 4
    assert backend.requests == 1


def test_steer_on_the_host_needs_a_seed_to_sample(client: Client, backend: Counting) -> None:
    vector = torch.ones(HIDDEN)
    with pytest.raises(RemoteError, match="seed") as raised:
        M.steer(
            client.meta("gpt2"), ids_of(22), vector, layers=[0], do_sample=True, backend=backend
        )
    assert raised.value.field == "inputs.seed"


# --------------------------------------------------------------------------- training


def same_lora(got: M.LoraResult, want: M.LoraResult) -> None:
    assert list(got.adapters) == list(want.adapters)
    for path, adapter in want.adapters.items():
        for field in ("a", "b", "scale"):
            assert diff(getattr(got.adapters[path], field), getattr(adapter, field)) <= TOL
    assert torch.equal(got.losses, want.losses)
    assert (got.initial_loss, got.final_loss) == (want.initial_loss, want.final_loss)


@FAMILY
def test_train_lora_trains_on_the_host_in_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, family: str
) -> None:
    ids, mask = padded(ids_of(23, batch=5, length=6), [0, 2, 1, 0, 3])
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :2] = 0
    mlp = "transformer.h.*.mlp" if family == "gpt2" else "model.layers.*.mlp"
    cases: list[dict[str, Any]] = [
        {},  # every block's attention output and MLP down-projection, full batches
        {"attention_mask": mask, "batch_size": 3, "targets": mlp},  # measured widths
        {"loss_mask": loss_mask, "batch_size": 2, "rank": 2, "alpha": 4.0},
        {"attention_mask": mask, "loss_mask": loss_mask},
    ]
    for options in cases:
        want = M.train_lora(local[family], ids, steps=6, lr=0.05, **options)
        got = M.train_lora(client.meta(family), ids, steps=6, lr=0.05, backend=backend, **options)
        same_lora(got, want)
        assert all(float(a.b.abs().max()) > 0 for a in got.adapters.values())  # trained
    assert backend.requests == len(cases)
    for session in backend.sent:
        assert [r.name for r in session.runs] == ["initial", "fit", "final"]
    # the adapted model is a plan like any other: it runs on the host as the local one does
    probe = ids_of(24)
    remote_logits = client.run(ts.plans.plan(got.model).returning("logits"), probe)
    assert diff(remote_logits.output["logits"], want.model(probe).logits) <= TOL


def test_train_lora_on_the_host_refuses_rows_it_cannot_tell_apart(
    client: Client, backend: Counting
) -> None:
    ids = ids_of(25, batch=4)
    ids[2] = ids[0]
    loss_mask = torch.ones_like(ids)
    loss_mask[2, 3] = 0  # the same prompt as row 0, another loss mask
    with pytest.raises(ValueError, match=r"rows \[0, 2\] are the same prompt"):
        M.train_lora(
            client.meta("gpt2"), ids, loss_mask=loss_mask, batch_size=2, steps=2, backend=backend
        )
    assert backend.requests == 0


@pytest.mark.parametrize("position", [-1, None])
def test_train_probe_fits_on_the_host_in_one_request(
    client: Client, local: dict[str, nn.Module], backend: Counting, position: int | None
) -> None:
    ids, mask = padded(ids_of(26, batch=8, length=6), [0, 1, 0, 2, 0, 0, 3, 0])
    labels = (ids[:, -1] % 3) if position is not None else ids % 2
    options: dict[str, Any] = {"position": position, "attention_mask": mask, "layers": [0, 2]}
    options |= {"steps": 30, "weight_decay": 0.0}
    want = M.train_probe(local["llama"], ids, labels, **options)
    got = M.train_probe(
        client.meta("llama"), ids, labels, backend=backend, fit_on_host=True, **options
    )
    assert backend.requests == 1
    assert torch.equal(got.accuracy, want.accuracy)
    assert torch.equal(got.train_accuracy, want.train_accuracy)
    assert (got.chance, got.n_train, got.n_test) == (want.chance, want.n_train, want.n_test)
    for a, b in zip(got.probes, want.probes, strict=True):
        for field in ("weight", "bias", "mean", "std"):
            assert diff(getattr(a, field), getattr(b, field)) <= TOL, field
    (results,) = backend.results  # the probes travel back, not the features
    assert set(results["final"].saved) == {
        f"{name}{layer}" for name in ("mean", "std", "predicted") for layer in (0, 2)
    }


def test_train_probe_fits_on_the_host_only_as_it_fits_locally(
    client: Client, backend: Counting
) -> None:
    ids = ids_of(27, batch=6)
    labels = ids[:, -1] % 2
    meta = client.meta("gpt2")
    with pytest.raises(ValueError, match="weight_decay=0"):
        M.train_probe(meta, ids, labels, backend=backend, fit_on_host=True)
    with pytest.raises(ValueError, match="batch_size=None"):
        M.train_probe(
            meta, ids, labels, weight_decay=0.0, batch_size=2, backend=backend, fit_on_host=True
        )
    with pytest.raises(ValueError, match="give backend="):
        M.train_probe(meta, ids, labels, weight_decay=0.0, fit_on_host=True)
    assert backend.requests == 0
