"""A hosted model: the base a host serves, loaded once, wrapped, never changed.

:class:`HostedModel` holds what the host knows about one model: the frozen base (or, on a
host whose weights live in Ray workers, its structure-only stand-in), its identity and
structure (computed once), and its tokenizer if the checkpoint has one. :meth:`prepare`
turns a plan into this request's own rewritten view — copy-on-write, so the base and every
other request's view are untouched — after the checks a host owes its users: identity, the
layer allow-list, the number of saves.

Checkpoints are local directories loaded with ``transformers.AutoModelForCausalLM``; the
host never downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from torchsurgeon.layers.base import Recorder
from torchsurgeon.plans.errors import IdentityMismatchError, PlanError
from torchsurgeon.plans.identity import BaseIdentity, identity_of
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.replay import apply
from torchsurgeon.plans.structure import Structure, structure_of
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import Inputs
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.paths import iter_nodes

__all__ = ["HostedModel", "load_checkpoint"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class HostedModel:
    """One served model: ``base`` is shared by every request and never changed."""

    name: str
    base: nn.Module
    identity: BaseIdentity
    structure: Structure
    tokenizer: Any = None
    source: str | None = None
    takes_text: bool = False
    """Whether text inputs are accepted (a tokenizer here, or in the Ray workers)."""

    @classmethod
    def load(cls, name: str, source: nn.Module | str | Path) -> HostedModel:
        """Load ``source`` (a module, or a local checkpoint directory) and describe it once."""
        tokenizer = None
        path = None
        if isinstance(source, nn.Module):
            module = source
        else:
            path = str(source)
            module, tokenizer = load_checkpoint(path)
        base = wrap(module).eval()  # the flags of our own frozen copy, not of `source`
        identity = identity_of(base)
        structure = structure_of(base, identity)
        return cls(name, base, identity, structure, tokenizer, path, tokenizer is not None)

    @classmethod
    def from_structure(
        cls, name: str, structure: Structure, source: str, takes_text: bool
    ) -> HostedModel:
        """A stand-in for a model whose weights live elsewhere (in Ray workers)."""
        base = structure.build()
        return cls(name, base, structure.identity, structure, None, source, takes_text)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.identity.architecture,
            "identity": self.identity.to_json(),
            "tokenizer": self.takes_text,
        }

    def prepare(self, plan: Plan, limits: Limits) -> nn.Module:
        """This request's rewritten view of the base; :class:`ApiError` when it cannot be."""
        match = "exact" if plan.base.fingerprint is not None else "structure"
        try:
            view = apply(plan, self.base, match=match, base_identity=self.identity)
        except IdentityMismatchError as error:
            raise ApiError(409, "identity_mismatch", f"model {self.name!r}: {error}") from None
        except PlanError as error:
            raise ApiError(422, "plan_does_not_fit", str(error), "steps") from None
        saves = sum(isinstance(m, Recorder) for _, m in iter_nodes(view))
        if saves > limits.max_saves:
            raise ApiError(
                422,
                "limit_exceeded",
                f"the plan places {saves} recording layers, over the limit max_saves="
                f"{limits.max_saves}",
                "steps",
            )
        return view

    def call_arguments(self, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model call for ``inputs`` (texts go through the tokenizer, padded)."""
        if inputs.text is None:
            return tuple(inputs.args), dict(inputs.kwargs)
        if self.tokenizer is None:
            raise ApiError(
                422, "no_tokenizer", f"model {self.name!r} has no tokenizer; send token ids", "text"
            )
        encoded = self.tokenizer(list(inputs.text), return_tensors="pt", padding=True)
        kwargs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        return (), {**kwargs, **inputs.kwargs}


def load_checkpoint(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)`` from a local checkpoint directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a local checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = None
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer
