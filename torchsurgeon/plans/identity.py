"""Who a base model is: architecture, config, structure and a cheap weight fingerprint.

A plan says "insert this layer at ``model.layers.12.mlp``" — which only means what it meant
on the model it was made from. So a plan records its base's identity, and ``apply`` checks
it before replaying anything:

- ``architecture``: the root's class name (``LlamaForCausalLM``);
- ``structure_hash``: every node's path and class and every tensor's name and shape — what
  selectors and layer shapes depend on (no dtypes, no values);
- ``config_hash``: the Hugging Face config (``config.to_dict()``, bookkeeping keys such as
  ``_name_or_path`` dropped, JSON with sorted keys) — ``None`` for models without one;
- ``fingerprint``: names, shapes and dtypes of every parameter and buffer plus a few sampled
  elements of each (the first, the last and some at positions derived from the name), so it
  tells checkpoints apart while reading a few hundred bytes of a 70B model, never all of
  it. It is ``None`` for a model on the meta device, which has no values.

A structure-only model built from what a host serves can be *pinned* to the hosted model's
identity (:func:`pin_identity`), so plans made against it carry the real fingerprint.

**Cached on frozen trees.** ``ts.plan`` and ``ts.apply`` ask for the base's identity on
every call, and sampling a few elements of every tensor costs tens of microseconds a tensor
(index kernels, a copy to the CPU). So :func:`identity_of` remembers the structure hash and
fingerprint of a frozen tree (:func:`~torchsurgeon.surgery.frozen.wrap`) and, on the next
call, walks the tree reading only what those two depend on: every node's object and class
and its children's names; every parameter's and buffer's name, object, version counter
(``_version``, which every in-place write through the tensor, a view or a ``detach()``
of it bumps: ``p.add_(1)`` under ``torch.no_grad``, ``copy_``, an optimizer step), data
pointer, shape, strides, dtype and device (which a ``p.data = other`` swap changes without
bumping the counter). Anything read differs: the identity is computed afresh. The config
hash is recomputed on every call (a config is a mutable object shared with the model it
came from). The cache is a :class:`weakref.WeakKeyDictionary` on the root holding only
weak references, so it keeps no model alive, and it is read and written under a lock
(hosts call from worker threads). Plain (unwrapped) models are never cached.

What a version counter cannot see, the cache cannot either: a write through ``p.data``
(``p.data.add_(1)``), or through another tensor object over the same storage that keeps its
own counter — a frozen tree's parameters are new ``Parameter`` objects over the wrapped
model's storage, so ``model.weight.add_(1)`` or ``model.load_state_dict(...)`` on the
*plain* model changes the tree's values without bumping the tree's counters (its buffers
are the plain model's own tensors, so writes to those are seen). Pass
``identity_of(tree, cache=False)`` after such a write. Trees holding inference tensors (no
version counter) or tensor subclasses (``DTensor``, quantized weights) are never cached.

**Sharded tensors.** A ``DTensor`` (``torch.distributed.tensor``, as
:mod:`torchsurgeon.distributed` shards a model) is fingerprinted by its global shape and
dtype, its placements and mesh shape, and samples of this rank's local shard: reading
elements of other ranks' shards would be a collective. Its fingerprint is therefore the
rank's own and differs from the unsharded model's; ``ts.distributed.plan`` /
``ts.distributed.apply`` check a sharded model against the identity the unsharded model had.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.plans.differences import (
    Summary,
    describe,
    first_config_difference,
    first_structure_difference,
    first_weight_difference,
    summarize,
)
from torchsurgeon.plans.errors import IdentityMismatchError
from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.frozen import is_frozen, original_class
from torchsurgeon.surgery.paths import iter_nodes, join

__all__ = [
    "BaseIdentity",
    "Match",
    "check_identity",
    "config_hash",
    "fingerprint",
    "identity_of",
    "pin_identity",
    "structure_hash",
]

Match = Literal["exact", "structure"]

_PINNED = "_ts_pinned_identity"
_SAMPLES = 8
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
    }
)


@dataclass(frozen=True)
class BaseIdentity:
    """The identity of a base model; see the module docstring for each field.

    ``summary`` (not compared) describes the base in plain JSON — config values, module
    classes, tensor shapes, dtypes and sample digests (see
    :mod:`~torchsurgeon.plans.differences`) — so a mismatch names where two bases differ,
    also for a plan read from a file or sent to a host. ``None`` in plans written before it
    existed. ``source`` (not compared, not serialized) is a weak reference to the model it
    was taken from.
    """

    architecture: str
    structure_hash: str
    config_hash: str | None = None
    fingerprint: str | None = None
    summary: Summary | None = field(default=None, compare=False, repr=False)
    source: weakref.ref[nn.Module] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = {
            "architecture": self.architecture,
            "structure_hash": self.structure_hash,
            "config_hash": self.config_hash,
            "fingerprint": self.fingerprint,
        }
        summary = self.described()
        if summary is not None:  # copies: a caller may edit the JSON it gets
            data["summary"] = {k: v if v is None else type(v)(v) for k, v in summary.items()}
        return data

    def __getstate__(self) -> dict[str, Any]:
        return self.to_json()  # a weak reference does not pickle, nor mean anything elsewhere

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in {"summary": None, **state, "source": None}.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseIdentity:
        return cls(**data)

    def described(self) -> Summary | None:
        """The summary, or one taken from the model it came from while that is alive."""
        if self.summary is not None:
            return self.summary
        model = None if self.source is None else self.source()
        return None if model is None else _summary(model)

    def describe(self) -> str:
        """One line: the class, its size config keys and the fingerprint's short form."""
        return describe(self.architecture, self.described(), self.fingerprint)

    def differences(self, other: BaseIdentity, match: Match = "exact") -> list[str]:
        """What differs between ``self`` (a plan's base) and ``other`` (a candidate base)."""
        found: list[str] = []
        if self.architecture != other.architecture:
            found.append(
                f"architecture: the plan was made from a {self.architecture}, this base is a "
                f"{other.architecture}"
            )
        plans, this = self.described(), other.described()
        if self.structure_hash != other.structure_hash:
            found.append(
                "structure: module paths, classes or tensor shapes differ (structure_hash "
                f"{self.structure_hash[:12]} vs {other.structure_hash[:12]})"
                + _where(plans, this, first_structure_difference)
            )
        if match == "structure":
            return found
        if self.config_hash != other.config_hash:
            found.append(
                f"config: config_hash {_short(self.config_hash)} vs {_short(other.config_hash)}"
                + _where(plans, this, first_config_difference)
            )
        if self.fingerprint is None:
            found.append(
                "fingerprint: the plan was made from a structure-only (meta) model and records "
                "no weights; apply it with match='structure' to accept any base of this structure"
            )
        elif self.fingerprint != other.fingerprint:
            found.append(
                "fingerprint: parameter names, dtypes or sampled values differ (a different "
                f"checkpoint or dtype; {_short(self.fingerprint)} vs {_short(other.fingerprint)})"
                + _where(plans, this, first_weight_difference)
            )
        return found


