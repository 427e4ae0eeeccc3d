"""Steering: add a vector to the residual stream while the model generates.

A steering vector (for instance the difference of the mean residual stream on two contrasting
prompts, :func:`steering_vector`) added after chosen blocks pushes generation toward one
side. As a rewrite it is one ``Add(vector, scale)`` after each chosen block;
:func:`steering_model` returns that model, and ``model.generate`` on it steers every step.

Often the vector should reach only some positions: only the prompt, only the tokens being
generated, or a few prompt positions. During ``generate`` the first forward pass reads the
whole prompt and every later pass reads one new token (the rest is in the KV cache), so
:func:`steer` runs the prompt pass with one model and the later steps with another, both
ordinary rewrites of the same base:

==================  ======================================  ==========================
``positions``       prompt pass                             each later step
==================  ======================================  ==========================
``"all"``           ``Add`` at every position               ``Add`` (the new token)
``"prompt"``        ``Add`` at every position               nothing
``"generated"``     nothing                                 ``Add`` (the new token)
``[p, ...]``        ``Add(index=ts.idx[:, [p, ...]])``      nothing
==================  ======================================  ==========================

For a ``transformers`` model the switch is two ``generate`` calls: the first makes one token
and returns its KV cache, the second continues from that cache, so nothing is recomputed.
Greedy and sampled decoding, logits processors and stopping work as in one call; a row whose
first new token is an end-of-sequence token is padded from there, as ``generate`` would. An
explicit model (``ts.load`` / ``ts.convert``) generates with
:func:`torchsurgeon.models.generate`, whose ``prompt_model=`` is the same switch.

Prompts padded on the left come with ``attention_mask=``: a list of prompt positions then
counts each row's real tokens (``-1`` is each row's last token), and
:func:`steering_vector` reads each row's own last token and averages over real rows only.

On a host (``backend=client``) :func:`steer` is one ``generate`` request: the switch between
the prompt pass and the later steps is the ``Add`` layers' ``steps=`` (``0``: the prompt's
pass; ``slice(1, None)``: every later step), one model for the whole call, and the tokens
come back. They equal the local ones: greedy decoding, or sampling with ``seed=`` (the host
seeds its generator with it; locally ``steer`` then samples under
``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``, as the host does).
:func:`steering_vector` takes ``backend=`` too: both sides in one request.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.layers.base import Steps
from torchsurgeon.layers.edit import Add
from torchsurgeon.layers.expr import saved
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.record import Save
from torchsurgeon.layers.results import Backend, run
from torchsurgeon.methods.batching import rewrite_at
from torchsurgeon.methods.layout import ModelLayout, layout_of, n_layers
from torchsurgeon.methods.patching import pick_layers, pick_positions
from torchsurgeon.methods.remote import Run, plan_of, run_plans
from torchsurgeon.methods.tokens import (
    Decoder,
    forward_kwargs,
    inputs,
    token_index,
    token_label,
)
from torchsurgeon.models.generate import generate
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.frozen import wrap

__all__ = ["Steering", "steer", "steering_model", "steering_vector"]

Positions = Literal["all", "prompt", "generated"] | Sequence[int]
_MANAGED = (
    "return_dict_in_generate",
    "past_key_values",
    "cache",
    "max_new_tokens",
    "output_scores",
)


# transformers renamed ``generate``'s ``past_key_values`` to ``cache`` (5.24 warns on the old
# name); pass whichever this version reads.
@functools.cache
def _cache_kwarg() -> str:
    """``generate``'s name for a KV cache (read on use: transformers.generation pulls in
    torch._dynamo, a second of CPU at ``import torchsurgeon``)."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", ())
    return "cache" if "cache" in names else "past_key_values"


@dataclass(frozen=True)
class Steering:
    """Steered generation: the full sequences and what was steered.

    ``sequences`` is ``[batch, prompt + new]``; ``new_labels`` the generated tokens' text
    per row (ids when there was no decoder).
    """

    sequences: torch.Tensor
    prompt_length: int
    layers: tuple[int, ...]
    scale: float
    positions: str | tuple[int, ...]
    new_labels: tuple[tuple[str, ...], ...]

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated tokens, ``[batch, new]``."""
        return self.sequences[:, self.prompt_length :]


def steering_model(
    model: nn.Module,
    vector: torch.Tensor,
    *,
    layers: Sequence[int],
    scale: float = 1.0,
    index: Index | None = None,
    steps: Steps = None,
    layout: ModelLayout | None = None,
) -> nn.Module:
    """A new model adding ``scale * vector`` to the output of each block in ``layers``.

    ``index`` (over ``[batch, pos, ...]``) restricts the addition, e.g. ``ts.idx[:, [2, 3]]``;
    ``steps`` to some calls of one ``ts.run`` (generation steps: ``0`` is the prompt's
    pass, ``slice(1, None)`` every later step).
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    for layer in pick_layers(layers, n_layers(model, layout)):
        add = Add(vector, scale, index=index, steps=steps)
        model = rewrite_at(model, layout.block(layer), "insert_after", add)
    return model


