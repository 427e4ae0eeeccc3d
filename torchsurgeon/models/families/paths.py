"""One model, two path vocabularies: its ``transformers`` paths and its converted paths.

A wrapped ``transformers`` model names its parts ``model.layers.3.mlp``; its conversion
(:func:`~torchsurgeon.models.convert`) names them ``blocks.3.mlp``. A :class:`PathMap`
pairs the two for every site both have — the root, the embeddings, the block list, each
block, its attention and MLP (and their output projections), its norms, the final norm and
the unembedding — derived from the family's :class:`ModelLayout` and :data:`EXPLICIT`,
never written per model. ``ts.paths(model)`` gives the map of a wrapped or converted model;
:meth:`PathMap.translate` rewrites a plan built on one form so it replays on the other.

Which ``transformers`` class a converted model came from, and that class's identity, are
recorded on the converted root by ``convert`` (:data:`SOURCE`); rewrites keep it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.families.layout import EXPLICIT, ModelLayout
from torchsurgeon.surgery.errors import ArgumentTypeError, closest
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import SITE_LISTS, iter_nodes, split

if TYPE_CHECKING:
    from torchsurgeon.plans import Plan
    from torchsurgeon.plans.identity import Match

__all__ = ["SOURCE", "PathMap", "counterpart_hint", "path_map_of", "paths"]

SOURCE = "_ts_converted_from"
"""The root attribute holding the identity of the ``transformers`` model converted."""

Side = Literal["wrapped", "converted"]
_BLOCK_ROLES = (("attn_out", "attn.out"), ("attn", "attn"), ("mlp_down", "mlp.out"), ("mlp", "mlp"))


@dataclass(frozen=True)
class PathMap:
    """The sites of one model under both vocabularies, paired ``(wrapped, converted)``.

    ``side`` is the vocabulary of the model the map was taken from (``model``);
    ``architecture`` is the ``transformers`` class of its wrapped form.
    """

    side: Side
    architecture: str
    layout: ModelLayout
    pairs: tuple[tuple[str, str], ...]
    model: nn.Module = field(repr=False, compare=False)
    _to: dict[Side, dict[str, str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        to_converted: dict[str, str] = {}
        to_wrapped: dict[str, str] = {}
        for wrapped, converted in self.pairs:  # the first pairing of a path wins
            to_converted.setdefault(wrapped, converted)
            to_wrapped.setdefault(converted, wrapped)
        self._to.update(converted=to_converted, wrapped=to_wrapped)

    def counterpart(self, path: str, to: Side) -> str | None:
        """The path in vocabulary ``to`` of the site at ``path`` in the other one, or None.

        Args:
            path: A dotted path from the root; a block index may be negative or a glob
                (``model.layers.*.mlp``), and a tail into inserted layers
                (``.ts_after.0``) is carried over.
            to: ``"converted"`` or ``"wrapped"``.
        """
        parts = split(path) if path else []
        cut = next((i for i, p in enumerate(parts) if p in SITE_LISTS), len(parts))
        head, tail = ".".join(parts[:cut]), parts[cut:]
        found = self._to[to].get(head)
        if found is None:
            found = self._any_block(parts[:cut], to)
        if found is None:
            return None
        return ".".join(p for p in (found, *tail) if p)

    def _any_block(self, parts: list[str], to: Side) -> str | None:
        """``blocks.<i>.rest`` where ``<i>`` is a glob or a negative index (block 0's map)."""
        source = EXPLICIT.blocks if to == "wrapped" else self.layout.blocks
        target = self.layout.blocks if to == "wrapped" else EXPLICIT.blocks
        prefix = split(source)
        n = len(prefix)
        if parts[:n] != prefix or len(parts) == n or parts[n].isdigit():
            return None
        first = self._to[to].get(".".join([*prefix, "0", *parts[n + 1 :]]))
        if first is None:
            return None
        inner = split(first)[len(split(target)) + 1 :]
        return ".".join([*split(target), parts[n], *inner])

    def nearest(self, path: str, to: Side) -> str:
        """What vocabulary ``to`` has nearest to ``path`` (which has no counterpart), in words."""
        parts = split(path) if path else []
        for k in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:k])
            found = self.counterpart(prefix, to)
            if found is not None:
                return f"{found!r} (the counterpart of {prefix!r})"
        guesses = closest(path, [p for p in self._to[to] if p])
        return ", ".join(f"{self._to[to][g]!r} (for {g!r})" for g in guesses) or "nothing"

    def translate(self, plan: Plan, *, match: Match = "exact") -> Plan:
        """``plan``, built on the other form of this map's model, as a plan for this model.

        Each step's selector must be literal ``at`` paths (block indices may be globs).
        The plan's base must be this model's other form: its ``transformers`` model for a
        converted one (the identity ``convert`` recorded), its conversion for a wrapped one.

        Args:
            plan: A plan whose base is the other form of ``self.model``.
            match: ``"exact"`` (same config and weights) or ``"structure"``, as in ``ts.apply``.

        Raises:
            IdentityMismatchError: The plan's base is not this model's other form.
            PlanError: A step's site has no counterpart here (naming the step, the path and
                the nearest counterpart), or its selector is not a literal path.
        """
        from torchsurgeon.plans import IdentityMismatchError, Plan, PlanError, PlanStep
        from torchsurgeon.plans.identity import identity_of
        from torchsurgeon.selectors.expression import SelectorStep

        if not isinstance(plan, Plan):
            raise ArgumentTypeError(f"translate expects a Plan, got {type(plan).__name__}")
        other = "wrapped" if self.side == "converted" else "converted"
        if _side_of_name(plan.base.architecture) == self.side:
            raise PlanError(
                f"this plan was built on a {self.side} model ({plan.base.architecture}) like "
                "this one: it needs no translation, apply it with ts.apply(plan, model)"
            )
        expected = self._other_identity()
        problems = [] if expected is None else plan.base.differences(expected, match)
        if expected is None or problems:
            why = "; ".join(problems) or (
                "this converted model records no transformers model (it was not made by "
                "ts.convert); convert the model the plan was built on with ts.convert"
            )
            raise IdentityMismatchError(
                f"this plan was built on {plan.base.describe()}, which is not the {other} "
                f"form of this {self.side} model ({self.architecture}, {match} match): {why}"
            )
        steps = []
        for i, step in enumerate(plan.steps):
            path = _literal_path(step.selection)
            found = None if path is None else self.counterpart(path, self.side)
            if path is None:
                raise PlanError(
                    f"step {i} ({step}) does not translate: only literal at(path) selectors "
                    "have a counterpart in the other vocabulary (class names and predicates "
                    "do not); rebuild the step on this model"
                )
            if found is None:
                raise PlanError(
                    f"step {i} ({step}): the {other} site {path!r} has no counterpart in this "
                    f"{self.side} model; nearest: {self.nearest(path, self.side)}"
                )
            selection = (SelectorStep("at", found),) if found else ()
            steps.append(PlanStep(selection, step.operation, step.layer))
        return dataclasses.replace(plan, base=identity_of(self.model), steps=tuple(steps))

    def _other_identity(self) -> Any:
        """The identity the other form of ``model`` has (None if unknown)."""
        from torchsurgeon.plans.identity import identity_of

        if self.side == "converted":
            return self.model.__dict__.get(SOURCE)
        from torchsurgeon.models.convert import convert

        return identity_of(convert(self.model))


