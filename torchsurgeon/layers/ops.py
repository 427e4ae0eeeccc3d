"""``ts.ops``: the functions of the expression language that are not tensor methods.

Each builds an expression node (:mod:`torchsurgeon.layers.expr`); nothing here runs until
the plan does. Arguments are expressions (``ts.here``, ``ts.saved(...)``, ...), tensors or
numbers, as in the matching ``torch`` function.
"""

from __future__ import annotations

from typing import Any

from torchsurgeon.layers.expr import Expr, method

__all__ = [
    "cat",
    "cosine_similarity",
    "einsum",
    "maximum",
    "minimum",
    "outer",
    "rearrange",
    "reduce",
    "stack",
    "where",
]


def where(condition: Any, if_true: Any, if_false: Any) -> Expr:
    """``torch.where``: a data-dependent choice, element by element."""
    return method("where", condition, if_true, if_false)


def einsum(equation: str, *operands: Any) -> Expr:
    """``torch.einsum(equation, *operands)``."""
    return method("einsum", *operands, equation=equation)


def cat(tensors: list[Any] | tuple[Any, ...], dim: int = 0) -> Expr:
    """``torch.cat``."""
    return method("cat", *tensors, dim=dim)


def stack(tensors: list[Any] | tuple[Any, ...], dim: int = 0) -> Expr:
    """``torch.stack``."""
    return method("stack", *tensors, dim=dim)


def cosine_similarity(a: Any, b: Any, dim: int = -1, eps: float = 1e-8) -> Expr:
    """``torch.nn.functional.cosine_similarity``."""
    return method("cosine_similarity", a, b, dim=dim, eps=eps)


def outer(a: Any, b: Any) -> Expr:
    """``torch.outer`` of two vectors."""
    return method("outer", a, b)


def maximum(a: Any, b: Any) -> Expr:
    """``torch.maximum``, element by element."""
    return method("maximum", a, b)


def minimum(a: Any, b: Any) -> Expr:
    """``torch.minimum``, element by element."""
    return method("minimum", a, b)


def rearrange(x: Any, pattern: str, **sizes: int) -> Expr:
    """``einops.rearrange(x, pattern, **sizes)``: the pattern is a string, as in einops."""
    return method("rearrange", x, pattern=pattern, sizes=sizes)


def reduce(x: Any, pattern: str, reduction: str, **sizes: int) -> Expr:
    """``einops.reduce(x, pattern, reduction, **sizes)`` (``mean``, ``sum``, ``max``, ...)."""
    return method("reduce", x, pattern=pattern, reduction=reduction, sizes=sizes)