def steering_vector(
    model: nn.Module,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    layer: int,
    position: int = -1,
    positive_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Mean residual stream after block ``layer`` at ``position`` on ``positive`` minus
    the same on ``negative`` (each ``[pos]`` or ``[batch, pos]``, or a tokenizer's output).

    Padded batches take their attention masks as ``positive_mask`` / ``negative_mask``;
    ``position`` then counts each row's real tokens (``-1``: its last real token).

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) runs both
    sides on that host, as two runs of one request; each side's mean is taken there, so
    two vectors come back.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    layer = pick_layers([layer], n_layers(model, layout))[0]
    probe = rewrite_at(model, layout.block(layer), "insert_after", Save("resid"))
    sides = (("positive", positive, positive_mask), ("negative", negative, negative_mask))
    if backend is not None:
        runs: list[Run] = []
        for name, given, given_mask in sides:
            ids, mask = inputs(given, given_mask, name)
            columns = token_index(mask, position, ids.shape[1], ids.shape[0])
            read = saved("resid")[torch.arange(ids.shape[0]), columns].float().mean(0)
            plan = plan_of(probe).returning(side_mean=read)
            runs.append((name, plan, (ids,), forward_kwargs(mask)))
        results = run_plans(backend, runs)
        return results["positive"].saved["side_mean"] - results["negative"].saved["side_mean"]
    means = []
    for name, given, given_mask in sides:
        ids, mask = inputs(given, given_mask, name)
        with torch.no_grad():
            resid = run(probe, ids, **forward_kwargs(mask)).records["resid"][0]
        columns = token_index(mask, position, ids.shape[1], ids.shape[0]).to(resid.device)
        means.append(
            resid[torch.arange(ids.shape[0], device=resid.device), columns].float().mean(0)
        )
    return means[0] - means[1]


def steer(
    model: nn.Module,
    input_ids: torch.Tensor,
    vector: torch.Tensor,
    *,
    layers: Sequence[int],
    scale: float = 1.0,
    positions: Positions = "all",
    max_new_tokens: int = 20,
    attention_mask: torch.Tensor | None = None,
    layout: ModelLayout | None = None,
    decoder: Decoder = None,
    backend: Backend | None = None,
    **generate_kwargs: Any,
) -> Steering:
    """Generate from ``input_ids`` with ``scale * vector`` added after ``layers``.

    ``positions`` picks where (see the module docstring); with ``attention_mask`` (prompts
    padded on the left) a list of prompt positions counts each row's real tokens. Other
    keyword arguments go to the model's ``generate`` (``do_sample``, ``pad_token_id``, ...)
    for a ``transformers`` model, to :func:`torchsurgeon.models.generate` (``do_sample``,
    ``temperature``, ``top_k``, ``seed``) for an explicit one.

    ``seed`` (with ``do_sample=True``) makes sampling reproducible: on a ``transformers``
    model it samples under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``
    (the global generator is left as it was), as a host does.

    ``backend`` (a ``ts.remote.Client``; ``model`` may be ``client.meta(name)``) generates
    on that host, in one request: one model whose ``Add`` layers act at the steps
    ``positions`` picks (``steps=``), and only the sequences come back. The host takes the
    ``generate`` options of ``ts.remote.calls.GENERATE_OPTIONS`` and needs ``seed=`` to
    sample.
    """
    model = wrap(model)
    layout = layout_of(model, layout)
    ids, mask = inputs(input_ids, attention_mask)
    managed = sorted(set(generate_kwargs) & set(_MANAGED))
    if managed:
        raise ArgumentTypeError(f"steer manages {', '.join(managed)} itself; do not pass it")
    if max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    explicit = not callable(getattr(model, "generate", None))
    if explicit and backend is not None:
        raise ArgumentTypeError(
            "steer(backend=...) generates with the host's transformers generate; this model "
            "has no generate (an explicit model generates locally with ts.generate)"
        )
    if explicit:
        extra = sorted(set(generate_kwargs) - {"do_sample", "temperature", "top_k", "seed"})
        if extra:
            raise ArgumentTypeError(
                f"steer on an explicit model generates with ts.generate, which takes "
                f"do_sample, temperature, top_k and seed, not {', '.join(extra)}"
            )
    picked = tuple(pick_layers(layers, n_layers(model, layout)))
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise ArgumentError(
                f"positions must be 'all', 'prompt', 'generated' or a list of prompt "
                f"positions, got {positions!r}"
            )
        shown: str | tuple[int, ...] = positions
        prompt_index = None
    else:
        prompt_index = _prompt_index(list(positions), ids, mask)
        given = [int(p) for p in positions]
        shown = tuple(given if mask is not None else pick_positions(given, ids.shape[1]))
    if backend is not None:
        sequences = _generate_on_host(
            backend,
            model,
            ids,
            mask,
            vector,
            picked,
            scale,
            shown,
            prompt_index,
            layout,
            max_new_tokens,
            generate_kwargs,
        )
        new = sequences[:, ids.shape[1] :].tolist()
        labels = tuple(tuple(token_label(decoder, t) for t in row) for row in new)
        return Steering(sequences, ids.shape[1], picked, float(scale), shown, labels)
    steered = steering_model(model, vector, layers=picked, scale=scale, layout=layout)
    if shown == "all":
        prompt_model, step_model = steered, steered
    elif shown == "generated":
        prompt_model, step_model = model, steered
    elif shown == "prompt":
        prompt_model, step_model = steered, model
    else:
        prompt_model = steering_model(
            model, vector, layers=picked, scale=scale, index=prompt_index, layout=layout
        )
        step_model = model
    if explicit:
        sequences = generate(
            step_model,
            ids,
            max_new_tokens,
            attention_mask=mask,
            prompt_model=prompt_model,
            **generate_kwargs,
        )
    else:
        kwargs = dict(generate_kwargs)
        seed = kwargs.pop("seed", None)
        if mask is not None:
            kwargs["attention_mask"] = mask
        with _seeded(seed):
            if prompt_model is step_model:
                sequences = steered.generate(ids, max_new_tokens=max_new_tokens, **kwargs)
            else:
                sequences = _generate_in_two(prompt_model, step_model, ids, max_new_tokens, kwargs)
    new = sequences[:, ids.shape[1] :].tolist()
    labels = tuple(tuple(token_label(decoder, t) for t in row) for row in new)
    return Steering(sequences, ids.shape[1], picked, float(scale), shown, labels)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Sampling under ``torch.manual_seed(seed)``, the global generator restored after (what a
    host does with ``seed=``); nothing when ``seed`` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generate_on_host(
    backend: Backend,
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    vector: torch.Tensor,
    picked: tuple[int, ...],
    scale: float,
    shown: str | tuple[int, ...],
    prompt_index: Index | None,
    layout: ModelLayout,
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
) -> torch.Tensor:
    """The steered sequences, generated on the host in one request.

    The prompt model and the step model of the local switch are one model here: each
    ``Add`` acts at the steps of one ``ts.run`` of ``generate`` that ``positions`` picks
    (``"prompt"`` and prompt positions: step 0, the prompt's pass; ``"generated"``: every
    later step; ``"all"``: every step).
    """
    steps: Steps = None
    if shown == "generated":
        steps = slice(1, None)
    elif shown != "all":
        steps = 0
    steered = steering_model(
        model, vector, layers=picked, scale=scale, index=prompt_index, steps=steps, layout=layout
    )
    kwargs = dict(generate_kwargs)
    if mask is not None:
        kwargs["attention_mask"] = mask
    result = run(steered.generate, ids, max_new_tokens=max_new_tokens, backend=backend, **kwargs)
    return result.output


def _prompt_index(positions: list[int], ids: torch.Tensor, mask: torch.Tensor | None) -> Index:
    """``ts.idx[:, positions]``, or with a mask each row's own columns (joint row/col lists)."""
    if mask is None:
        return idx[:, pick_positions(positions, ids.shape[1])]
    rows, columns = [], []
    for position in positions:
        found = token_index(mask, position, ids.shape[1], ids.shape[0])
        rows.extend(range(ids.shape[0]))
        columns.extend(found.tolist())
    return Index((rows, columns))


def _generate_in_two(
    prompt_model: nn.Module,
    step_model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """One token from ``prompt_model``, the rest from ``step_model`` over its KV cache."""
    first = prompt_model.generate(ids, max_new_tokens=1, return_dict_in_generate=True, **kwargs)
    sequences = first.sequences
    if max_new_tokens == 1:
        return sequences
    config = getattr(prompt_model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    if eos is not None:
        done = torch.isin(sequences[:, -1], torch.as_tensor(eos).reshape(-1))
        if bool(done.all()):
            return sequences
    if "attention_mask" in kwargs:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    cache = getattr(first, "cache", None) or first.past_key_values
    rest = step_model.generate(
        sequences, **{_cache_kwarg(): cache}, max_new_tokens=max_new_tokens - 1, **kwargs
    )
    if bool(done.any()) and pad is not None:
        rest = rest.clone()
        rest[done, sequences.shape[1] :] = pad
    return rest
