"""A hosted model: the base a host serves, loaded once, wrapped, never changed.

:class:`HostedModel` holds what the host knows about one model: the frozen base (or, on a
host whose weights live in Ray workers, its structure-only stand-in), a structure-only
(meta) copy of it for cost estimates, its identity and structure (computed once), and its
tokenizer if the checkpoint has one. :meth:`prepare` turns a plan into this request's own
rewritten view — copy-on-write, so the base and every other request's view are untouched —
after the checks a host owes its users: identity, the layer allow-list, the number of
saves, and, given the request's inputs, what running it would cost
(:func:`~torchsurgeon.remote.estimates.estimate`).

:meth:`call_arguments` is the schema of a model call. A ``transformers`` model takes
``input_ids``, ``attention_mask``, ``position_ids``, ``token_type_ids`` and
``inputs_embeds`` (those its ``forward`` names) as tensors of the right dtype, rank and
shape, with token ids inside the vocabulary and positions inside the model's
``max_position_embeddings``, and the flags ``use_cache``, ``output_hidden_states`` and
``output_attentions`` as booleans. Anything else — a ``cache``, ``labels``, a name the
model would swallow into ``**kwargs`` and ignore — is a 422 naming it. Another module
takes the parameters its ``forward`` names, as tensors or JSON scalars.

A converted model (:class:`~torchsurgeon.layers.transformer.Transformer`, what
``ts.load`` builds) is not a ``transformers`` model but has the same schema, smaller:
``input_ids`` (inside its vocabulary, at most its learned position table's length), an
``attention_mask``, ``position_ids`` and, for a family with token types, ``token_type_ids``.
A ``cache``, or token types for a model without them (GPT-2's conversion would ignore
them), is a 422 naming it.

Texts are tokenized here, padded on the *left* unless the request asks for
``padding_side="right"``, with the ``attention_mask`` and the matching ``position_ids``
(``attention_mask.cumsum(-1) - 1``, clamped at 0): every row's last position is its last
token, as if each prompt ran alone.

Checkpoints are local directories (:class:`LocalCheckpoint` says how to load one): the
``transformers`` model (``AutoModelForCausalLM``, with the attention implementation that
``attn_implementation`` names, or ``transformers``' default), or, with ``convert=True``,
its explicit-dataflow conversion, ``ts.load(path)``. The host never downloads anything.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchsurgeon.layers.base import InterventionLayer, Recorder
from torchsurgeon.layers.transformer import Transformer, TransformerConfig
from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.load import load as load_converted
from torchsurgeon.plans.errors import IdentityMismatchError, PlanError
from torchsurgeon.plans.identity import BaseIdentity, identity_of, pin_identity
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.replay import apply
from torchsurgeon.plans.returning import Returning
from torchsurgeon.plans.structure import (
    ATTN_IMPLEMENTATIONS,
    Structure,
    structure_of,
    without_value_warnings,
)
from torchsurgeon.remote.deadline import guard_deadlines
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.estimates import Cost, Estimates, estimate, keep_values
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.transfer import Inputs
from torchsurgeon.surgery.frozen import original_class, wrap
from torchsurgeon.surgery.lineage import Lineage, with_lineage
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.tree import map as map_tensors

__all__ = ["ATTN_IMPLEMENTATIONS", "HostedModel", "LocalCheckpoint", "Views", "load_checkpoint"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_INT_DTYPES = (torch.int64, torch.int32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool)
_TOKEN_TENSORS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_TENSORS = (*_TOKEN_TENSORS, "inputs_embeds")
_FLAGS = ("use_cache", "output_hidden_states", "output_attentions")
_MADE_FROM_TEXT = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


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
    structure_only: nn.Module | None = None
    """``base`` on the meta device (``base`` itself when it is already): for estimates."""
    attn_implementation: str | None = None
    """The ``transformers`` attention implementation of the base (None: not a
    ``transformers`` model)."""
    estimates: Estimates = field(default_factory=Estimates, compare=False, repr=False)
    views: Views = field(default_factory=lambda: Views(), compare=False, repr=False)

    @classmethod
    def load(cls, name: str, source: nn.Module | str | Path | LocalCheckpoint) -> HostedModel:
        """Load ``source`` (a module, or a local checkpoint directory) and describe it once."""
        tokenizer = None
        path = None
        if isinstance(source, nn.Module):
            module = source
        else:
            checkpoint = LocalCheckpoint.of(source)
            path = str(checkpoint.path)
            module, tokenizer = load_checkpoint(checkpoint)
        # our own frozen copy (its flags, not `source`'s), checking a job's deadline before
        # every module call; every request's view shares those checks
        base = guard_deadlines(wrap(module).eval())
        identity = identity_of(base)
        structure = structure_of(base, identity)
        return cls(
            name,
            base,
            identity,
            structure,
            tokenizer,
            path,
            tokenizer is not None,
            _structure_only(base),
            _attn_implementation(base),
        )

    @classmethod
    def from_structure(
        cls,
        name: str,
        structure: Structure,
        source: str,
        takes_text: bool,
        *,
        converted: bool = False,
        attn_implementation: str | None = None,
    ) -> HostedModel:
        """A stand-in for a model whose weights live elsewhere (in Ray workers).

        It loads the checkpoint's tokenizer (not its weights) when the model takes text, so
        texts are tokenized, checked and their cost estimated before a job is queued. A
        converted model's stand-in is its conversion built here on the meta device (only
        the checkpoint's config and tensor headers are read), pinned to ``structure``'s
        identity: the stand-ins a ``tree`` structure builds have no ``forward`` for the
        cost estimate to run.
        """
        if converted:
            base = _converted_on_meta(source, structure.identity)
        else:  # the served model's attention: the masks its layers see depend on it
            base = structure.build(attn_implementation)
        tokenizer = load_tokenizer(source) if takes_text else None
        return cls(
            name,
            base,
            structure.identity,
            structure,
            tokenizer,
            source,
            takes_text,
            base,
            attn_implementation,
        )

    @classmethod
    def standin(cls, name: str, described: dict[str, Any], source: str) -> HostedModel:
        """The stand-in for a model a worker elsewhere described
        (:func:`torchsurgeon.remote.worker.described`)."""
        return cls.from_structure(
            name,
            Structure.from_json(described["structure"]),
            source,
            described["takes_text"],
            converted=described.get("converted", False),
            attn_implementation=described["attn_implementation"],
        )

    @property
    def converted(self) -> bool:
        """Whether the base is an explicit-dataflow conversion (``ts.load``, ``ts.convert``)."""
        return _is_converted(self.base)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.identity.architecture,
            "identity": self.identity.to_json(),
            "tokenizer": self.takes_text,
            "converted": self.converted,
            "attn_implementation": self.attn_implementation,
        }

    def prepare(
        self,
        plan: Plan,
        limits: Limits,
        inputs: Inputs | None = None,
        runs: Mapping[str, Any] | None = None,
    ) -> tuple[nn.Module, Cost | None]:
        """This request's rewritten view of the base and its estimated cost (``None``
        without inputs); :class:`ApiError` when it cannot be.

        Given the request's ``inputs``, they are checked (:meth:`call_arguments`) and the
        run's cost is estimated on the structure-only copy of the view, so a request over
        ``max_activation_bytes``, ``max_tensor_ops`` or ``max_result_bytes``, or one that
        would fail, is refused here, before it is queued. ``runs`` (a session's later run)
        are the meta records of the earlier runs: then the estimate is made afresh and its
        cost carries this run's meta records.
        """
        match = "exact" if plan.base.fingerprint is not None else "structure"
        known = self.views.view(plan)
        if known is None:
            view = self._apply(plan, self.base, match)
            saves = sum(isinstance(m, Recorder) for _, m in iter_nodes(view))
            self.views.keep_view(plan, view, saves)
        else:
            view, saves = known
        if saves > limits.max_saves:
            raise ApiError(
                422,
                "limit_exceeded",
                f"the plan places {saves} recording layers, over the limit max_saves="
                f"{limits.max_saves}",
                "steps",
            )
        if inputs is not None:
            args, kwargs = self.call_arguments(inputs)
            if inputs.call == "generate":
                return view, self._estimate_generation(plan, view, args, kwargs, limits, match)

            def view_on_meta() -> nn.Module:
                if self.structure_only is None or self.structure_only is self.base:
                    return view
                return self._apply(plan, self.structure_only, match)

            if runs is None:
                return view, self.estimates.check(plan, args, kwargs, limits, view_on_meta)
            cost = estimate(view_on_meta(), args, kwargs, plan.outputs, limits, runs, plan.backward)
            return view, cost
        return view, None

    def read_plan(self, data: bytes, limits: Limits) -> Plan:
        """``Plan.from_bytes(data)`` under ``limits``; the same bytes under the same limits
        are read once (see :class:`Views`). Raises what ``Plan.from_bytes`` raises."""
        plan_limits = limits.plan_limits()
        key = (hashlib.sha256(data).digest(), plan_limits)
        plan = self.views.plan(key)
        if plan is None:
            plan = Plan.from_bytes(data, plan_limits)
            plan = self.views.keep_plan(key, plan, limits.max_cached_plan_bytes)
        return plan

    def meta_view(self, plan: Plan) -> nn.Module:
        """``plan`` applied to the structure-only copy (for estimates)."""
        match = "exact" if plan.base.fingerprint is not None else "structure"
        if self.structure_only is None:
            return self._apply(plan, self.base, match)
        return self._apply(plan, self.structure_only, match)

    def _estimate_generation(
        self,
        plan: Plan,
        view: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limits: Limits,
        match: str,
    ) -> Cost:
        """A generation's cost, bounded by one forward pass over the final length.

        Each step of ``generate`` runs the model on fewer positions than a forward pass over
        the prompt plus every new token, and keeps less (one position per step); so that
        pass, on meta tensors, bounds a step's memory and tensor operations, and its records
        bound the generation's. The token ids come back too.
        """
        ids = args[0] if args else kwargs["input_ids"]
        new = kwargs["max_new_tokens"]
        longer = torch.cat([ids, ids[:, -1:].expand(-1, new)], dim=-1)
        call: dict[str, Any] = {"input_ids": longer}
        mask = kwargs.get("attention_mask")
        if mask is not None:
            call["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], new)], -1)
        meta_view = (
            view
            if self.structure_only is None or self.structure_only is self.base
            else self._apply(plan, self.structure_only, match)
        )
        cost = estimate(meta_view, (), call, Returning(), limits)
        result = cost.record_bytes + longer.numel() * longer.element_size()
        if result > limits.max_result_bytes:
            raise ApiError(
                422,
                "result_too_large",
                f"the generation's records would hold up to {result} bytes, over the limit "
                f"max_result_bytes={limits.max_result_bytes}; save fewer steps (steps=) or "
                "return fewer entries",
                "returning",
            )
        return cost

    def _apply(self, plan: Plan, base: nn.Module, match: str) -> nn.Module:
        try:
            return apply(plan, base, match=match, base_identity=self.identity)  # type: ignore[arg-type]
        except IdentityMismatchError as error:
            raise ApiError(409, "identity_mismatch", f"model {self.name!r}: {error}") from None
        except PlanError as error:
            raise ApiError(422, "plan_does_not_fit", str(error), "steps") from None

    # ----------------------------------------------------------------- the call's schema

    def call_arguments(self, inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
            args, kwargs = (), {**self._tokenize(inputs), **inputs.kwargs}
        if inputs.call == "generate":
            return self._generate_arguments(args, kwargs)
        if _is_transformers(self.base):
            _check_token_call(self.base, _transformers_schema(self.base), args, kwargs)
        elif self.converted:
            _check_token_call(self.base, _converted_schema(self.base), args, kwargs)
        else:
            _check_module_call(self.base, args, kwargs)
        return args, kwargs

    def _generate_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The checked ``generate`` call: token ids (and mask) as for a forward call, and the
        options of :data:`GENERATE_OPTIONS` only; ``seed`` is the host's, for sampling."""
        if not _is_transformers(self.base) or not hasattr(self.base, "generate"):
            raise _bad_input(
                f"model {self.name!r} has no generate (only transformers language models do "
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
            problem = check(value, self.base.config)
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
        _check_token_call(self.base, _transformers_schema(self.base), args, tensors)
        ids = args[0] if args else tensors["input_ids"]
        positions = _positive(getattr(self.base.config, "max_position_embeddings", None))
        if positions is not None and ids.shape[-1] + options["max_new_tokens"] > positions:
            raise _bad_input(
                f"{ids.shape[-1]} prompt positions + max_new_tokens={options['max_new_tokens']} "
                f"is over the model's max_position_embeddings={positions}",
                "max_new_tokens",
            )
        return args, {**tensors, **options}

    def _tokenize(self, inputs: Inputs) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ApiError(
                422, "no_tokenizer", f"model {self.name!r} has no tokenizer; send token ids", "text"
            )
        side = inputs.padding_side or "left"
        encoded = self.tokenizer(
            list(inputs.text or ()), return_tensors="pt", padding=True, padding_side=side
        )
        mask = encoded["attention_mask"]
        empty = [i for i, n in enumerate(mask.sum(-1).tolist()) if n == 0]
        if mask.shape[-1] == 0 or empty:
            raise _bad_input(f"text {empty[0] if empty else 0} has no tokens", "text")
        out = {"input_ids": encoded["input_ids"], "attention_mask": mask}
        if "position_ids" in _parameters(original_class(self.base)):
            out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return out


class Views:
    """The plans a host read and the views it made of them, kept for the next request.

    Researchers send one plan with many inputs (a probe over a dataset, a sweep over
    prompts); reading a plan (parse, schema, layer checks) and replaying it on the base cost
    a few milliseconds a request. A plan is kept by its bytes and the plan limits it was
    read under, its view (the base rewritten by it) by the plan object, with the count of
    its recording layers. The cache is bounded by bytes, not count: the tensors a plan and
    its view's layers hold (the base they share is not counted) total at most ``max_bytes``
    (``Limits.max_cached_plan_bytes``), least recently used dropped first, and a plan bigger
    than that is not kept; at most ``size`` plans. Both are immutable: a view is a frozen
    tree, and two runs of one view never share records (``ts.run`` gives a run that finds
    the view busy a private copy of its recording sites). A plan that fails to read or to
    apply is not kept.
    """

    def __init__(self, size: int = 64, max_bytes: int = 256 << 20) -> None:
        self._size = size
        self.max_bytes = max_bytes
        self._plans: OrderedDict[tuple[bytes, Any], Plan] = OrderedDict()
        self._views: dict[int, tuple[Plan, nn.Module, int]] = {}
        self._bytes: dict[int, int] = {}
        """The bytes each kept plan holds, with its view's, by ``id(plan)``."""
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """The bytes of tensors the kept plans and views hold (beyond the base)."""
        with self._lock:
            return sum(self._bytes.values())

    def plan(self, key: tuple[bytes, Any]) -> Plan | None:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
            return plan

    def keep_plan(self, key: tuple[bytes, Any], plan: Plan, max_bytes: int | None = None) -> Plan:
        """Keep ``plan`` (unless it alone is over ``max_bytes``); the one kept is returned."""
        nbytes = _tensor_bytes(plan.manifest()[1].values())
        with self._lock:
            if max_bytes is not None:
                self.max_bytes = max_bytes
            if key not in self._plans and nbytes > self.max_bytes:
                return plan
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            self._bytes.setdefault(id(plan), nbytes)
            self._evict()
            return plan

    def view(self, plan: Plan) -> tuple[nn.Module, int] | None:
        """The view of a kept ``plan`` (the very object :meth:`keep_plan` returned)."""
        with self._lock:
            entry = self._views.get(id(plan))
        if entry is None or entry[0] is not plan:
            return None
        return entry[1], entry[2]

    def keep_view(self, plan: Plan, view: nn.Module, saves: int) -> None:
        """Keep the view of a kept plan, counting the tensors its layers hold beyond the plan's."""
        own = _storages(plan.manifest()[1].values())
        layers = [
            t for _, m in iter_nodes(view) if isinstance(m, InterventionLayer) for t in m.buffers()
        ]
        extra = sum(n for ptr, n in _storages(layers).items() if ptr not in own)
        with self._lock:
            if not any(kept is plan for kept in self._plans.values()):  # only kept plans' views
                return
            if id(plan) in self._views or self._bytes.get(id(plan), 0) + extra > self.max_bytes:
                return
            self._views[id(plan)] = (plan, view, saves)
            self._bytes[id(plan)] = self._bytes.get(id(plan), 0) + extra
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used plans (and views) past ``size`` plans or ``max_bytes``."""
        while len(self._plans) > self._size or (
            len(self._plans) > 1 and sum(self._bytes.values()) > self.max_bytes
        ):
            _, dropped = self._plans.popitem(last=False)
            self._views.pop(id(dropped), None)
            self._bytes.pop(id(dropped), None)


def _storages(tensors: Any) -> dict[int, int]:
    """``{storage address: its bytes}`` of real tensors (one storage counted once)."""
    found: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _tensor_bytes(tensors: Any) -> int:
    return sum(_storages(tensors).values())


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


def _structure_only(base: nn.Module) -> nn.Module:
    """``base`` on the meta device; its small buffers keep their values (for estimates).

    (Not pinned like ``ts.meta``'s: plans are applied to it with the host's own identity.)
    """
    copy = without_value_warnings(map_tensors(lambda t: t.to("meta"), base))
    copy = with_lineage(copy, Lineage(copy, ()))
    real = dict(base.named_buffers())
    for name, buffer in copy.named_buffers():
        source = real.get(name)
        if source is not None:
            keep_values(buffer, source)
    return copy


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
