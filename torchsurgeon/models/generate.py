"""Text generation with the explicit models: greedy or sampled, one KV cache per call.

``generate`` runs the prompt through the model once, then feeds back one token at a time,
keeping keys and values in a :class:`~torchsurgeon.layers.transformer.KVCache` it creates
for the call. Because the model is called at every step, interventions inserted in it
(forward hooks, intervention layers) apply at every step.

Restricting an intervention to part of the sequence needs no special machinery:

- **prompt only / generated only**: pass two models that share their weights — the
  rewritten one and the base — as ``prompt_model`` and ``model``. ``generate(base, ids, n,
  prompt_model=probe)`` intervenes while reading the prompt only; ``generate(probe, ids, n,
  prompt_model=base)`` intervenes on generated tokens only. Both share the one cache.
- **by position**: hook points (``resid_pre``, ``resid_mid``, ``resid_post``,
  ``attn.head_out``) receive ``positions``, the sequence index of each token of the call;
  a forward hook can act only where ``positions >= prompt_length``.
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.layers.transformer import KVCache

__all__ = ["generate"]


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

    Greedy by default (the most likely token each step); with ``do_sample`` tokens are drawn
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely, using a
    generator seeded with ``seed`` (the same seed gives the same tokens). Pad prompts on the
    left and pass ``attention_mask`` (1 = token, 0 = padding). Exactly ``max_new_tokens`` are
    generated (no stopping at an end-of-sequence token). ``prompt_model`` (default:
    ``model``) reads the prompt; see the module docstring.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "n_layers"):
        raise TypeError(
            "generate expects an explicit model from torchsurgeon.models.load or convert (or a "
            f"rewrite of one), got {type(model).__name__}"
        )
    if not config.causal:
        raise ValueError(f"{config.family} is not a causal language model; it cannot generate")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be integer token ids [batch, pos], got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    generator = None
    if do_sample:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    cache = KVCache.empty(config.n_layers)
    new_tokens: list[torch.Tensor] = []
    with torch.no_grad():
        reader = prompt_model if prompt_model is not None else model
        logits = reader(input_ids, attention_mask=attention_mask, cache=cache)
        for step in range(max_new_tokens):
            token = _next_token(logits[:, -1], do_sample, temperature, top_k, generator)
            new_tokens.append(token)
            if step + 1 < max_new_tokens:
                logits = model(token[:, None], cache=cache)
    if not new_tokens:
        return input_ids
    return torch.cat((input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)), dim=1)


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
