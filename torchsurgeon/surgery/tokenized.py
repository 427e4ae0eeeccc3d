"""Text inputs for a local ``ts.run``: a model's tokenizer, kept beside its frozen tree.

A tree's tokenizer lives in its root's own attribute (never on the user's module), so every
tree rewritten from it keeps it: rewrites copy the root's attributes. ``ts.run(model,
"text")`` or ``ts.run(model, ["a", "bb"])`` tokenizes as a host does: padded on the *left*
unless ``padding_side="right"``, with the ``attention_mask`` and, for a model whose
``forward`` takes them, ``position_ids = attention_mask.cumsum(-1) - 1`` (clamped at 0), so
every row's last position is its last token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError
from torchsurgeon.surgery.frozen import is_frozen, original_class, recorded_path, shallow_copy

__all__ = ["TOKENIZER_FILES", "load_tokenizer", "tokenized", "tokenizer_of", "with_tokenizer"]

_ATTR = "_ts_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_MADE = ("input_ids", "attention_mask", "position_ids")


def tokenizer_of(model: nn.Module) -> Any:
    """The tokenizer ``model`` carries (``ts.load``, ``ts.wrap(..., tokenizer=)``), or None."""
    return getattr(model, "_orig_mod", model).__dict__.get(_ATTR)


def with_tokenizer(model: nn.Module, tokenizer: Any) -> nn.Module:
    """``model`` carrying ``tokenizer``: a frozen tree gets a new root (the tree is shared)."""
    if is_frozen(model):
        model = shallow_copy(model, recorded_path(model))
    model.__dict__[_ATTR] = tokenizer
    return model


def load_tokenizer(directory: str | Path) -> Any:
    """The checkpoint directory's tokenizer, or None when it has none; never downloads."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenized(
    target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``ts.run``'s call with text (a string or a list of strings) made into token tensors."""
    texts = _texts(args[0]) if args else None
    model = target if isinstance(target, nn.Module) else getattr(target, "__self__", None)
    model = getattr(model, "_orig_mod", model)
    if texts is None:
        _check_ids(target, model, args, kwargs)
        return args, kwargs
    tokenizer = tokenizer_of(model) if isinstance(model, nn.Module) else None
    if tokenizer is None:
        shown = repr(args[0])[:60]
        raise ArgumentTypeError(
            f"ts.run's input is text ({shown}), but this {type(model).__name__} has no "
            "tokenizer to make input_ids from it: give it one with ts.wrap(model, "
            "tokenizer=...) (e.g. AutoTokenizer.from_pretrained(path); ts.load(path) takes "
            "the checkpoint's own), or pass token ids (input_ids, a torch.long tensor)"
        )
    if len(args) > 1:
        raise ArgumentTypeError("with text, pass the text as the only positional input")
    kwargs = dict(kwargs)
    side = kwargs.pop("padding_side", None) or "left"
    if side not in ("left", "right"):
        raise ArgumentError(f"padding_side must be 'left' or 'right', got {side!r}")
    made = [name for name in _MADE if name in kwargs]
    if made:
        raise ArgumentTypeError(
            f"with text, ts.run makes {', '.join(_MADE)}; do not pass {made[0]!r}"
        )
    ids, mask = _padded(tokenizer, texts, side)
    assert isinstance(model, nn.Module)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    made_kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if target is model and "position_ids" in _parameters(original_class(model).forward):
        made_kwargs["position_ids"] = (made_kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return (), {**made_kwargs, **kwargs}


def _check_ids(target: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse floating-point token ids (``input_ids``, by keyword or as the first input of a
    model or ``generate`` whose forward takes them), naming the argument and the dtype."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and isinstance(model, nn.Module):
        forward = original_class(model).forward
        first = _first_parameter(forward if isinstance(target, nn.Module) else target)
        takes = first == "input_ids" or (first == "inputs" and "input_ids" in _parameters(forward))
        ids = args[0] if takes else None
    if isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex()):
        raise ArgumentTypeError(
            f"input_ids: token ids are integers (torch.long), got a {ids.dtype} tensor of "
            f"shape {tuple(ids.shape)}; convert token ids with ids.long(), or pass "
            "embeddings under their own argument (e.g. inputs_embeds=)"
        )


def _first_parameter(function: Any) -> str:
    """The name of ``function``'s first parameter other than ``self`` ("" if unknown)."""
    try:
        names = [n for n in inspect.signature(function).parameters if n != "self"]
    except (TypeError, ValueError):
        return ""
    return names[0] if names else ""


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _padded(tokenizer: Any, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask, padded to the longest text with the pad token (else EOS, UNK, 0)."""
    rows = [list(ids) for ids in tokenizer(texts)["input_ids"]]
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ArgumentError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens")
    pad = next(
        (
            i
            for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
            if i is not None
        ),
        0,
    )
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def _parameters(function: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()
