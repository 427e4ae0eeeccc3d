"""Every method equals an independent reference written with plain hooks on the plain model.

Each method in ``torchsurgeon.methods`` works by rewriting the model (selectors and
intervention layers). The references here use nothing from torchsurgeon: the *unmodified*
``transformers`` model, ``register_forward_hook`` / ``register_forward_pre_hook`` doing each
edit by hand, one forward pass per patched site (where the method batches them all into
one), ``torch.autograd.grad`` for attribution patching. Tiny seeded GPT-2 and Llama models
in fp32 (``tests/hook_reference.py``); the toy induction model's test is marked slow.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_reference import SEED_NEURONS, VOCAB, hooks, make_gpt2, max_diff
from requirements import require
from torch import nn

import torchsurgeon as ts
from torchsurgeon import methods as M
from torchsurgeon import plans
from torchsurgeon.methods.toy import ToyRecipe

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# Per family: the blocks, the attention output projection and MLP down-projection (block
# relative), the embedding, final norm and unembedding — written out here, not read from
# the library's family table.
PARTS: dict[str, dict[str, str]] = {
    "gpt2": {
        "blocks": "transformer.h",
        "attn_out": "attn.c_proj",
        "attn": "attn",
        "mlp": "mlp",
        "down": "mlp.c_proj",
        "embed": "transformer.wte",
        "norm": "transformer.ln_f",
        "unembed": "lm_head",
    },
    "llama": {
        "blocks": "model.layers",
        "attn_out": "self_attn.o_proj",
        "attn": "self_attn",
        "mlp": "mlp",
        "down": "mlp.down_proj",
        "embed": "model.embed_tokens",
        "norm": "model.norm",
        "unembed": "lm_head",
    },
}
LAYERS, HEADS, D_HEAD = 3, 4, 16
FAMILY = pytest.mark.parametrize("family", ["gpt2", "llama"])


def block(family: str, layer: int, part: str | None = None) -> str:
    base = f"{PARTS[family]['blocks']}.{layer}"
    return f"{base}.{PARTS[family][part]}" if part else base


def pairs(seed: int = 0, n: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean prompts and corrupted copies differing at position 2."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, VOCAB, (n, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(2, VOCAB, (n,), generator=g)
    return clean, corrupted


def logit_diff(logits: torch.Tensor, correct: list[int], wrong: list[int]) -> torch.Tensor:
    """The reference metric: mean over rows of logit[correct] - logit[wrong], last position."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0])
    return (last[rows, correct] - last[rows, wrong]).mean()


CORRECT, WRONG = [5, 6], [7, 8]
METRIC = M.LogitDiff(CORRECT, WRONG)


def cache_outputs(model: nn.Module, paths: list[str], ids: torch.Tensor) -> dict[str, Any]:
    """Run ``ids`` with hooks that keep each path's output (or, with a ``<`` prefix, input)."""
    kept: dict[str, Any] = {}

    def keep_out(path: str) -> Callable[..., None]:
        return lambda module, args, output: kept.__setitem__(path, output)

    def keep_in(path: str) -> Callable[..., None]:
        return lambda module, args: kept.__setitem__("<" + path, args[0])

    post = {p: keep_out(p) for p in paths if not p.startswith("<")}
    pre = {p[1:]: keep_in(p[1:]) for p in paths if p.startswith("<")}
    with hooks(model, pre=pre, post=post), torch.no_grad():
        model(ids)
    return kept


@pytest.fixture(scope="module")
def models(gpt2_hf: nn.Module, llama_hf: nn.Module) -> dict[str, nn.Module]:
    return {"gpt2": gpt2_hf, "llama": llama_hf}


# --------------------------------------------------------------------------- layout


@FAMILY
def test_layout_is_found_for_known_families(family: str, models: dict[str, nn.Module]) -> None:
    layout = M.layout_of(models[family])
    assert layout.family == family
    assert layout.blocks == PARTS[family]["blocks"]
    assert layout.attn_out == PARTS[family]["attn_out"]
    assert layout.n_heads == HEADS


