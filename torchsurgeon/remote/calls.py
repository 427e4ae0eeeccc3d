"""The schema of a model call on a host: what a request's inputs may hold.

A ``transformers`` model takes ``input_ids``, ``attention_mask``, ``position_ids``,
``token_type_ids`` and ``inputs_embeds`` (those its ``forward`` names) as tensors of the
right dtype, rank and shape, with token ids inside the vocabulary and positions inside the
model's ``max_position_embeddings``, and the flags ``use_cache``, ``output_hidden_states``
and ``output_attentions`` as booleans. Anything else — a ``cache``, ``labels``, a name the
model would swallow into ``**kwargs`` and ignore — is a 422 naming it. Another module takes
the parameters its ``forward`` names, as tensors or JSON scalars.

A converted model (:class:`~torchsurgeon.layers.transformer.Transformer`, what ``ts.load``
builds) is not a ``transformers`` model but has the same schema, smaller: ``input_ids``
(inside its vocabulary, at most its learned position table's length), an
``attention_mask``, ``position_ids`` and, for a family with token types,
``token_type_ids``. A ``cache``, or token types for a model without them (GPT-2's
conversion would ignore them), is a 422 naming it.

Texts are tokenized here, padded on the *left* unless the request asks for
``padding_side="right"``, with the ``attention_mask`` and the matching ``position_ids``
(``attention_mask.cumsum(-1) - 1``, clamped at 0): every row's last position is its last
token, as if each prompt ran alone.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.transformer import Transformer, TransformerConfig
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.transfer import Inputs
from torchsurgeon.surgery.frozen import original_class

__all__ = ["GENERATE_OPTIONS", "MAX_NEW_TOKENS", "call_arguments"]

_INT_DTYPES = (torch.int64, torch.int32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool)
_TOKEN_TENSORS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_TENSORS = (*_TOKEN_TENSORS, "inputs_embeds")
_FLAGS = ("use_cache", "output_hidden_states", "output_attentions")
_MADE_FROM_TEXT = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def call_arguments(hosted: Any, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The checked model call for ``inputs`` (texts tokenized here, left-padded).

    :class:`ApiError` 422 ``bad_input`` naming the argument at the first problem.
    """
    if inputs.call == "train":
        raise _bad_input("a training call's inputs are its batches", "batches")
    if inputs.text is None:
        args, kwargs = tuple(inputs.args), dict(inputs.kwargs)
    else:
        made = [name for name in inputs.kwargs if name in _MADE_FROM_TEXT]
        if made:
            raise _bad_input(
                f"with text the host makes input_ids, attention_mask and position_ids; "
                f"do not send {made[0]!r} too",
                made[0],
            )
        args, kwargs = (), {**_tokenize(hosted, inputs), **inputs.kwargs}
    if inputs.call == "generate":
        return _generate_arguments(hosted, args, kwargs)
    if _is_transformers(hosted.base):
        _check_token_call(hosted.base, _transformers_schema(hosted.base), args, kwargs)
    elif hosted.converted:
        _check_token_call(hosted.base, _converted_schema(hosted.base), args, kwargs)
    else:
        _check_module_call(hosted.base, args, kwargs)
    return args, kwargs