def _short(value: str | None) -> str:
    return "none" if value is None else value[:12]


def _where(plans: Summary | None, this: Summary | None, first: Any) -> str:
    """``"; first difference: ..."`` when both summaries are known and it can be found."""
    if plans is None or this is None:
        return ""
    try:
        found = first(plans, this)
    except Exception:  # naming the place is a courtesy: never hide the mismatch itself
        return ""
    return f"; first difference: {found}" if found else ""


def identity_of(model: nn.Module, *, cache: bool = True) -> BaseIdentity:
    """The identity of ``model`` (its pinned identity, for a structure-only model pinned to one).

    On a frozen tree the structure hash and fingerprint are remembered while the tree's
    nodes and tensors are unchanged (see the module docstring); ``cache=False`` computes
    them afresh (after a write a version counter does not see, such as ``p.data.add_``).
    """
    pinned = model.__dict__.get(_PINNED)
    structure, weights, is_meta, layout = _hashes(model, cache)
    if pinned is not None and pinned.structure_hash == structure and is_meta:
        return dataclasses.replace(pinned, source=weakref.ref(model))
    return BaseIdentity(
        architecture=original_class(model).__name__,
        structure_hash=structure,
        config_hash=config_hash(model),
        fingerprint=weights,
        summary={**layout, "config": summarize(_config(model), (), ())["config"]},
        source=weakref.ref(model),
    )


