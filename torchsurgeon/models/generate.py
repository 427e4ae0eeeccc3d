"""Text generation, greedy or sampled, through a KV cache: one loop for every causal LM.

``generate`` runs the prompt through the model once, then feeds back one token at a time
through a KV cache created for the call. It takes the explicit models of this package
(:func:`~torchsurgeon.models.load`, :func:`~torchsurgeon.models.convert`, or a rewrite of
one; the cache is a :class:`~torchsurgeon.layers.transformer.KVCache`) and ``transformers``
causal LMs, plain, wrapped or rewritten (the cache is the model's own, passed back to its
``forward`` as ``generate`` would; positions skip left padding as ``generate`` computes
them). The loop, the token choice and the seeded sampler are the same for both, so a
``transformers`` model and its conversion generate the same tokens, sampled ones included.
For ``transformers``' own decoding options (beam search, stopping criteria, logits
processors) call the model's ``.generate``: interventions inserted in a wrapped model apply
there too.

Because the model is called at every step, interventions inserted in it (forward hooks,
intervention layers) apply at every step. Restricting an intervention to part of the
sequence needs no special machinery:

- **prompt only / generated only**: pass two models that share their weights — the
  rewritten one and the base — as ``prompt_model`` and ``model``. ``generate(base, ids, n,
  prompt_model=probe)`` intervenes while reading the prompt only; ``generate(probe, ids, n,
  prompt_model=base)`` intervenes on generated tokens only. Both share the one cache.
- **by position** (explicit models): hook points (``resid_pre``, ``resid_mid``,
  ``resid_post``, ``attn.head_out``) receive ``positions``, the sequence index of each token
  of the call; a forward hook can act only where ``positions >= prompt_length``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.transformer import KVCache
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.frozen import original_class

__all__ = ["generate"]

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``step(module, new_tokens, mask_so_far) -> logits``, keeping the cache between calls."""


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_model: nn.Module | None = None,
) -> torch.Tensor:
    """``input_ids`` followed by ``max_new_tokens`` generated tokens, ``[batch, pos + new]``.

    ``model`` is an explicit model or a ``transformers`` causal LM (plain, wrapped or
    rewritten). Greedy by default (the most likely token each step); with ``do_sample``
    tokens are drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    likely, using a generator seeded with ``seed`` (the same seed gives the same tokens).
    Pad prompts on the left and pass ``attention_mask`` (1 = token, 0 = padding). Exactly
    ``max_new_tokens`` are generated (no stopping at an end-of-sequence token; the model's
    generation config is not read). ``prompt_model`` (default: ``model``, of the same kind)
    reads the prompt; see the module docstring.
    """
    step = _stepper(model, "model")
    if prompt_model is not None and _stepper(prompt_model, "prompt_model") is not step:
        raise ArgumentTypeError(
            "prompt_model and model must both be explicit models or both transformers models "
            f"(they share one KV cache); got {type(prompt_model).__name__} and "
            f"{type(model).__name__}"
        )
    _check_ids(input_ids)
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ArgumentError(
            f"attention_mask must be [batch, pos] like input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ArgumentError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ArgumentError(f"temperature must be > 0 (1.0: the model's own), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ArgumentError(f"top_k must be >= 1 or None (every token), got {top_k!r}")
    generator = None
    if do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    call = step(model)
    new_tokens: list[torch.Tensor] = []
    with torch.no_grad():
        reader = prompt_model if prompt_model is not None else model
        logits = call(reader, input_ids, mask)
        for index in range(max_new_tokens):
            token = _next_token(logits[:, -1], do_sample, temperature, top_k, generator)
            new_tokens.append(token)
            if index + 1 < max_new_tokens:
                mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
                logits = call(model, token[:, None].to(input_ids.dtype), mask)
    if not new_tokens:
        return input_ids
    return torch.cat((input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)), dim=1)


class TokenIdsError(ArgumentTypeError, ValueError):
    """Token ids that are not integers: ``ts.run``'s :class:`ArgumentTypeError`, and still the
    ``ValueError`` that ``generate`` raised for them before."""


def _check_ids(input_ids: Any) -> None:
    """Refuse token ids that are not an integer ``[batch, pos]`` tensor, naming ``input_ids``."""
    if not isinstance(input_ids, torch.Tensor):
        raise ArgumentTypeError(
            f"input_ids: token ids are a torch.long tensor [batch, pos], got "
            f"{type(input_ids).__name__}; e.g. torch.tensor([[ids...]])"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TokenIdsError(
            f"input_ids: token ids are integers (torch.long), got a {input_ids.dtype} tensor of "
            f"shape {tuple(input_ids.shape)}; convert token ids with ids.long()"
        )
    if input_ids.dim() != 2:
        raise ArgumentError(
            f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}; a single "
            "sequence is ids[None]"
        )


def _explicit(model: nn.Module) -> Step:
    cache = KVCache.empty(model.config.n_layers)

    def step(module: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return module(ids, attention_mask=mask, cache=cache)

    return step


def _transformers(model: nn.Module) -> Step:
    forward = inspect.signature(original_class(model).forward).parameters
    name = "cache" if "cache" in forward else "past_key_values"  # transformers 5.24 renamed it
    state: dict[str, Any] = {name: None}

    def step(module: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only, as transformers' generate computes them.
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
        output = module(ids, attention_mask=mask, position_ids=positions, use_cache=True, **state)
        state[name] = getattr(output, name, None)
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise ArgumentTypeError(
                f"model: {type(module).__name__} returned no logits; it cannot generate (pass "
                "its ...ForCausalLM / LMHeadModel class)"
            )
        return logits

    return step


def _stepper(model: nn.Module, argument: str) -> Callable[[nn.Module], Step]:
    """How to call ``model`` step by step, or an error naming ``argument`` and what generates."""
    config = getattr(model, "config", None)
    name = original_class(model).__name__
    if config is not None and hasattr(config, "n_layers"):  # an explicit Transformer
        if not config.causal:
            raise ArgumentError(
                f"{argument}: {config.family} is not a causal language model; it cannot "
                "generate (load or convert a causal LM: gpt2, llama, ...)"
            )
        if getattr(model, "unembed", None) is None:
            raise ArgumentError(
                f"{argument}: this {config.family} model is a base model (converted from a "
                "class without a language-model head): it returns hidden states, not logits; "
                "convert or load the ...ForCausalLM / LMHeadModel class to generate"
            )
        return _explicit
    can_generate = getattr(model, "can_generate", None)
    if config is not None and callable(can_generate):  # a transformers PreTrainedModel
        if not can_generate():
            raise ArgumentError(
                f"{argument}: {name} cannot generate (transformers' can_generate() is False: "
                "no causal language-model head); use its ...ForCausalLM / LMHeadModel class"
            )
        return _transformers
    raise ArgumentTypeError(
        f"generate expects, as {argument}, an explicit model (torchsurgeon.models.load or "
        "convert, or a rewrite of one) or a transformers causal LM (plain or ts.wrap-ped), "
        f"got {name}"
    )


def _next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