class _Odd(nn.Module):
    """A causal LM of no known family: blocks under ``stack``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stack = inner.transformer.h
        self.tok = inner.transformer.wte
        self.pos = inner.transformer.wpe
        self.norm = inner.transformer.ln_f
        self.head = inner.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for layer in self.stack:
            x = layer(x)
        return self.head(self.norm(x))


def test_unknown_family_says_what_to_pass() -> None:
    odd = _Odd(make_gpt2())
    with pytest.raises(M.UnknownFamilyError, match=r"_Odd.*layout=ts\.methods\.ModelLayout"):
        M.logit_lens(odd, torch.tensor([1, 2, 3]))


def test_explicit_layout_runs_a_method_on_an_unknown_family(gpt2_hf: nn.Module) -> None:
    odd = _Odd(gpt2_hf)
    layout = M.ModelLayout(
        "custom", "stack", "tok", "norm", "head", "attn", "attn.c_proj", "mlp", "mlp.c_proj", 4
    )
    ids = torch.tensor([3, 9, 27, 81])
    mine = M.logit_lens(odd, ids, layout=layout)
    theirs = M.logit_lens(gpt2_hf, ids)
    assert torch.equal(mine.log_probs, theirs.log_probs)
    bad = M.ModelLayout(
        "custom", "stack", "tok", "norm", "head", "attn", "attn.c_prj", "mlp", "mlp.c_proj", 4
    )
    with pytest.raises(ts.PathError, match="c_prj"):
        M.logit_lens(odd, ids, layout=bad)


# --------------------------------------------------------------------------- logit lens


@FAMILY
def test_logit_lens_equals_hooks(family: str, models: dict[str, nn.Module]) -> None:
    model, parts = models[family], PARTS[family]
    ids = pairs()[0][0]
    lens = M.logit_lens(model, ids, top_k=3)
    kept = cache_outputs(model, [block(family, i) for i in range(LAYERS)], ids[None])
    norm, unembed = model.get_submodule(parts["norm"]), model.get_submodule(parts["unembed"])
    with torch.no_grad():
        resid = torch.stack([kept[block(family, i)][0] for i in range(LAYERS)])
        expected = unembed(norm(resid)).log_softmax(-1)
    assert lens.log_probs.shape == (LAYERS, ids.shape[0], VOCAB)
    assert max_diff(lens.log_probs, expected) <= TOL
    assert torch.equal(lens.top_ids, expected.topk(3, dim=-1).indices)
    assert lens.top_labels[1][2][0] == str(int(expected[1, 2].argmax()))
    with torch.no_grad():  # the last layer decoded is the model's own output
        assert max_diff(lens.log_probs[-1], model(ids[None]).logits[0].log_softmax(-1)) <= TOL
    assert lens.rank_of(int(expected[0, 0].argmax()))[0, 0] == 0


# --------------------------------------------------------------------------- steering


def _steer_reference(
    model: nn.Module,
    path: str,
    ids: torch.Tensor,
    vector: torch.Tensor,
    positions: Any,
    max_new_tokens: int,
) -> torch.Tensor:
    """``generate`` with a hook that knows the prompt pass (its first call) from the steps."""
    calls: list[int] = []

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append(output.shape[1])
        out = output.clone()
        if len(calls) == 1:  # the prompt pass
            if positions in ("all", "prompt"):
                out = out + vector
            elif isinstance(positions, list):
                out[:, positions] = out[:, positions] + vector
        elif positions in ("all", "generated"):
            out = out + vector
        return out

    with hooks(model, post={path: hook}):
        sequences = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    assert calls[0] == ids.shape[1] and set(calls[1:]) == {1}
    return sequences


@FAMILY
def test_steer_equals_a_hooked_generate_for_every_position_choice(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    ids = pairs(n=2, length=5)[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    outcomes = {}
    for positions in ("all", "prompt", "generated", [1, 3]):
        result = M.steer(
            model,
            ids,
            vector,
            layers=[1],
            scale=4.0,
            positions=positions,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        expected = _steer_reference(model, block(family, 1), ids, 4.0 * vector, positions, 6)
        assert torch.equal(result.sequences, expected), positions
        assert result.new_tokens.shape == (2, 6)
        outcomes[str(positions)] = result.sequences
    assert not torch.equal(outcomes["all"], plain)  # the vector is strong enough to matter
    assert len({tuple(s.flatten().tolist()) for s in outcomes.values()}) >= 3


def test_steer_pads_a_row_that_ends_at_the_first_token_as_generate_does(
    gpt2_hf: nn.Module,
) -> None:
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    first = gpt2_hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[:, -1]
    assert first[0] != first[1]
    eos = int(first[0])  # row 0 ends at once (the prompt pass is unsteered), row 1 goes on
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    kwargs["attention_mask"] = torch.ones_like(ids)
    result = M.steer(
        gpt2_hf,
        ids,
        vector,
        layers=[1],
        scale=4.0,
        positions="generated",
        max_new_tokens=5,
        **kwargs,
    )
    calls: list[int] = []

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return output if len(calls) == 1 else output + 4.0 * vector

    with hooks(gpt2_hf, post={"transformer.h.1": hook}):
        expected = gpt2_hf.generate(ids, max_new_tokens=5, **kwargs)
    assert torch.equal(result.sequences, expected)
    assert (result.sequences[0, 6:] == 0).all() and (result.sequences[1, 6:] != 0).any()


def test_steering_vector_is_a_difference_of_means(gpt2_hf: nn.Module) -> None:
    positive, negative = pairs(n=3)
    vector = M.steering_vector(gpt2_hf, positive, negative, layer=1, position=-1)
    a = cache_outputs(gpt2_hf, [block("gpt2", 1)], positive)[block("gpt2", 1)]
    b = cache_outputs(gpt2_hf, [block("gpt2", 1)], negative)[block("gpt2", 1)]
    assert max_diff(vector, a[:, -1].mean(0) - b[:, -1].mean(0)) <= TOL


def test_steer_rejects_arguments_it_manages(gpt2_hf: nn.Module) -> None:
    with pytest.raises(TypeError, match="past_key_values"):
        M.steer(gpt2_hf, pairs()[0], torch.zeros(64), layers=[0], past_key_values=None)
    with pytest.raises(ValueError, match="positions must be"):
        M.steer(gpt2_hf, pairs()[0], torch.zeros(64), layers=[0], positions="middle")


# --------------------------------------------------------------------------- activation patching


def _patching_reference_resid(
    model: nn.Module, family: str, clean: torch.Tensor, corrupted: torch.Tensor
) -> torch.Tensor:
    """One corrupted forward per (layer, position), its output there set to the clean one."""
    paths = [block(family, i) for i in range(LAYERS)]
    kept = cache_outputs(model, paths, clean)
    with torch.no_grad():
        base = logit_diff(model(corrupted).logits, CORRECT, WRONG)
    effects = torch.zeros(LAYERS, clean.shape[1])
    for layer, path in enumerate(paths):
        for position in range(clean.shape[1]):

            def patch(
                module: nn.Module,
                args: Any,
                output: torch.Tensor,
                path: str = path,
                position: int = position,
            ) -> torch.Tensor:
                out = output.clone()
                out[:, position] = kept[path][:, position]
                return out

            with hooks(model, post={path: patch}), torch.no_grad():
                effects[layer, position] = (
                    logit_diff(model(corrupted).logits, CORRECT, WRONG) - base
                )
    return effects


def _patching_reference_heads(
    model: nn.Module, family: str, clean: torch.Tensor, corrupted: torch.Tensor
) -> torch.Tensor:
    """One corrupted forward per (layer, head), the head's slice of the out-projection input
    set to the clean one at every position."""
    paths = [block(family, i, "attn_out") for i in range(LAYERS)]
    kept = cache_outputs(model, ["<" + p for p in paths], clean)
    with torch.no_grad():
        base = logit_diff(model(corrupted).logits, CORRECT, WRONG)
    effects = torch.zeros(LAYERS, HEADS)
    for layer, path in enumerate(paths):
        for head in range(HEADS):
            part = slice(head * D_HEAD, (head + 1) * D_HEAD)

            def patch(
                module: nn.Module, args: tuple[Any, ...], path: str = path, part: slice = part
            ) -> tuple[Any, ...]:
                x = args[0].clone()
                x[..., part] = kept["<" + path][..., part]
                return (x, *args[1:])

            with hooks(model, pre={path: patch}), torch.no_grad():
                effects[layer, head] = logit_diff(model(corrupted).logits, CORRECT, WRONG) - base
    return effects


@FAMILY
def test_batched_activation_patching_equals_one_forward_per_site(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    clean, corrupted = pairs()
    grid = M.activation_patching(model, clean, corrupted, METRIC)
    expected = _patching_reference_resid(model, family, clean, corrupted)
    assert grid.values.shape == (LAYERS, clean.shape[1])
    assert max_diff(grid.values, expected) <= TOL
    assert expected.abs().max() > 1e-3  # the reference is not trivially zero
    with torch.no_grad():
        assert abs(grid.clean_metric - logit_diff(model(clean).logits, CORRECT, WRONG)) <= TOL
    # positions before the corruption carry nothing; the last layer's last position, all
    assert grid.values[:, :2].abs().max() <= TOL
    assert abs(grid.normalized()[-1, -1] - 1) <= 1e-4

    chunked = M.activation_patching(model, clean, corrupted, METRIC, max_rows=9)
    assert max_diff(chunked.values, grid.values) <= TOL


@FAMILY
def test_batched_head_patching_equals_one_forward_per_head(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    clean, corrupted = pairs(seed=1)
    grid = M.activation_patching(model, clean, corrupted, METRIC, over="heads", max_rows=12)
    expected = _patching_reference_heads(model, family, clean, corrupted)
    assert grid.values.shape == (LAYERS, HEADS)
    assert grid.col_labels == ("H0", "H1", "H2", "H3")
    assert max_diff(grid.values, expected) <= TOL
    assert expected.abs().max() > 1e-3


def test_activation_patching_restricts_layers_and_positions(gpt2_hf: nn.Module) -> None:
    clean, corrupted = pairs()
    full = M.activation_patching(gpt2_hf, clean, corrupted, METRIC)
    part = M.activation_patching(
        gpt2_hf, clean, corrupted, METRIC, layers=[2, 0], positions=[-1, 2]
    )
    assert part.row_labels == ("L2", "L0")
    assert max_diff(part.values, full.values[[2, 0]][:, [5, 2]]) <= TOL
    with pytest.raises(ValueError, match="same shape"):
        M.activation_patching(gpt2_hf, clean, corrupted[:, :-1], METRIC)


# --------------------------------------------------------------------------- attribution


def _attribution_reference(
    model: nn.Module, paths: list[str], clean: torch.Tensor, corrupted: torch.Tensor, before: bool
) -> list[torch.Tensor]:
    """Gradient x (clean - corrupted) at each site, by hand: hooks keep the clean activations,
    then the corrupted activations (with their graph); ``autograd.grad`` of the metric."""
    key = (lambda p: "<" + p) if before else (lambda p: p)
    clean_acts = cache_outputs(model, [key(p) for p in paths], clean)
    live: dict[str, torch.Tensor] = {}

    def keep_out(path: str) -> Callable[..., None]:
        return lambda module, args, output: live.__setitem__(path, output)

    def keep_in(path: str) -> Callable[..., None]:
        return lambda module, args: live.__setitem__(path, args[0])

    which = {p: (keep_in(p) if before else keep_out(p)) for p in paths}
    with hooks(model, pre=which if before else None, post=None if before else which):
        metric = logit_diff(model(corrupted).logits, CORRECT, WRONG)
    grads = torch.autograd.grad(metric, [live[p] for p in paths])
    return [
        ((clean_acts[key(p)] - live[p].detach()) * g).sum(0)
        for p, g in zip(paths, grads, strict=True)
    ]


@FAMILY
def test_attribution_patching_equals_gradient_times_difference(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    clean, corrupted = pairs(seed=2)
    grid = M.attribution_patching(model, clean, corrupted, METRIC)
    paths = [block(family, i) for i in range(LAYERS)]
    products = _attribution_reference(model, paths, clean, corrupted, before=False)
    expected = torch.stack([p.sum(-1) for p in products])
    assert max_diff(grid.values, expected) <= TOL
    assert expected.abs().max() > 1e-3

    heads = M.attribution_patching(model, clean, corrupted, METRIC, over="heads")
    paths = [block(family, i, "attn_out") for i in range(LAYERS)]
    products = _attribution_reference(model, paths, clean, corrupted, before=True)
    expected = torch.stack([p.reshape(-1, HEADS, D_HEAD).sum((0, 2)) for p in products])
    assert max_diff(heads.values, expected) <= TOL
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated on the base


def test_attribution_works_on_a_model_whose_parameters_are_frozen() -> None:
    model = make_gpt2()
    model.requires_grad_(False)
    clean, corrupted = pairs(seed=2)
    frozen = M.attribution_patching(model, clean, corrupted, METRIC)
    thawed = M.attribution_patching(make_gpt2(), clean, corrupted, METRIC)
    assert max_diff(frozen.values, thawed.values) <= TOL


def test_attribution_tracks_activation_patching(gpt2_hf: nn.Module) -> None:
    clean, corrupted = pairs(seed=3)
    estimate = M.attribution_patching(gpt2_hf, clean, corrupted, METRIC)
    actual = M.activation_patching(gpt2_hf, clean, corrupted, METRIC)
    x, y = estimate.values.flatten(), actual.values.flatten()
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.9


# --------------------------------------------------------------------------- causal tracing


def _first(value: Any) -> torch.Tensor:
    """An attention module returns ``(output, weights)``; a block, the tensor itself."""
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize(
    ("family", "over"), [("gpt2", "resid"), ("llama", "resid"), ("gpt2", "mlp"), ("llama", "attn")]
)
def test_causal_tracing_equals_noised_hooked_runs(
    family: str, over: str, models: dict[str, nn.Module]
) -> None:
    model, parts = models[family], PARTS[family]
    ids = pairs(seed=4)[0][0]
    samples, subject, std, seed = 3, [1, 2], 0.5, 5
    grid = M.causal_tracing(
        model, ids, subject, answer=9, over=over, std=std, samples=samples, seed=seed, max_rows=11
    )
    paths = [block(family, i) if over == "resid" else block(family, i, over) for i in range(LAYERS)]
    clean = cache_outputs(model, paths, ids[None])
    noise = torch.randn(samples, len(subject), 64, generator=torch.Generator().manual_seed(seed))

    def add_noise(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, subject] = out[:, subject] + std * noise
        return out

    def probability(post: dict[str, Callable[..., Any]]) -> torch.Tensor:
        with hooks(model, post={parts["embed"]: add_noise, **post}), torch.no_grad():
            logits = model(ids[None].repeat(samples, 1)).logits
        return logits[:, -1].softmax(-1)[:, 9].mean()

    corrupted = probability({})
    expected = torch.zeros(LAYERS, ids.shape[0])
    for layer, path in enumerate(paths):
        for position in range(ids.shape[0]):

            def restore(
                module: nn.Module,
                args: Any,
                output: Any,
                path: str = path,
                position: int = position,
            ) -> Any:
                out = _first(output).clone()
                out[:, position] = _first(clean[path])[0, position]
                return (out, *output[1:]) if isinstance(output, tuple) else out

            expected[layer, position] = probability({path: restore}) - corrupted
    assert abs(grid.corrupted_metric - float(corrupted)) <= TOL
    assert max_diff(grid.values, expected) <= TOL
    assert expected.abs().max() > 1e-5
    assert grid.col_labels[1].endswith("*") and not grid.col_labels[0].endswith("*")


# --------------------------------------------------------------------------- head knockout


@FAMILY
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_knockout_equals_hooked_ablations(
    family: str, mode: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    ids = pairs(seed=5)[0]
    reference_ids = pairs(seed=6, n=3)[0]
    grid = M.head_knockout(model, ids, METRIC, mode=mode, reference_ids=reference_ids, max_rows=7)
    paths = [block(family, i, "attn_out") for i in range(LAYERS)]
    means = cache_outputs(model, ["<" + p for p in paths], reference_ids)
    with torch.no_grad():
        base = logit_diff(model(ids).logits, CORRECT, WRONG)
    expected = torch.zeros(LAYERS, HEADS)
    for layer, path in enumerate(paths):
        for head in range(HEADS):
            part = slice(head * D_HEAD, (head + 1) * D_HEAD)

            def ablate(
                module: nn.Module, args: tuple[Any, ...], path: str = path, part: slice = part
            ) -> tuple[Any, ...]:
                x = args[0].clone()
                mean = means["<" + path][..., part].mean((0, 1))
                x[..., part] = 0.0 if mode == "zero" else mean
                return (x, *args[1:])

            with hooks(model, pre={path: ablate}), torch.no_grad():
                expected[layer, head] = logit_diff(model(ids).logits, CORRECT, WRONG) - base
    assert max_diff(grid.values, expected) <= TOL
    assert expected.abs().max() > 1e-3

    knocked = M.knockout_heads(model, [(1, 2)], mode=mode, reference_ids=reference_ids)
    with torch.no_grad():
        value = logit_diff(knocked(ids).logits, CORRECT, WRONG) - base
    assert abs(value - expected[1, 2]) <= TOL
    assert plans.plan(knocked).steps  # an ablated model is a plan like any rewrite


# --------------------------------------------------------------------------- neuron forcing


@FAMILY
def test_force_neurons_equals_hooked_down_projection(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    ids = pairs(seed=7, n=4)[0]
    neurons = {1: [3, 7, 9], 2: [5]}
    result = M.force_neurons(model, ids, neurons, 5.0, rows=slice(2, None), top_k=4)

    def force(chosen: list[int]) -> Callable[..., tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[2:, -1, chosen] = 5.0
            return (x, *args[1:])

        return hook

    pre = {block(family, layer, "down"): force(chosen) for layer, chosen in neurons.items()}
    with hooks(model, pre=pre), torch.no_grad():
        expected = model(ids).logits
    assert max_diff(result.logits, expected) <= TOL
    assert torch.equal(result.logits[:2], result.base_logits[:2])  # rows 0-1 are untouched
    shift = expected[:, -1].log_softmax(-1) - result.base_logits[:, -1].log_softmax(-1)
    assert torch.equal(result.top_ids[2:], shift[2:].topk(4, dim=-1).indices)
    # Rows 0-1 were not forced: their shift is exactly zero, so any "top" tokens would be
    # arbitrary tie-breaks that look like results. They show none.
    assert result.forced_rows == (2, 3)
    assert (result.top_ids[:2] == -1).all() and result.top_labels[:2] == ((), ())
    assert all(len(labels) == 4 for labels in result.top_labels[2:])


def test_force_neurons_runs_the_seed_experiment(seed_llama_hf: nn.Module) -> None:
    ids = torch.randint(2, VOCAB, (5, 6), generator=torch.Generator().manual_seed(8))
    result = M.force_neurons(seed_llama_hf, ids, SEED_NEURONS, 5.0, rows=slice(3, None))

    def force(chosen: list[int]) -> Callable[..., tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[3:, -1, chosen] = 5.0
            return (x,)

        return hook

    pre = {f"model.layers.{k}.mlp.down_proj": force(v) for k, v in SEED_NEURONS.items()}
    with hooks(seed_llama_hf, pre=pre), torch.no_grad():
        expected = seed_llama_hf(ids).logits
    assert max_diff(result.logits, expected) <= TOL
    with pytest.raises(IndexError, match="9472 neurons"):
        M.force_neurons(seed_llama_hf, ids, {12: [9472]})


# --------------------------------------------------------------------------- probes


@FAMILY
def test_probe_features_equal_hooked_activations_and_probes_learn(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    ids = torch.randint(2, VOCAB, (64, 6), generator=torch.Generator().manual_seed(9))
    # a linear function of the token embedding: readable from the residual stream
    direction = torch.randn(64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        labels = (model.get_submodule(PARTS[family]["embed"])(ids) @ direction > 0).long()
    result = M.train_probe(model, ids, labels, position=None, steps=150)
    kept = cache_outputs(model, [block(family, i) for i in range(LAYERS)], ids)
    for layer in range(LAYERS):
        features = kept[block(family, layer)].reshape(-1, 64)
        reference = M.fit_probe(features, labels.reshape(-1), steps=150)
        assert result.probes[layer].test_accuracy == reference.test_accuracy
        assert max_diff(result.probes[layer].weight, reference.weight) <= TOL
    assert result.accuracy.shape == (LAYERS,)
    assert result.accuracy[0] > max(0.85, result.chance + 0.2)
    assert result.n_train + result.n_test == labels.numel()


def test_probe_per_prompt_labels(gpt2_hf: nn.Module) -> None:
    ids = torch.randint(2, VOCAB, (40, 6), generator=torch.Generator().manual_seed(10))
    labels = (ids[:, -1] % 2).long()
    result = M.train_probe(gpt2_hf, ids, labels, position=-1, steps=100, batch_size=16)
    assert result.accuracy.shape == (LAYERS,) and result.n_test == 10
    with pytest.raises(ValueError, match="labels have shape"):
        M.train_probe(gpt2_hf, ids, labels[:-1])


# --------------------------------------------------------------------------- LoRA


@FAMILY
def test_train_lora_trains_the_adapter_only(family: str, models: dict[str, nn.Module]) -> None:
    model = models[family]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    ids = torch.randint(2, VOCAB, (8, 8), generator=torch.Generator().manual_seed(11))
    targets = f"{PARTS[family]['blocks']}.*.{PARTS[family]['attn_out']}"
    result = M.train_lora(model, ids, targets=targets, rank=2, steps=25, lr=2e-2)

    for name, parameter in model.named_parameters():  # the base: same storage, same values
        pointer, value = before[name]
        assert parameter.data_ptr() == pointer and torch.equal(parameter, value), name
        assert parameter.grad is None, name
    assert result.final_loss < result.initial_loss - 0.05
    assert len(result.losses) == 25 and set(result.adapters) == {
        block(family, i, "attn_out") for i in range(LAYERS)
    }
    adapted_params = dict(result.model.named_parameters())
    # shared: the same storage (ts.wrap gives a tree its own Parameter objects over it)
    assert all(adapted_params[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters())

    def add_low_rank(path: str) -> Callable[..., torch.Tensor]:
        adapter = result.adapters[path]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + args[0] @ adapter.a.T @ adapter.b.T * adapter.scale

        return hook

    with hooks(model, post={p: add_low_rank(p) for p in result.adapters}), torch.no_grad():
        expected = model(ids).logits
    with torch.no_grad():
        assert max_diff(result.model(ids).logits, expected) <= TOL
        assert max_diff(model(ids).logits, expected) > 1e-3  # the adapter changed something

    rebuilt = plans.apply(plans.Plan.from_bytes(plans.plan(result.model).to_bytes()), model)
    with torch.no_grad():
        assert max_diff(rebuilt(ids).logits, expected) <= TOL


def test_low_rank_adapter_needs_the_module_input(gpt2_hf: nn.Module) -> None:
    adapter = ts.layers.LowRankAdapter.init(64, 64, rank=2, seed=1)
    assert torch.count_nonzero(adapter.b) == 0 and adapter.rank == 2
    before = ts.select(gpt2_hf).at("transformer.h.0.mlp").insert_before(adapter)
    with pytest.raises(RuntimeError, match="insert_after"):
        before(pairs()[0])
    wrong = ts.select(gpt2_hf).at("transformer.h.0.mlp.c_fc").insert_after(adapter)
    with pytest.raises(ValueError, match="adapter maps 64 -> 64"):
        wrong(pairs()[0])
    with pytest.raises(ValueError, match="ranks disagree"):
        ts.layers.LowRankAdapter(torch.zeros(2, 64), torch.zeros(64, 3))


# --------------------------------------------------------------------------- plots and grids


def test_effect_grid_helpers() -> None:
    grid = M.EffectGrid(
        torch.tensor([[0.0, 2.0], [1.0, -3.0]]),
        ("L0", "L1"),
        ("a", "b"),
        "layer",
        "pos",
        "t",
        "m",
        clean_metric=3.0,
        corrupted_metric=1.0,
    )
    assert grid.top(1) == [("L0", "b", 2.0)]
    assert grid.top(1, by_magnitude=True) == [("L1", "b", -3.0)]
    assert grid.argmax() == (0, 1)
    assert torch.equal(grid.normalized(), grid.values / 2)
    with pytest.raises(ValueError, match="labels give"):
        M.EffectGrid(torch.zeros(2, 2), ("L0",), ("a", "b"), "layer", "pos", "t", "m")


def test_plots_return_figures_and_write_png(gpt2_hf: nn.Module, tmp_path: Path) -> None:
    require("matplotlib")
    from torchsurgeon.methods import plots

    clean, corrupted = pairs()
    grid = M.activation_patching(gpt2_hf, clean, corrupted, METRIC)
    estimate = M.attribution_patching(gpt2_hf, clean, corrupted, METRIC)
    lens = M.logit_lens(gpt2_hf, clean[0])
    forced = M.force_neurons(gpt2_hf, clean, {1: [3]}, 5.0)
    ids = torch.randint(2, VOCAB, (24, 6), generator=torch.Generator().manual_seed(9))
    probe = M.train_probe(gpt2_hf, ids, (ids < 50).long(), position=None, steps=20)
    lora = M.train_lora(gpt2_hf, ids, rank=1, steps=3)
    figures = {
        "heatmap": plots.heatmap(grid, normalized=True),
        "heads": plots.heatmap(M.head_knockout(gpt2_hf, clean, METRIC)),
        "lens": plots.token_table(lens),
        "scatter": plots.scatter(estimate, grid),
        "probe": plots.probe_accuracy(probe),
        "lora": plots.loss_curve(lora),
        "shift": plots.token_shift(forced),
    }
    for name, figure in figures.items():
        path = plots.save(figure, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (plots.heatmap(grid, path=tmp_path / "direct.png") is not None) and (
        tmp_path / "direct.png"
    ).exists()


# --------------------------------------------------------------------------- the toy model


def _induction_scores(model: nn.Module, period: int) -> torch.Tensor:
    """Written here, independently of the library: mean attention from each second-copy
    position ``i`` to ``i - period + 1`` on random tokens repeated once, per layer and head."""
    g = torch.Generator().manual_seed(1234)
    block_ = torch.stack([torch.randperm(64, generator=g)[:period] for _ in range(64)])
    ids = torch.cat([block_, block_], dim=1)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    query = torch.arange(period, 2 * period)
    return torch.stack([a[:, :, query, query - period + 1].mean((0, 2)) for a in attentions])


@pytest.mark.slow
def test_head_patching_ranks_the_toy_models_induction_head_first() -> None:
    toy = M.toy.induction_model(ToyRecipe())
    assert toy.accuracy > 0.95, f"the toy model copies only {toy.accuracy:.1%} of repeats"
    eager = M.toy.induction_model(ToyRecipe(), attn_implementation="eager").model
    scores = torch.stack([_induction_scores(eager, period) for period in (6, 8, 10)]).mean(0)
    clean, corrupted, correct, wrong = M.toy.induction_pairs(32, seed=3)
    grid = M.activation_patching(
        toy.model, clean, corrupted, M.LogitDiff(correct, wrong), over="heads"
    )
    by_score = divmod(int(scores.argmax()), scores.shape[1])
    by_patching = grid.argmax()
    print(f"\ninduction scores\n{scores}\nhead patching effects\n{grid.values}")
    assert by_patching == by_score
    assert by_score[0] == 1  # an induction head sits in the second layer
    assert scores.max() > 0.5 and grid.normalized().max() > 0.3


# --------------------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_patching_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "patching.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "batched and per-site results agree" in done.stdout
    assert "| method |" in done.stdout


@pytest.mark.slow
def test_methods_page_examples_run() -> None:
    """The code blocks of ``docs/methods.md``, in order, in one namespace."""
    require("matplotlib")
    text = (ROOT / "docs" / "methods.md").read_text()
    namespace: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "docs/methods.md", "exec"), namespace)
    assert namespace["heads"].argmax()[0] == 1  # the top head is a layer-1 (induction) head
