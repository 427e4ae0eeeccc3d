"""Every method on a padded batch gives what each prompt gives alone, unpadded.

Prompts of different lengths are batched twice — padded on the left and on the right — with
their ``attention_mask``; each method's result must equal the reference built from the same
prompts run one at a time without padding: plain ``transformers`` models with hand-written
``register_forward_hook`` code, or the method itself on one unpadded prompt where the
method's single-prompt result is already checked against hooks in ``tests/test_methods.py``.
The references never pad, so a method that reads a pad as "the last position", or averages
padding in, fails here (the naive reading is shown to be far off each time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hook_reference import VOCAB, hooks, max_diff
from torch import nn

from torchsurgeon import methods as M

TOL = 1e-5
LAYERS = 3
FAMILY = pytest.mark.parametrize("family", ["gpt2", "llama"])
SIDES = pytest.mark.parametrize("side", ["left", "right"])
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}
DOWN = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}


@pytest.fixture(scope="module")
def models(gpt2_hf: nn.Module, llama_hf: nn.Module) -> dict[str, nn.Module]:
    return {"gpt2": gpt2_hf, "llama": llama_hf}


def prompts(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: the prompts padded with token 0 to the longest, on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


def block_outputs(model: nn.Module, family: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output on one unpadded prompt, by plain hooks: ``[pos, d]`` per layer."""
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            kept[layer] = (output[0] if isinstance(output, tuple) else output)[0]

        return hook

    post = {f"{BLOCKS[family]}.{i}": keep(i) for i in range(LAYERS)}
    with hooks(model, post=post), torch.no_grad():
        model(ids[None])
    return [kept[i] for i in range(LAYERS)]


