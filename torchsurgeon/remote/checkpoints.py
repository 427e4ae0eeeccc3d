"""Checkpoints a host serves: local directories, and how each is loaded
(:class:`LocalCheckpoint`): the ``transformers`` model (``AutoModelForCausalLM``, with the
attention implementation that ``attn_implementation`` names, or ``transformers``' default),
or, with ``convert=True``, its explicit-dataflow conversion, ``ts.load(path)``. The host
never downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.load import load as load_converted
from torchsurgeon.plans.identity import BaseIdentity, pin_identity
from torchsurgeon.plans.structure import ATTN_IMPLEMENTATIONS
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.lineage import Lineage, with_lineage

__all__ = ["ATTN_IMPLEMENTATIONS", "LocalCheckpoint", "load_checkpoint", "load_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class LocalCheckpoint:
    """A local checkpoint directory, and how the host loads it.

    By default the host serves the ``transformers`` model, with the attention
    implementation ``transformers`` picks (``sdpa`` where it can) unless
    ``attn_implementation`` names one of :data:`ATTN_IMPLEMENTATIONS`. With
    ``convert=True`` it serves ``ts.load(path)`` instead: the explicit-dataflow model of
    :mod:`torchsurgeon.models`, whose queries, keys, values, scores, attention pattern and
    per-head outputs are nodes a plan can select (``blocks.{i}.attn.pattern``). Its
    attention is computed by its own layers, so it takes no ``attn_implementation``.
    A plain path means ``LocalCheckpoint(path)``.
    """

    path: str | Path
    convert: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if type(self.convert) is not bool:
            raise TypeError(f"convert must be True or False, got {self.convert!r}")
        if self.attn_implementation is not None:
            if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
                raise ValueError(
                    f"attn_implementation must be {' or '.join(map(repr, ATTN_IMPLEMENTATIONS))} "
                    f"(or None, for transformers' default), got {self.attn_implementation!r}"
                )
            if self.convert:
                raise ValueError(
                    "attn_implementation picks the attention of a transformers model; a "
                    "converted model (convert=True) computes attention in its own layers: "
                    "leave attn_implementation out, or convert out"
                )

    @classmethod
    def of(cls, source: str | Path | LocalCheckpoint) -> LocalCheckpoint:
        """``source`` itself, or a path as ``LocalCheckpoint(path)``."""
        return source if isinstance(source, LocalCheckpoint) else cls(source)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "convert": self.convert,
            "attn_implementation": self.attn_implementation,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocalCheckpoint:
        return cls(data["path"], data["convert"], data["attn_implementation"])


def load_checkpoint(source: str | Path | LocalCheckpoint) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)`` from a local checkpoint directory; never downloads.

    The model is the ``transformers`` one, or with ``convert`` its conversion
    (``ts.load``: memory-mapped, explicit layers; see :class:`LocalCheckpoint`).
    """
    from transformers import AutoModelForCausalLM

    checkpoint = LocalCheckpoint.of(source)
    directory = Path(checkpoint.path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a local checkpoint directory (no config.json)")
    if checkpoint.convert:
        try:
            model: nn.Module = load_converted(directory)
        except UnsupportedArchitectureError as error:
            raise UnsupportedArchitectureError(
                f"{directory} cannot be served converted; leave convert out (no --convert) "
                f"to serve its transformers model. {error}"
            ) from None
    else:
        chosen = checkpoint.attn_implementation
        options = {"attn_implementation": chosen} if chosen is not None else {}
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **options)
    return model, load_tokenizer(directory)


def _converted_on_meta(path: str, identity: BaseIdentity) -> nn.Module:
    """``ts.load(path)`` on the meta device, frozen and pinned to ``identity``."""
    model = wrap(load_converted(path, device="meta").eval())
    model = with_lineage(model, Lineage(model, ()))
    return pin_identity(model, identity)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint directory's tokenizer (a pad token set), or None; never downloads."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