def _literal_path(selection: tuple[Any, ...]) -> str | None:
    """The path a selector of ``at`` steps reaches from the root; None for anything else."""
    parts: list[str] = []
    for step in selection:
        if step.op != "at" or not isinstance(step.arg, str):
            return None
        parts.extend(split(step.arg))
    return ".".join(parts)


def _side_of_name(architecture: str) -> Side:
    return "converted" if architecture == "Transformer" else "wrapped"


def paths(model: nn.Module) -> PathMap:
    """The map between ``model``'s paths and those of its other form (wrapped / converted).

    Args:
        model: A converted model (``ts.convert``, ``ts.load``) or a ``transformers`` model
            of a convertible family, wrapped or not.

    Raises:
        UnsupportedArchitectureError: ``model`` is neither (naming what converts).
    """
    from torchsurgeon.layers.transformer import Transformer
    from torchsurgeon.models.families import FAMILIES, family_for, family_of_class

    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"ts.paths expects a model, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if isinstance(model, Transformer):
        family = FAMILIES.get(config.family)
        source = model.__dict__.get(SOURCE)
        if family is None:
            raise UnsupportedArchitectureError(
                f"this converted model's family {config.family!r} has no transformers layout; "
                f"known: {', '.join(FAMILIES)}"
            )
        name = source.architecture if source is not None else ""
        if family.layout_for(name) is None:  # built by ts.load, or from a subclass
            name = (family.classes if model.unembed is not None else family.base_classes)[0]
        side: Side = "converted"
    else:
        names = [cls.__name__ for cls in original_class(model).__mro__]
        name = next((n for n in names if family_of_class(n) is not None), names[0])
        family = family_for(getattr(config, "model_type", None), name)  # raises if none
        side = "wrapped"
    layout = family.layout_for(name)
    assert layout is not None  # family_for / family_of_class checked the class
    here = {p for p, _ in iter_nodes(model)}
    # a soft-capped unembedding (Gemma 2) returns capped logits, transformers' lm_head raw ones
    explicit = config if side == "converted" else family.config(config)  # type: ignore[misc]
    capped = {EXPLICIT.unembed} if explicit.final_softcap is not None else set()
    pairs = [
        (w, c)
        for w, c in _pairs(layout, _count(model, EXPLICIT if side == "converted" else layout))
        if (w if side == "wrapped" else c) in here and c not in capped
    ]
    return PathMap(side, name, layout, tuple(pairs), model)