def _summary(model: nn.Module) -> Summary:
    """``model``'s summary (see :mod:`~torchsurgeon.plans.differences`)."""
    layout = _hashes(model, True)[3]
    return {**layout, "config": summarize(_config(model), (), ())["config"]}


@dataclass(frozen=True)
class _Cached:
    """A frozen tree's hashes and what its walk read when they were computed."""

    seen: tuple[Any, ...]
    refs: tuple[weakref.ref[Any], ...]
    structure_hash: str
    fingerprint: str | None
    is_meta: bool
    layout: Summary


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Cached] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _hashes(model: nn.Module, cache: bool) -> tuple[str, str | None, bool, Summary]:
    """``(structure_hash, fingerprint, is_meta, layout)`` of ``model``, cached on a frozen
    root; ``layout`` is the summary's module and tensor lists."""
    observed = _observe(model) if cache and is_frozen(model) else None
    if observed is not None:
        objects, seen = observed
        with _CACHE_LOCK:
            cached = _CACHE.get(model)
        if (
            cached is not None
            and cached.seen == seen
            and len(cached.refs) == len(objects)
            and all(ref() is obj for ref, obj in zip(cached.refs, objects, strict=True))
        ):
            return cached.structure_hash, cached.fingerprint, cached.is_meta, cached.layout
    # What was observed was read *before* the hashes: a write racing with them bumps a
    # counter past what is stored, so the next call recomputes instead of trusting them.
    weights, samples = _weights(model)
    found = structure_hash(model), weights, _is_meta(model), _listing(model, samples)
    if observed is not None:
        objects, seen = observed
        entry = _Cached(seen, tuple(weakref.ref(obj) for obj in objects), *found)
        with _CACHE_LOCK:
            _CACHE[model] = entry
    return found


def _observe(model: nn.Module) -> tuple[list[Any], tuple[Any, ...]] | None:
    """The nodes and tensors of ``model`` in walk order, and everything the hashes read.

    ``None`` when the tree cannot be cached: a tensor without a version counter (an
    inference tensor), without plain storage, or of a subclass whose writes may not reach
    its own counter.
    """
    objects: list[Any] = []
    seen: list[Any] = []

    def visit(node: nn.Module) -> bool:
        objects.append(node)
        seen.append(type(node))
        for tensors in (node._parameters, node._buffers):
            for name, tensor in tensors.items():
                seen.append(name)
                if tensor is None:
                    seen.append(None)
                    continue
                if type(tensor) not in _PLAIN_TENSORS:
                    return False
                objects.append(tensor)
                seen.append(tensor._version)
                seen.append(tensor.data_ptr())
                seen.append(tensor.shape)
                seen.append(tensor.stride())
                seen.append(tensor.dtype)
                seen.append(tensor.device)
        children = node._modules
        seen.append(tuple(children))
        return all(child is None or visit(child) for child in children.values())

    try:
        complete = visit(model)
    except (RuntimeError, RecursionError):  # no version counter, no storage, ...
        return None
    return (objects, tuple(seen)) if complete else None


def pin_identity(model: nn.Module, identity: BaseIdentity) -> nn.Module:
    """Record on a *fresh* structure-only root the identity of the model it stands for."""
    if not _is_meta(model):
        raise ArgumentError(
            "pin_identity(model=): only a structure-only model (tensors on the meta device) can "
            "be pinned; build it under torch.device('meta')"
        )
    if structure_hash(model) != identity.structure_hash:
        raise IdentityMismatchError(
            "cannot pin: this model's structure differs from the identity's structure_hash"
        )
    model.__dict__[_PINNED] = identity
    return model


def check_identity(
    expected: BaseIdentity,
    base: nn.Module,
    match: Match = "exact",
    found: BaseIdentity | None = None,
) -> None:
    """Raise :class:`IdentityMismatchError` listing every difference, if ``base`` does not match.

    ``found`` is ``base``'s identity when the caller already knows it (a host computes it once).
    """
    if match not in ("exact", "structure"):
        raise ArgumentError(f"match must be 'exact' or 'structure', got {match!r}")
    actual = found if found is not None else identity_of(base)
    problems = expected.differences(actual, match)
    if problems:
        raise IdentityMismatchError(
            f"this plan does not fit the base ({match} match): the plan was built against "
            f"{expected.describe()}, this base is {actual.describe()}: " + "; ".join(problems)
        )


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (join(path, name), tensor)
        for path, node in iter_nodes(model)
        for name, tensor in [*node._parameters.items(), *node._buffers.items()]
        if tensor is not None
    ]


