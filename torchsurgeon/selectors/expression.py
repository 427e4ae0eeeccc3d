"""Selector expressions as data: the steps that produced a selection.

A :class:`SelectorStep` is one refinement (``at("mlp")``, ``where(...)``, ...) with its
argument. A tuple of them *is* the selector expression: ``selection.replay`` re-runs it on
another copy of the model, and :func:`steps_to_json` / :func:`steps_from_json` carry it in
a plan.
A step whose predicate is a Python callable replays locally but refuses to become JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchsurgeon.selectors.predicates import Predicate, predicate_from_json
from torchsurgeon.surgery.errors import ArgumentError, SerializationError

__all__ = ["OPERATIONS", "SelectorStep", "steps_from_json", "steps_to_json"]

OPERATIONS = (
    "at",
    "at_instances_of",
    "at_subtrees_where",
    "at_children",
    "where",
    "pick_nth_selected",
    "invert",
)
_PREDICATE_OPS = ("at_subtrees_where", "where")


@dataclass(frozen=True)
class SelectorStep:
    """One refinement of a selection: the method name and its single argument."""

    op: str
    arg: str | Predicate | tuple[int, ...] | None

    def __str__(self) -> str:
        arg = (
            ""
            if self.arg is None
            else repr(list(self.arg) if isinstance(self.arg, tuple) else self.arg)
        )
        return f"{self.op}({arg})"

    def to_json(self) -> dict[str, Any]:
        if isinstance(self.arg, Predicate):
            return {"op": self.op, "arg": self.arg.to_json()}
        arg = list(self.arg) if isinstance(self.arg, tuple) else self.arg
        return {"op": self.op, "arg": arg}

    @classmethod
    def from_json(cls, data: Any) -> SelectorStep:
        if not isinstance(data, dict) or data.get("op") not in OPERATIONS:
            op = data.get("op") if isinstance(data, dict) else data
            raise ArgumentError(f"unknown selector step {op!r}; known: {', '.join(OPERATIONS)}")
        op, arg = data["op"], data.get("arg")
        if op in _PREDICATE_OPS:
            return cls(op, predicate_from_json(arg))
        if op in ("at", "at_instances_of"):
            if not isinstance(arg, str) or (op == "at_instances_of" and not arg):
                raise ArgumentError(f"selector step {op!r} needs a string argument, got {arg!r}")
            return cls(op, arg)
        if op == "pick_nth_selected":
            if not isinstance(arg, list) or not all(type(i) is int for i in arg):
                raise ArgumentError(f"pick_nth_selected needs a list of ints, got {arg!r}")
            return cls(op, tuple(arg))
        if arg is not None:
            raise ArgumentError(f"selector step {op!r} takes no argument, got {arg!r}")
        return cls(op, None)


def steps_to_json(steps: tuple[SelectorStep, ...]) -> list[dict[str, Any]]:
    """The expression as JSON; names the step that cannot be serialized, if one cannot."""
    out = []
    for i, step in enumerate(steps):
        try:
            out.append(step.to_json())
        except SerializationError as error:
            raise SerializationError(f"selector step {i} .{step}: {error}") from None
    return out


def steps_from_json(data: Any) -> tuple[SelectorStep, ...]:
    if not isinstance(data, list):
        raise ArgumentError(f"a selector expression is a list of steps, got {type(data).__name__}")
    return tuple(SelectorStep.from_json(item) for item in data)