def _count(model: nn.Module, layout: ModelLayout) -> int:
    blocks = dict(iter_nodes(model)).get(layout.blocks)
    return 0 if blocks is None else len(blocks)


def _pairs(layout: ModelLayout, n_layers: int) -> list[tuple[str, str]]:
    """Every ``(wrapped, converted)`` pair the two layouts name, for ``n_layers`` blocks."""
    top = ["embed", "pos_embed", "blocks", "final_norm", "unembed"]
    found = [("", "")]
    found += [
        (getattr(layout, r), getattr(EXPLICIT, r)) for r in top if getattr(layout, r) is not None
    ]
    inner = [("", ""), *((getattr(layout, r), c) for r, c in _BLOCK_ROLES)]
    inner += list(zip(layout.block_norms, EXPLICIT.block_norms, strict=False))
    for i in range(n_layers):
        for w, c in inner:
            found.append((_join(layout.block(i), w), _join(EXPLICIT.block(i), c)))
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def path_map_of(model: nn.Module) -> PathMap | None:
    """``paths(model)``, or None where ``model`` has no other form (for error messages)."""
    try:
        return paths(model)
    except Exception:  # a hint in a message: never replace the error it decorates
        return None


def counterpart_hint(model: nn.Module, path: str, match: Callable[..., list[str]]) -> str:
    """A sentence for a missing-path error: what ``model`` calls ``path`` of its other form.

    ``model.layers.3.mlp`` on a converted model is ``blocks.3.mlp`` there, and the reverse;
    ``""`` when ``path`` is no path of the other form or its counterpart is not here.

    Args:
        model: The model the path missed on.
        path: The full path that missed.
        match: The selectors' ``match(node, path, parts)``: the paths a pattern reaches.
    """
    found = path_map_of(model)
    here = None if found is None else found.counterpart(path, found.side)
    if found is None or here is None or not match(model, "", split(here)):
        return ""
    other = "transformers" if found.side == "converted" else "converted"
    return (
        f". {path!r} is a path of the {other} form of this model; this {found.side} model "
        f"calls that site {here!r} (ts.paths(model) maps the two)"
    )