@FAMILY
@SIDES
def test_steering_vector_reads_each_rows_last_real_token(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    positive, negative = prompts(0, [6, 3, 5]), prompts(1, [4, 6, 2])
    expected = torch.stack([block_outputs(model, family, p)[1][-1] for p in positive]).mean(0)
    expected -= torch.stack([block_outputs(model, family, p)[1][-1] for p in negative]).mean(0)
    (pos_ids, pos_mask), (neg_ids, neg_mask) = pad(positive, side), pad(negative, side)
    vector = M.steering_vector(
        model, pos_ids, neg_ids, layer=1, positive_mask=pos_mask, negative_mask=neg_mask
    )
    assert max_diff(vector, expected) <= TOL
    # A tokenizer's output (a mapping with the mask) reads the same.
    encoded = M.steering_vector(
        model,
        {"input_ids": pos_ids, "attention_mask": pos_mask},
        {"input_ids": neg_ids, "attention_mask": neg_mask},
        layer=1,
    )
    assert max_diff(encoded, expected) <= TOL
    naive = M.steering_vector(model, pos_ids, neg_ids, layer=1)  # pads read as positions
    assert max_diff(naive, expected) > 1e-2


@FAMILY
@SIDES
def test_force_neurons_forces_each_rows_own_last_token(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    rows = prompts(2, [5, 3, 6, 4])
    ids, mask = pad(rows, side)
    neurons = {1: [3, 7], 2: [5]}
    result = M.force_neurons(
        model, ids, neurons, 5.0, rows=slice(1, None), top_k=4, attention_mask=mask
    )

    assert result.forced_rows == (1, 2, 3)
    for row, prompt in enumerate(rows):
        real = mask[row].bool()
        pre = {}
        if row >= 1:  # forced alone: the prompt's last position, by a hand-written pre-hook
            pre = {
                f"{BLOCKS[family]}.{layer}.{DOWN[family]}": _force_last(chosen)
                for layer, chosen in neurons.items()
            }
        with hooks(model, pre=pre), torch.no_grad():
            alone = model(prompt[None]).logits[0]
        with torch.no_grad():
            plain = model(prompt[None]).logits[0]
        assert max_diff(result.logits[row][real], alone) <= TOL
        assert max_diff(result.base_logits[row][real], plain) <= TOL
        assert int(result.positions[row]) == int(real.nonzero().max())
        shift = alone[-1].log_softmax(-1) - plain[-1].log_softmax(-1)
        assert max_diff(result.shift[row], shift) <= TOL
        if row >= 1:
            assert torch.equal(result.top_ids[row], shift.topk(4).indices)
            assert shift.abs().max() > 1e-3
        else:
            assert result.top_labels[row] == () and (result.top_ids[row] == -1).all()


def _force_last(chosen: list[int]) -> Callable[..., tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[:, -1, chosen] = 5.0
        return (x, *args[1:])

    return hook


@FAMILY
@SIDES
def test_logit_lens_of_a_padded_prompt_is_the_unpadded_lens(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    prompt = prompts(3, [5])[0]
    ids, mask = pad([prompt, torch.arange(2, 9)], side)
    padded = M.logit_lens(model, ids[:1], attention_mask=mask[:1], top_k=3)
    alone = M.logit_lens(model, prompt, top_k=3)
    assert padded.log_probs.shape == alone.log_probs.shape == (LAYERS, 5, VOCAB)
    assert max_diff(padded.log_probs, alone.log_probs) <= TOL
    assert padded.position_labels == alone.position_labels
    assert torch.equal(padded.top_ids, alone.top_ids)


@FAMILY
@SIDES
def test_probe_features_skip_padding(family: str, side: str, models: dict[str, nn.Module]) -> None:
    model = models[family]
    rows = prompts(4, [6, 2, 4, 5, 3, 6])
    ids, mask = pad(rows, side)
    alone = [block_outputs(model, family, p) for p in rows]
    last = M.residual_features(model, ids, position=-1, attention_mask=mask, batch_size=4)
    expected = torch.stack([torch.stack([a[layer][-1] for a in alone]) for layer in range(3)])
    assert max_diff(last, expected) <= TOL
    first = M.residual_features(model, ids, position=0, attention_mask=mask)
    expected = torch.stack([torch.stack([a[layer][0] for a in alone]) for layer in range(3)])
    assert max_diff(first, expected) <= TOL
    every = M.residual_features(model, ids, position=None, attention_mask=mask, batch_size=4)
    expected = torch.stack([torch.cat([a[layer] for a in alone]) for layer in range(3)])
    assert every.shape == (LAYERS, sum(len(r) for r in rows), 64)
    assert max_diff(every, expected) <= TOL

    # Per-token labels at padding are no examples: garbage there changes nothing.
    labels = torch.zeros_like(ids)
    token_labels = [(r % 2) for r in rows]
    for i, row in enumerate(token_labels):
        labels[i, mask[i].bool()] = row
    labels[mask == 0] = 7
    result = M.train_probe(
        model, ids, labels, position=None, steps=40, attention_mask=mask, batch_size=4
    )
    reference = M.fit_probe(expected[1], torch.cat(token_labels), steps=40)
    assert result.probes[1].test_accuracy == reference.test_accuracy
    assert max_diff(result.probes[1].weight, reference.weight) <= 1e-4
    assert result.n_train + result.n_test == sum(len(r) for r in rows)


@FAMILY
@SIDES
def test_head_means_and_head_knockout_on_padded_prompts(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    rows = prompts(5, [6, 3, 5])
    ids, mask = pad(rows, side)
    out_proj = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj"}[family]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}
    for prompt in rows:
        pre = {
            f"{BLOCKS[family]}.{i}.{out_proj}": (
                lambda m, a, i=i: inputs[i].append(a[0][0].detach())
            )
            for i in range(LAYERS)
        }
        with hooks(model, pre=pre), torch.no_grad():
            model(prompt[None])
    expected = torch.stack([torch.cat(inputs[i]).mean(0) for i in range(LAYERS)])
    means = M.head_means(model, ids, reference_mask=mask)
    assert max_diff(means, expected.reshape(LAYERS, 4, 16)) <= TOL
    naive = M.head_means(model, ids)
    assert max_diff(naive, expected.reshape(LAYERS, 4, 16)) > 1e-3

    metric = M.LogitDiff([5, 6, 7], [8, 9, 10])
    grid = M.head_knockout(model, ids, metric, attention_mask=mask, max_rows=10)
    alone = [
        M.head_knockout(model, p, M.LogitDiff(c, w)).values
        for p, c, w in zip(rows, [5, 6, 7], [8, 9, 10], strict=True)
    ]
    assert max_diff(grid.values, torch.stack(alone).mean(0)) <= TOL
    assert torch.stack(alone).abs().max() > 1e-3
    mean_grid = M.head_knockout(model, ids, metric, mode="mean", attention_mask=mask)
    assert mean_grid.values.shape == (LAYERS, 4)


@FAMILY
@SIDES
def test_attribution_patching_on_padded_pairs(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    clean = prompts(6, [6, 4])
    corrupted = [c.clone() for c in clean]
    for c in corrupted:
        c[1] = (c[1] + 5) % VOCAB
    (clean_ids, mask), (corrupted_ids, _) = pad(clean, side), pad(corrupted, side)
    metric = M.LogitDiff([5, 6], [7, 8])
    for over in ("resid", "heads"):
        grid = M.attribution_patching(
            model, clean_ids, corrupted_ids, metric, over=over, attention_mask=mask
        )
        # The metric is a mean over pairs: each pair contributes half its own estimate.
        parts = []
        for c, x, right, wrong in zip(clean, corrupted, [5, 6], [7, 8], strict=True):
            alone = M.attribution_patching(model, c, x, M.LogitDiff(right, wrong), over=over)
            values = alone.values / 2
            if over == "resid":
                values = torch.nn.functional.pad(values, (0, 6 - values.shape[1]))
            parts.append(values)
        expected = parts[0] + parts[1]
        assert grid.values.shape == expected.shape
        assert max_diff(grid.values, expected) <= TOL
        assert expected.abs().max() > 1e-3


@FAMILY
@SIDES
def test_causal_tracing_of_a_padded_prompt(
    family: str, side: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    prompt = prompts(7, [5])[0]
    ids, mask = pad([prompt, torch.arange(2, 9)], side)
    kwargs: dict[str, Any] = {"answer": 9, "std": 0.5, "samples": 2, "seed": 3}
    padded = M.causal_tracing(model, ids[:1], [1, 2], attention_mask=mask[:1], **kwargs)
    alone = M.causal_tracing(model, prompt, [1, 2], **kwargs)
    assert padded.values.shape == alone.values.shape == (LAYERS, 5)
    assert max_diff(padded.values, alone.values) <= TOL
    assert padded.col_labels == alone.col_labels


@FAMILY
def test_train_lora_loss_ignores_padding(family: str, models: dict[str, nn.Module]) -> None:
    model = models[family]
    rows = prompts(8, [6, 3, 5, 4])
    left, left_mask = pad(rows, "left")
    right, right_mask = pad(rows, "right")
    # The loss is next-token cross-entropy over the real tokens, computed prompt by prompt.
    losses = []
    for prompt in rows:
        with torch.no_grad():
            logits = model(prompt[None]).logits[0]
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], prompt[1:], reduction="none"))
    expected = float(torch.cat(losses).mean())
    kwargs: dict[str, Any] = {"rank": 2, "steps": 8, "lr": 2e-2}
    a = M.train_lora(model, left, attention_mask=left_mask, **kwargs)
    b = M.train_lora(model, right, attention_mask=right_mask, **kwargs)
    assert abs(a.initial_loss - expected) <= TOL and abs(b.initial_loss - expected) <= TOL
    assert max_diff(a.losses, b.losses) <= 1e-4  # the same training, whatever the padding
    assert a.final_loss < a.initial_loss
    naive = M.train_lora(model, right, **{**kwargs, "steps": 0})
    assert abs(naive.initial_loss - expected) > 1e-2


@FAMILY
def test_steer_positions_count_each_rows_real_tokens(
    family: str, models: dict[str, nn.Module]
) -> None:
    model = models[family]
    rows = prompts(9, [6, 4])
    ids, mask = pad(rows, "left")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    kwargs: dict[str, Any] = {"layers": [1], "scale": 4.0, "max_new_tokens": 4}
    batched = M.steer(
        model, ids, vector, positions=[1, -1], attention_mask=mask, do_sample=False, **kwargs
    )
    for row, prompt in enumerate(rows):
        alone = M.steer(model, prompt, vector, positions=[1, -1], do_sample=False, **kwargs)
        assert torch.equal(batched.new_tokens[row], alone.new_tokens[0])
    unsteered = M.steer(
        model, ids, vector * 0, positions=[1, -1], attention_mask=mask, do_sample=False, **kwargs
    )
    assert (unsteered.new_tokens != batched.new_tokens).any(dim=1).all()  # the vector matters


def test_a_mask_that_does_not_fit_is_refused(gpt2_hf: nn.Module) -> None:
    ids, mask = pad(prompts(0, [4, 3]), "left")
    with pytest.raises(ValueError, match="must match"):
        M.logit_lens(gpt2_hf, ids[:1], attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="all padding"):
        M.force_neurons(gpt2_hf, ids, {0: [1]}, attention_mask=torch.zeros_like(mask))
    with pytest.raises(IndexError, match="real tokens"):
        M.residual_features(gpt2_hf, ids, position=3, attention_mask=mask)