def _generate_arguments(
    hosted: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The checked ``generate`` call: token ids (and mask) as for a forward call, and the
    options of :data:`GENERATE_OPTIONS` only; ``seed`` is the host's, for sampling."""
    if not _is_transformers(hosted.base) or not hasattr(hosted.base, "generate"):
        raise _bad_input(
            f"model {hosted.name!r} has no generate (only transformers language models do "
            "here); send a forward call",
            "call",
        )
    tensors = {k: v for k, v in kwargs.items() if k in ("input_ids", "attention_mask")}
    options = {k: v for k, v in kwargs.items() if k not in tensors}
    for name, value in options.items():
        check = GENERATE_OPTIONS.get(name)
        if check is None:
            raise _bad_input(
                f"generate on this host takes {', '.join(GENERATE_OPTIONS)} (and input_ids, "
                f"attention_mask); {name!r} is not one of them",
                name,
            )
        problem = check(value, hosted.base.config)
        if problem:
            raise _bad_input(f"{name} {problem}, got {value!r}", name)
    if "max_new_tokens" not in options:
        raise _bad_input("generate needs max_new_tokens (an int >= 1)", "max_new_tokens")
    if options.get("seed") is not None and not options.get("do_sample"):
        raise _bad_input("seed is for sampling: give do_sample=True with it", "seed")
    if options.get("do_sample") and options.get("seed") is None:
        raise _bad_input(
            "do_sample=True needs seed= on this host, so that the tokens can be reproduced",
            "seed",
        )
    _check_token_call(hosted.base, _transformers_schema(hosted.base), args, tensors)
    ids = args[0] if args else tensors["input_ids"]
    positions = _positive(getattr(hosted.base.config, "max_position_embeddings", None))
    if positions is not None and ids.shape[-1] + options["max_new_tokens"] > positions:
        raise _bad_input(
            f"{ids.shape[-1]} prompt positions + max_new_tokens={options['max_new_tokens']} "
            f"is over the model's max_position_embeddings={positions}",
            "max_new_tokens",
        )
    return args, {**tensors, **options}


def _tokenize(hosted: Any, inputs: Inputs) -> dict[str, torch.Tensor]:
    if hosted.tokenizer is None:
        raise ApiError(
            422, "no_tokenizer", f"model {hosted.name!r} has no tokenizer; send token ids", "text"
        )
    side = inputs.padding_side or "left"
    encoded = hosted.tokenizer(
        list(inputs.text or ()), return_tensors="pt", padding=True, padding_side=side
    )
    mask = encoded["attention_mask"]
    empty = [i for i, n in enumerate(mask.sum(-1).tolist()) if n == 0]
    if mask.shape[-1] == 0 or empty:
        raise _bad_input(f"text {empty[0] if empty else 0} has no tokens", "text")
    out = {"input_ids": encoded["input_ids"], "attention_mask": mask}
    if "position_ids" in _parameters(original_class(hosted.base)):
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return out


def _is_transformers(model: nn.Module) -> bool:
    return any(
        cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
        for cls in original_class(model).__mro__
    )


def _is_converted(model: nn.Module) -> bool:
    return issubclass(original_class(model), Transformer)


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None) if _is_transformers(model) else None
    found = getattr(config, "_attn_implementation", None)
    return found if isinstance(found, str) else None


@functools.cache
def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The parameters of ``cls.forward`` after ``self``."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p for p in parameters[1:]}