def _is_meta(model: nn.Module) -> bool:
    tensors = _tensors(model)
    return bool(tensors) and all(t.is_meta for _, t in tensors)


def structure_hash(model: nn.Module) -> str:
    """Hash of every node's path and class and every tensor's name and shape."""
    digest = hashlib.sha256()
    for path, node in iter_nodes(model):
        cls = original_class(node)
        digest.update(f"{path}|{cls.__module__}.{cls.__qualname__}\n".encode())
        for name, tensor in [*node._parameters.items(), *node._buffers.items()]:
            if tensor is not None:
                digest.update(f"  {name}:{list(tensor.shape)}\n".encode())
    return digest.hexdigest()


def config_hash(model: nn.Module) -> str | None:
    """Hash of the model's config (HF ``to_dict`` or a dataclass), or None if it has none."""
    data = _config(model)
    if data is None:
        return None
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _config(model: nn.Module) -> dict[str, Any] | None:
    """The model's config as the hash sees it (bookkeeping keys dropped), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        data = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    else:
        return None
    return {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}


def fingerprint(model: nn.Module) -> str | None:
    """Hash of names, shapes, dtypes and sampled elements; None if any tensor is on meta.

    A ``DTensor`` adds its placements and mesh shape, and is sampled from this rank's local
    shard (see the module docstring).
    """
    return _weights(model)[0]


def _listing(model: nn.Module, samples: dict[str, bytes]) -> Summary:
    """The summary's module and tensor lists (``samples``: each tensor's sampled bytes)."""
    modules = [(path, original_class(node).__qualname__) for path, node in iter_nodes(model)]
    tensors = [
        (name, list(t.shape), str(t.dtype).removeprefix("torch."), samples.get(name))
        for name, t in _tensors(model)
    ]
    found = summarize(None, modules, tensors)
    return {"modules": found["modules"], "tensors": found["tensors"]}


def _weights(model: nn.Module) -> tuple[str | None, dict[str, bytes]]:
    """The fingerprint and each tensor's sampled bytes (``(None, {})`` on meta)."""
    digest = hashlib.sha256()
    sampled: dict[int, bytes] = {}
    samples: dict[str, bytes] = {}
    for name, tensor in _tensors(model):
        if tensor.is_meta:
            return None, {}
        digest.update(f"{name}|{list(tensor.shape)}|{tensor.dtype}\n".encode())
        if id(tensor) not in sampled:
            local = tensor
            if type(tensor) not in _PLAIN_TENSORS and _is_dtensor(tensor):
                digest.update(_layout(tensor).encode())
                local = tensor.to_local()
            sampled[id(tensor)] = _sample(name, local)
        digest.update(sampled[id(tensor)])
        samples[name] = sampled[id(tensor)]
    return digest.hexdigest(), samples


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # A DTensor exists only once its module is imported: no import (and its cost) otherwise.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _layout(tensor: Any) -> str:
    """How a ``DTensor`` is laid out: placements, mesh shape and device type."""
    mesh = tensor.device_mesh
    placements = ",".join(repr(p) for p in tensor.placements)
    return f"  dtensor|{placements}|mesh{list(mesh.shape)}|{mesh.device_type}\n"


def _sample(name: str, tensor: torch.Tensor) -> bytes:
    """The bytes of a few elements of ``tensor`` (gathered, so strides and size do not matter)."""
    count = tensor.numel()
    if count == 0:
        return b""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    positions = sorted({0, count - 1, *((seed + i * 0x9E3779B1) % count for i in range(_SAMPLES))})
    with torch.no_grad():
        flat = torch.tensor(positions, device=tensor.device)
        if tensor.dim() == 0:
            values = tensor.reshape(1)
        else:
            values = tensor[torch.unravel_index(flat, tensor.shape)]
        values = values.detach().to("cpu").contiguous()
    return values.view(torch.uint8).numpy().tobytes()
