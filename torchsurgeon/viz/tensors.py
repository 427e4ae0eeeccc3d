"""How a tensor looks in a picture: a one-line summary, and its values only when small.

treescope 0.1.10's own PyTorch support reads ``Tensor.names`` (named tensors), which
torch 2.13 no longer has, so every tensor — and so every module with a parameter — fails
to render. This module is torchsurgeon's replacement: a treescope *handler* for tensors and
an *NDArray adapter* (the interface treescope's array views use), both installed through
treescope's public registries by :mod:`torchsurgeon.viz.handlers`.

A summary names the kind (``Param`` or ``Tensor``), dtype, shape, device and gradient
state, e.g. ``Param float32[64, 256] cpu``. Statistics (mean, spread, range, NaN/inf
counts) are added only for ordinary dense tensors of at most :data:`STATS_MAX_NUMEL`
elements, and the values themselves (PyTorch's own ``repr``, folded) only up to
:data:`VALUES_MAX_NUMEL`: a picture of a 70B model reads no weight data, and meta tensors
(a model's structure without its weights) render like any other.
"""

from __future__ import annotations

from types import NotImplementedType
from typing import Any

import torch
from torch import nn
from treescope import ndarray_adapters, renderers, rendering_parts
from treescope.external import torch_support

__all__ = [
    "STATS_MAX_NUMEL",
    "VALUES_MAX_NUMEL",
    "TensorAdapter",
    "describe_tensor",
    "render_tensor",
]

STATS_MAX_NUMEL = 100_000
"""Summary statistics are computed only for tensors with at most this many elements."""

VALUES_MAX_NUMEL = 1_000
"""A tensor's values are shown (folded, on click) only up to this many elements."""


def describe_tensor(tensor: torch.Tensor, *, stats: bool = True) -> str:
    """One line about ``tensor``: kind, dtype, shape, device, gradient state, statistics.

    Reads no tensor data unless ``stats`` and the tensor is small, dense and on a real
    device (see :data:`STATS_MAX_NUMEL`).
    """
    if isinstance(tensor, nn.Parameter):
        kind = "Param"
    elif type(tensor) is torch.Tensor:
        kind = "Tensor"
    else:
        kind = type(tensor).__name__
    dtype = str(tensor.dtype).removeprefix("torch.")
    shape = ", ".join(str(size) for size in tensor.shape)
    parts = [f"{kind} {dtype}[{shape}]", str(tensor.device)]
    if tensor.layout != torch.strided:
        parts.append(str(tensor.layout).removeprefix("torch."))
    if isinstance(tensor, nn.Parameter):
        if not tensor.requires_grad:
            parts.append("requires_grad=False")
    elif tensor.requires_grad:
        parts.append("requires_grad=True")
    if tensor.grad is not None:  # a .grad read is metadata; no data is touched
        parts.append("has .grad")
    if stats and _readable(tensor, STATS_MAX_NUMEL):
        summary = _statistics(tensor)
        if summary:
            parts.append(summary)
    return " ".join(parts)


def _readable(tensor: torch.Tensor, max_numel: int) -> bool:
    """Whether reading ``tensor``'s values is cheap and meaningful."""
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.device.type != "meta"
        and not tensor.is_quantized
        and not tensor.is_complex()
        and 0 < tensor.numel() <= max_numel
    )


def _statistics(tensor: torch.Tensor) -> str:
    """``≈mean ±std [min, max]`` (floats), ``[min, max]`` (ints), ``true:n`` (bools)."""
    try:
        with torch.no_grad():
            data = tensor.detach()
            if data.dtype == torch.bool:
                return f"true:{int(data.sum())}/{data.numel()}"
            if not data.is_floating_point():
                return f"[{int(data.min())}, {int(data.max())}]"
            if data.numel() == 1:
                return f"= {float(data.float().reshape(()).cpu()):.4g}"
            values = data.float()
            finite = torch.isfinite(values)
            parts = []
            if bool(finite.any()):
                kept = values[finite]
                mean = float(kept.mean())
                spread = float(kept.std(correction=0))
                low, high = float(kept.min()), float(kept.max())
                parts.append(f"≈{mean:.3g} ±{spread:.3g} [{low:.3g}, {high:.3g}]")
            nan = int(torch.isnan(values).sum())
            inf = int(values.numel() - int(finite.sum()) - nan)
            if nan:
                parts.append(f"nan:{nan}")
            if inf:
                parts.append(f"inf:{inf}")
            return " ".join(parts)
    except (RuntimeError, TypeError, NotImplementedError):
        return ""  # an exotic dtype or device: the summary without statistics still helps


def render_tensor(
    node: Any, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> rendering_parts.RenderableAndLineAnnotations | NotImplementedType:
    """treescope handler for ``torch.Tensor`` (and ``nn.Parameter``, a subclass)."""
    del subtree_renderer  # a tensor has no children to render
    if not isinstance(node, torch.Tensor):
        return NotImplemented
    summary = rendering_parts.text(f"<{describe_tensor(node)}>")
    label = rendering_parts.abbreviation_color(summary)
    if not _readable(node, VALUES_MAX_NUMEL) or node.numel() == 1:
        return rendering_parts.RenderableAndLineAnnotations(
            renderable=label, annotations=rendering_parts.build_copy_button(path)
        )
    with torch.no_grad():
        values = repr(node.detach())
    return rendering_parts.build_custom_foldable_tree_node(
        label=label,
        contents=rendering_parts.fold_condition(
            expanded=rendering_parts.indented_children([rendering_parts.text(values)])
        ),
        path=path,
        expand_state=rendering_parts.ExpandState.COLLAPSED,
    )


class TensorAdapter(torch_support.TorchTensorAdapter):
    """treescope's NDArray adapter for torch tensors, minus its use of ``Tensor.names``.

    The adapter is what treescope's array views (``treescope.render_array``, the array
    autovisualizer) use to read tensors. Only the two methods that read axis names are
    replaced; slicing and dtype handling are treescope's own.
    """

    def get_axis_info_for_array_data(
        self, array: torch.Tensor
    ) -> tuple[ndarray_adapters.AxisInfo, ...]:
        return tuple(
            ndarray_adapters.PositionalAxisInfo(axis, size) for axis, size in enumerate(array.shape)
        )

    def get_array_summary(
        self, array: torch.Tensor, fast: bool
    ) -> rendering_parts.RenderableTreePart:
        return rendering_parts.text(describe_tensor(array, stats=not fast))