def _bound(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{parameter name: value}`` of the call, by the model's ``forward`` signature.

    Positional arguments take the names of the positional parameters (``args.<i>`` past
    them, for a ``*args`` parameter); keywords keep theirs. Whether a name is one the model
    takes — and not one only a ``**kwargs`` parameter would swallow, and maybe ignore — is
    for the caller to check.
    """
    cls = original_class(model)
    parameters = _parameters(cls).values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional) and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise _bad_input(
            f"{cls.__name__}.forward takes at most {len(positional)} positional arguments "
            f"({', '.join(p.name for p in positional)}), got {len(args)}",
            f"args.{len(positional)}",
        )
    bound = {p.name: value for p, value in zip(positional, args, strict=False)}
    bound.update({f"args.{i}": v for i, v in enumerate(args[len(positional) :], len(positional))})
    for name, value in kwargs.items():
        if name in bound:
            raise _bad_input(f"{name!r} is given both by position and by name", name)
        bound[name] = value
    return bound


@dataclass(frozen=True)
class _TokenSchema:
    """What a language model's call may hold, and the sizes that bound its tensors.

    Each size is ``(the config field it comes from, its value)``; a value of None bounds
    nothing.
    """

    allowed: tuple[str, ...]
    vocab: tuple[str, int | None]
    positions: tuple[str, int | None]
    hidden: tuple[str, int | None]
    token_types: tuple[str, int | None]


def _transformers_schema(model: nn.Module) -> _TokenSchema:
    parameters = _parameters(original_class(model))
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = _positive(getattr(text_config, "vocab_size", None))
    return _TokenSchema(
        allowed=(
            *(n for n in _TENSORS if n in parameters),
            *(n for n in _FLAGS if n in parameters or takes_kwargs),
        ),
        vocab=("vocab_size", vocab),
        positions=(
            "max_position_embeddings",
            _positive(getattr(text_config, "max_position_embeddings", None)),
        ),
        hidden=("hidden_size", _positive(getattr(text_config, "hidden_size", None))),
        token_types=(
            "type_vocab_size",
            _positive(getattr(text_config, "type_vocab_size", None)) or vocab,
        ),
    )


def _converted_schema(model: nn.Module) -> _TokenSchema:
    config: TransformerConfig = model.config
    types = ("token_type_ids",) if config.n_token_types else ()  # else it would be ignored
    return _TokenSchema(
        allowed=("input_ids", "attention_mask", "position_ids", *types),
        vocab=("vocab_size", config.vocab_size),
        positions=("max_positions", _positive(config.max_positions)),  # rotary: unbounded
        hidden=("d_model", config.d_model),
        token_types=("n_token_types", _positive(config.n_token_types)),
    )


def _int_between(low: int, high: int | None = None) -> Callable[[Any, Any], str | None]:
    def check(value: Any, config: Any) -> str | None:
        if type(value) is not int or value < low or (high is not None and value > high):
            return f"must be an int from {low}" + ("" if high is None else f" to {high}")
        return None

    return check


def _positive_number(value: Any, config: Any) -> str | None:
    if type(value) not in (int, float) or not 0 < value < 1e6:
        return "must be a number > 0"
    return None


def _probability(value: Any, config: Any) -> str | None:
    if type(value) not in (int, float) or not 0 < value <= 1:
        return "must be a number in (0, 1]"
    return None


def _flag(value: Any, config: Any) -> str | None:
    return None if type(value) is bool else "must be true or false"


def _token(value: Any, config: Any) -> str | None:
    vocab = getattr(config, "vocab_size", None)
    values = value if isinstance(value, list) and value else [value]
    if len(values) > 64 or not all(type(v) is int and 0 <= v < (vocab or 1 << 62) for v in values):
        return f"must be a token id (or a list of at most 64) inside the vocabulary of {vocab}"
    return None


MAX_NEW_TOKENS = 1024
GENERATE_OPTIONS: dict[str, Callable[[Any, Any], str | None]] = {
    "max_new_tokens": _int_between(1, MAX_NEW_TOKENS),
    "min_new_tokens": _int_between(0, MAX_NEW_TOKENS),
    "do_sample": _flag,
    "temperature": _positive_number,
    "top_k": _int_between(0),
    "top_p": _probability,
    "repetition_penalty": _positive_number,
    "eos_token_id": _token,
    "pad_token_id": _token,
    "use_cache": _flag,
    "seed": _int_between(0, (1 << 63) - 1),
}
"""The ``generate`` options a host accepts, each with its check (greedy decoding or seeded
sampling). ``seed`` is the host's own: it seeds the sampling generator of the request."""


def _check_token_call(
    model: nn.Module, schema: _TokenSchema, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    cls = original_class(model)
    allowed = schema.allowed
    bound = _bound(model, args, kwargs)
    for name, value in bound.items():
        if name not in allowed:
            hint = (
                "; it is a generate option: ts.run(model.generate, ..., backend=client) or "
                "client.generate(...)"
                if name in GENERATE_OPTIONS
                else ""
            )
            raise _bad_input(
                f"{cls.__name__} on this host takes {', '.join(allowed)}; {name!r} is not one "
                f"of them{hint}",
                name,
            )
        if name in _FLAGS:
            if type(value) is not bool:
                raise _bad_input(f"{name} must be true or false, got {value!r}", name)
        elif not isinstance(value, torch.Tensor):
            raise _bad_input(
                f"{name} must be a tensor, got {type(value).__name__} {value!r}; leave it out "
                "rather than sending null",
                name,
            )
    ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        if "inputs_embeds" not in allowed:
            raise _bad_input("give input_ids, the token ids [batch, length]", "input_ids")
        raise _bad_input("give exactly one of input_ids and inputs_embeds", "input_ids")
    (vocab_name, vocab), (positions_name, positions) = schema.vocab, schema.positions
    hidden_name, hidden = schema.hidden
    if ids is not None:
        _check_tensor("input_ids", ids, _INT_DTYPES, 2)
        _check_range("input_ids", ids, vocab, vocab_name)
        batch, length = ids.shape
    else:
        _check_tensor("inputs_embeds", embeds, _FLOAT_DTYPES, 3)
        if hidden is not None and embeds.shape[-1] != hidden:
            raise _bad_input(
                f"inputs_embeds has {embeds.shape[-1]} features, the model's {hidden_name} is "
                f"{hidden}",
                "inputs_embeds",
            )
        batch, length = embeds.shape[:2]
    if positions is not None and length > positions:
        raise _bad_input(
            f"the input has {length} positions, over the model's {positions_name}={positions}",
            "input_ids" if ids is not None else "inputs_embeds",
        )
    mask = bound.get("attention_mask")
    if mask is not None:
        _check_tensor("attention_mask", mask, _MASK_DTYPES, 2, (batch, length))
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise _bad_input("attention_mask holds values other than 0 and 1", "attention_mask")
    position_ids = bound.get("position_ids")
    if position_ids is not None:
        _check_tensor("position_ids", position_ids, _INT_DTYPES, 2)
        if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise _bad_input(
                f"position_ids has shape {list(position_ids.shape)}; expected [{batch}, "
                f"{length}] or [1, {length}]",
                "position_ids",
            )
        _check_range("position_ids", position_ids, positions, positions_name)
    token_types = bound.get("token_type_ids")
    if token_types is not None:
        _check_tensor("token_type_ids", token_types, _INT_DTYPES, 2, (batch, length))
        types_name, types = schema.token_types
        _check_range("token_type_ids", token_types, types, types_name)


def _check_module_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cls = original_class(model)
    parameters = _parameters(cls)
    for name, value in _bound(model, args, kwargs).items():
        parameter = parameters.get(name)
        if not name.startswith("args.") and (
            parameter is None or parameter.kind == parameter.VAR_KEYWORD
        ):
            named = [
                n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            raise _bad_input(
                f"{cls.__name__}.forward has no parameter {name!r} (it has "
                f"{', '.join(named) or 'none by name'})",
                name,
            )
        if isinstance(value, torch.Tensor):
            _check_tensor(name, value, None, None)


def _check_tensor(
    name: str,
    tensor: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] | None,
    rank: int | None,
    shape: tuple[int, ...] | None = None,
) -> None:
    if dtypes is not None and tensor.dtype not in dtypes:
        raise _bad_input(
            f"{name} has dtype {tensor.dtype}; expected "
            + " or ".join(str(d).removeprefix("torch.") for d in dtypes),
            name,
        )
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise _bad_input(f"{name} holds NaN or infinite values", name)
    if rank is not None and tensor.dim() != rank:
        raise _bad_input(f"{name} has shape {list(tensor.shape)}; expected {rank} dimensions", name)
    if rank is not None and 0 in tensor.shape:
        raise _bad_input(f"{name} has shape {list(tensor.shape)}, which holds nothing", name)
    if shape is not None and tuple(tensor.shape) != shape:
        raise _bad_input(f"{name} has shape {list(tensor.shape)}; expected {list(shape)}", name)


def _check_range(name: str, tensor: torch.Tensor, size: int | None, what: str) -> None:
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or (size is not None and high >= size):
        bad = low if low < 0 else high
        bound = f"0..{size - 1} (the model's {what}={size})" if size is not None else ">= 0"
        raise _bad_input(f"{name} holds {bad}; values must be in {bound}", name)


def _positive(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def _bad_input(message: str, field: str) -> ApiError:
    return ApiError(422, "bad_input", message, f"inputs.{field}"[:128])
