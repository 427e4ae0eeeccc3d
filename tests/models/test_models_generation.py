"""Generation: the KV cache, sampling, and interventions at every step or only some.

``tsm.generate`` takes explicit models and ``transformers`` causal LMs alike (plain, wrapped,
rewritten): greedy tokens must equal ``transformers``' own ``generate``, sampled tokens the
conversion's, and a wrapped model's intervention layers must act at every step.

An intervention here is a forward hook that adds a large vector to ``blocks.1.resid_post``.
Restricting it to generated tokens two ways — generating with the hooked model but reading
the prompt with the base model (``prompt_model=``), or hooking on the ``positions`` a hook
point receives — must agree with each other and with a reference that recomputes the whole
sequence without a cache at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import torchsurgeon as ts
import torchsurgeon.models as tsm
from torchsurgeon.layers.transformer import KVCache

PROMPT = 10
SITE = "blocks.1.resid_post"


def _steering(d_model: int, only_from: int | None = None) -> Callable[..., torch.Tensor]:
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(5)) * 5

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if only_from is None:
            return out + vector
        positions = args[1]  # [pos]: sequence index of each token of this call
        return out + vector * (positions >= only_from)[:, None].to(out.dtype)

    return hook


def test_cache_gives_the_same_logits_as_one_pass(
    causal_family: str, hf_models: Callable[[str], nn.Module], prompts: tuple[torch.Tensor, ...]
) -> None:
    # Phi-3's longrope picks its frequencies per call from the call's largest position (as
    # transformers does): a prefix is only cached with the long factors a whole pass uses
    # when it already reaches past original_max_position_embeddings (8 in the zoo).
    cut = 9 if causal_family == "phi3" else 6
    ids, mask = prompts
    model = tsm.convert(hf_models(causal_family))
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        cache = model.new_cache()
        first = model(ids[:, :cut], attention_mask=mask[:, :cut], cache=cache)
        # The second call passes the mask of every token so far, as transformers does.
        second = model(ids[:, cut:], attention_mask=mask, cache=cache)
    assert cache.length == ids.shape[1]
    pieces = torch.cat((first, second), dim=1)
    assert (pieces - whole)[mask.bool()].abs().max() <= 1e-4


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("llama"))
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    first = tsm.generate(model, ids, 12, do_sample=True, temperature=1.5, seed=7)
    again = tsm.generate(model, ids, 12, do_sample=True, temperature=1.5, seed=7)
    other = tsm.generate(model, ids, 12, do_sample=True, temperature=1.5, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    greedy = tsm.generate(model, ids, 12)
    assert torch.equal(tsm.generate(model, ids, 12, do_sample=True, top_k=1, seed=3), greedy)


def test_hooks_run_at_every_step(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("mistral"))
    calls: list[int] = []
    handle = model.get_submodule(SITE).register_forward_hook(
        lambda module, args, out: calls.append(out.shape[1])
    )
    tsm.generate(model, torch.ones(1, PROMPT, dtype=torch.long), 5)
    handle.remove()
    assert calls == [PROMPT, 1, 1, 1, 1]


def _no_cache_greedy(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_intervention_on_generated_tokens_only(
    family_name: str, hf_models: Callable[[str], nn.Module]
) -> None:
    hf = hf_models(family_name)
    ids = torch.randint(3, 200, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    d_model = hf.config.hidden_size
    base = tsm.convert(hf)
    always = tsm.convert(hf)  # a second view on the same weights, hooked
    always.get_submodule(SITE).register_forward_hook(_steering(d_model))
    later = tsm.convert(hf)
    later.get_submodule(SITE).register_forward_hook(_steering(d_model, only_from=PROMPT))

    by_model_swap = tsm.generate(always, ids, 8, prompt_model=base)
    by_positions = tsm.generate(later, ids, 8)
    reference = _no_cache_greedy(later, ids, 8)
    assert torch.equal(by_model_swap, reference)
    assert torch.equal(by_positions, reference)
    assert not torch.equal(reference, tsm.generate(base, ids, 8))
    assert not torch.equal(reference, tsm.generate(always, ids, 8))


def test_intervention_on_the_prompt_only(hf_models: Callable[[str], nn.Module]) -> None:
    hf = hf_models("qwen2")
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    base, probe = tsm.convert(hf), tsm.convert(hf)
    probe.get_submodule(SITE).register_forward_hook(_steering(hf.config.hidden_size))
    got = tsm.generate(base, ids, 6, prompt_model=probe)
    # Reference: the prompt's keys and values come from the hooked model, later steps not.
    cache = KVCache.empty(base.config.n_layers)
    with torch.no_grad():
        token = probe(ids, cache=cache)[:, -1].argmax(-1)
        tokens = [token]
        for _ in range(5):
            token = base(token[:, None], cache=cache)[:, -1].argmax(-1)
            tokens.append(token)
    assert torch.equal(got[:, PROMPT:], torch.stack(tokens, 1))
    assert not torch.equal(got, tsm.generate(base, ids, 6))


def test_modules_hold_no_per_call_state(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("gemma2"))

    def snapshot() -> list[tuple[str, dict[str, int]]]:
        return [
            (name, {key: id(value) for key, value in vars(module).items()})
            for name, module in model.named_modules()
        ]

    before = snapshot()
    tsm.generate(model, torch.ones(2, 4, dtype=torch.long), 3)
    assert snapshot() == before


def test_generate_rejects_bad_input(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("llama"))
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tsm.generate(model, ids, -1)
    with pytest.raises(ValueError, match="temperature"):
        tsm.generate(model, ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        tsm.generate(model, ids.float(), 2)
    with pytest.raises(ValueError, match="not a causal"):
        tsm.generate(tsm.convert(hf_models("bert")), ids, 2)
    with pytest.raises(TypeError, match=r"explicit model .* or a transformers causal LM"):
        tsm.generate(nn.Linear(2, 2), ids, 2)
    assert torch.equal(tsm.generate(model, ids, 0), ids)


# ----------------------------------------------------------------- transformers models


def test_generate_takes_transformers_models(
    causal_family: str,
    hf_models: Callable[[str], nn.Module],
    prompts: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # The same loop drives a transformers model (through its own cache) and its conversion:
    # greedy tokens equal transformers' generate; sampled ones equal the conversion's.
    ids, mask = prompts
    hf = hf_models(causal_family)
    with torch.no_grad():
        expected = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    converted = tsm.convert(hf)
    # Phi-3's longrope rotary module writes its inverse frequencies during forward: a frozen
    # tree lets a module's own code update its caches, so the wrapped model runs too.
    wrapped = ts.wrap(hf)
    for model in (hf, wrapped):
        assert torch.equal(tsm.generate(model, ids, 12, attention_mask=mask), expected)
    assert torch.equal(tsm.generate(converted, ids, 12, attention_mask=mask), expected)
    sample: dict[str, object] = {"do_sample": True, "temperature": 1.3, "top_k": 20, "seed": 5}
    sampled = tsm.generate(wrapped, ids, 12, attention_mask=mask, **sample)
    assert torch.equal(sampled, tsm.generate(converted, ids, 12, attention_mask=mask, **sample))
    assert not torch.equal(sampled, expected)


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_generate_applies_a_wrapped_models_interventions(
    family_name: str, hf_models: Callable[[str], nn.Module]
) -> None:
    hf = hf_models(family_name)
    blocks = {"gpt2": "transformer.h", "llama": "model.layers"}[family_name]
    ids = torch.randint(3, 200, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    vector = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(5)) * 5
    base = ts.wrap(hf)
    probe = ts.select(base).at(f"{blocks}.1").insert_after(ts.layers.Add(vector))
    converted = tsm.convert(hf)
    explicit = ts.select(converted).at("blocks.1").insert_after(ts.layers.Add(vector))
    calls: list[int] = []

    def steer_later(module: nn.Module, args: object, output: object) -> object:
        calls.append(1)  # reference: plain transformers generate, hooked after the prompt pass
        if len(calls) == 1:
            return output
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    handle = hf.get_submodule(f"{blocks}.1").register_forward_hook(steer_later)
    try:
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert torch.equal(tsm.generate(probe, ids, 6, prompt_model=base), expected)
    assert torch.equal(tsm.generate(explicit, ids, 6, prompt_model=converted), expected)
    assert not torch.equal(expected, tsm.generate(base, ids, 6))
    with pytest.raises(TypeError, match="both be explicit models or both transformers"):
        tsm.generate(probe, ids, 6, prompt_model=converted)


def test_generate_refuses_base_models(hf_models: Callable[[str], nn.Module]) -> None:
    ids = torch.ones(1, 3, dtype=torch.long)
    hf = hf_models("llama")
    with pytest.raises(ValueError, match=r"LlamaModel cannot generate.*ForCausalLM"):
        tsm.generate(hf.model, ids, 2)
    with pytest.raises(ValueError, match=r"base model.*returns hidden states"):
        tsm.generate(tsm.convert(hf.model), ids, 2)
