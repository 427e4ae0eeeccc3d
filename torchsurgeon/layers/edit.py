"""Layers that write: set, add, scale, zero, mean-ablate, noise, or cut the gradient.

Each returns a new tensor (an activation another module still holds is never changed: the
input is cloned before an in-place write, or the output is built fresh) and, given
``index=ts.idx[...]``, acts only on that part of the tensor. Values broadcast against the
indexed part, as in PyTorch.

These layers run on every forward pass — on every token of ``generate`` — so what does not
depend on the input is computed once and kept: the index checked and turned into index
tensors (per shape and device, in :meth:`Index.for_tensor`), ``scale * vector`` and any
dtype conversion of a layer's tensors (per dtype, while the layer holds the very same tensor
objects and nothing has written to them in place), and ``Noise``'s draw (per shape, dtype
and device: the draw is a function of those and the seed). A layer is frozen and ``.to()``
makes new layer objects, so a kept value never outlives what it was computed from. Nothing
is kept under ``torch.compile`` (the graph holds it), for tensors that require grad (the
value would carry a stale autograd graph) or are inference tensors (which have no version
counter to tell a write), or under ``torch.func`` transforms.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from torchsurgeon.layers.base import InterventionLayer, Steps, register_layer
from torchsurgeon.layers.expr import Expr
from torchsurgeon.layers.index import Index, remember
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, SiteError

__all__ = ["Add", "MeanAblate", "Noise", "Scale", "SetValues", "StopGradient", "Zero"]

_KEPT = "_ts_kept"
_MAX_NOISE_ELEMENTS = 1 << 20
"""Draws kept per Noise layer are at most this big (4 MiB in fp32); bigger ones are redrawn."""


def _part(layer: InterventionLayer, x: torch.Tensor) -> tuple[Any, ...]:
    """The layer's index for ``x`` (checked, cached per shape); ``(...,)`` without one."""
    if layer.index is None:
        return (Ellipsis,)
    return layer.index.for_tensor(x, layer._where)


def _kept(
    layer: InterventionLayer,
    slot: str,
    sources: tuple[torch.Tensor, ...],
    key: Any,
    make: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``make()``, computed once per ``key`` while the layer holds the same ``sources``.

    "The same" is the same tensor objects at the same version: an in-place write to a source
    (``layer.vector.mul_(2)``) bumps its version counter and the value is made again. The
    kept entry holds the sources themselves, so their ids cannot be reused by other tensors
    while it lives. The value is made outside inference mode, so it may meet tensors that
    autograd tracks. Inference tensors have no version counter: with one, nothing is kept.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return make()
    versions = []
    for t in sources:
        if t.requires_grad or t.is_inference():
            return make()
        versions.append(t._version)
    kept: dict[Any, Any] = layer.__dict__.setdefault(_KEPT, {})
    entry = kept.get((slot, key))
    if entry is not None and entry[1] == versions and all(map(operator.is_, entry[0], sources)):
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():
        value = make()
    remember(kept, (slot, key), (sources, versions, value))
    return value


def _as_dtype(layer: InterventionLayer, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The layer's tensor ``name`` in ``dtype`` (itself when it already is)."""
    tensor: torch.Tensor = layer._buffers[name]  # type: ignore[assignment]
    if tensor.dtype == dtype:
        return tensor
    return _kept(layer, name, (tensor,), dtype, lambda: _cast(layer, name, tensor, dtype))


def _cast(layer: InterventionLayer, name: str, value: torch.Tensor, dtype: torch.dtype) -> Any:
    """``value`` in the target's ``dtype``; a cast that would change values is a SiteError.

    The rule: the tensor the layer acts on keeps its dtype (a float64 or bfloat16 vector on a
    float32 model acts in float32). Refused: complex values on a real tensor, and values
    that are not whole numbers on an integer or bool tensor (token ids, masks).
    """
    if value.dtype == dtype:
        return value
    lossy = ""
    if value.is_complex() and not dtype.is_complex:
        lossy = "complex values would lose their imaginary part; give real values"
    elif (
        value.is_floating_point()
        and not (dtype.is_floating_point or dtype.is_complex)
        and not value.is_meta
        and not bool((value == value.trunc()).all())
    ):
        lossy = "values that are not whole numbers would be truncated; give whole numbers"
    if lossy:
        raise SiteError(
            f"{layer._where()}{name} is {value.dtype} but the tensor there is {dtype}: "
            f"{lossy}, or act on another tensor with on=..."
        )
    return value.to(dtype)


def _misfit(layer: InterventionLayer, name: str, value: torch.Tensor, x: torch.Tensor) -> None:
    """Raise a SiteError naming the site if ``value`` does not broadcast to the part of
    ``x`` the layer acts on (called once an operation failed; else it returns)."""
    part = tuple(x[_part(layer, x)].shape)
    shape = tuple(value.shape)
    try:
        if torch.broadcast_shapes(shape, part) == part:
            return  # it fits: the failure was something else
    except RuntimeError:
        pass
    width = shape[-1] if shape else 1
    hint = f"give {part[-1]} values" if part else "give a single value"
    raise SiteError(
        f"{layer._where()}{name} has width {width} (shape {shape}) but the tensor there has "
        f"width {part[-1] if part else 1} (shape {part}"
        f"{'' if layer.index is None else f', indexed by {layer.index}'}): {hint}, or pick "
        "another site, tensor (on=...) or part (index=ts.idx[...])"
    ) from None


def _filled(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``x`` holding ``value`` broadcast (no copy of ``x`` is made)."""
    out = torch.empty_like(x)
    out[...] = value  # the very assignment the indexed case makes, broadcasting and all
    return out


class _Fits:
    """The insertion-time check of a layer whose tensor ``fits_field`` broadcasts to its target."""

    fits_field = ""

    def misfit_width(self, width: int) -> str | None:
        """Why the layer cannot act on a target whose last dimension is ``width`` (else None).

        Only for the whole primary tensor (no ``on=``, no ``index=``): that is the tensor
        whose width a site knows before it runs (see ``sites.site_width``).
        """
        if getattr(self, "on", None) is not None or getattr(self, "index", None) is not None:
            return None
        value = self._buffers.get(self.fits_field)  # type: ignore[attr-defined]
        if value is None or value.dim() == 0 or value.shape[-1] in (1, width):
            return None
        return (
            f"{type(self).__name__}: {self.fits_field} has width {value.shape[-1]} (shape "
            f"{tuple(value.shape)}) but the tensor there has width {width}"
        )


@register_layer
class SetValues(_Fits, InterventionLayer):
    """Set ``tensor[index]`` to ``value`` (a number, a tensor broadcast to the part, or an
    expression evaluated on every call with ``ts.here`` the whole tensor)."""

    type_name = "SetValues"
    fits_field = "value"
    tensor_fields = ("value",)
    expr_fields = ("value",)

    def __init__(
        self,
        index: Index | None,
        value: float | torch.Tensor | Expr,
        *,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)
        if isinstance(value, Expr):
            self._set_expr("value", value)
        else:
            self._set_tensor("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "value" not in self._buffers:
            value = self._evaluate("value", x)
            if isinstance(value, torch.Tensor):
                value = _cast(self, "value", value, x.dtype)
        else:
            value = _as_dtype(self, "value", x.dtype)
        try:
            if self.index is None:
                return _filled(x, value)
            index = _part(self, x)
            out = x.clone()
            out[index] = value
            return out
        except RuntimeError:
            if isinstance(value, torch.Tensor):
                _misfit(self, "value", value, x)
            raise

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        part = _shard_part(self, shape, split)
        return None if part is None else SetValues(part.index, _cut(self.value, part, "value"))


@register_layer
class Add(_Fits, InterventionLayer):
    """Add ``scale * vector`` (a steering vector) to the tensor, or to ``tensor[index]``."""

    type_name = "Add"
    fits_field = "vector"
    trainable_fields = ("vector",)
    tensor_fields = ("vector", "scale")
    expr_fields = ("vector",)

    def __init__(
        self,
        vector: torch.Tensor | Expr,
        scale: float | torch.Tensor = 1.0,
        *,
        index: Index | None = None,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)
        if isinstance(vector, Expr):
            self._set_expr("vector", vector)
        elif isinstance(vector, torch.Tensor):
            self._set_tensor("vector", vector)
        else:
            raise ArgumentTypeError(
                f"Add: vector must be a tensor or an expression, got {type(vector).__name__}"
            )
        self._set_tensor("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._buffers["scale"]  # (getattr is slower)
        vector = self._buffers.get("vector")
        if vector is None:  # an expression: a new value on every call
            delta = _cast(self, "vector", scale * self._evaluate("vector", x), x.dtype)
        else:
            delta = _kept(
                self,
                "delta",
                (scale, vector),
                x.dtype,
                lambda: _cast(self, "vector", scale * vector, x.dtype),
            )
        try:
            if self.index is None:
                return x + delta
            index = _part(self, x)
            out = x.clone()
            out[index] = out[index] + delta
            return out
        except RuntimeError:
            _misfit(self, "vector", delta, x)
            raise

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        part = _shard_part(self, shape, split)
        if part is None:
            return None
        return Add(_cut(self.scale * self.vector, part, "vector"), index=part.index)


@register_layer
class Scale(_Fits, InterventionLayer):
    """Multiply the tensor (or ``tensor[index]``) by ``factor``."""

    type_name = "Scale"
    fits_field = "factor"
    tensor_fields = ("factor",)

    def __init__(
        self,
        factor: float | torch.Tensor,
        *,
        index: Index | None = None,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)
        self._set_tensor("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = _as_dtype(self, "factor", x.dtype)
        try:
            if self.index is None:
                return x * factor
            index = _part(self, x)
            out = x.clone()
            out[index] = out[index] * factor
            return out
        except RuntimeError:
            _misfit(self, "factor", factor, x)
            raise

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        part = _shard_part(self, shape, split)
        if part is None:
            return None
        return Scale(_cut(self.factor, part, "factor"), index=part.index)


@register_layer
class Zero(InterventionLayer):
    """Zero the tensor, or ``tensor[index]`` (zero ablation)."""

    type_name = "Zero"

    def __init__(
        self, index: Index | None = None, *, on: int | str | None = None, steps: Steps = None
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return torch.zeros_like(x)
        index = _part(self, x)
        zero = _kept(self, "zero", (), (x.dtype, x.device), lambda: x.new_zeros(()))
        out = x.clone()
        out[index] = zero
        return out

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        part = _shard_part(self, shape, split)
        return None if part is None else Zero(part.index)


@register_layer
class MeanAblate(_Fits, InterventionLayer):
    """Replace the tensor (or ``tensor[index]``) by ``mean``, e.g. a dataset mean activation."""

    type_name = "MeanAblate"
    fits_field = "mean"
    tensor_fields = ("mean",)

    def __init__(
        self,
        mean: torch.Tensor,
        *,
        index: Index | None = None,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)
        if not isinstance(mean, torch.Tensor):
            raise ArgumentTypeError(f"MeanAblate: mean must be a tensor, got {type(mean).__name__}")
        self._set_tensor("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = _as_dtype(self, "mean", x.dtype)
        try:
            if self.index is None:
                return _filled(x, mean)
            index = _part(self, x)
            out = x.clone()
            out[index] = mean
            return out
        except RuntimeError:
            _misfit(self, "mean", mean, x)
            raise

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        part = _shard_part(self, shape, split)
        if part is None:
            return None
        return MeanAblate(_cut(self.mean, part, "mean"), index=part.index)


@register_layer
class Noise(InterventionLayer):
    """Add Gaussian noise of standard deviation ``std`` (causal tracing's corruption).

    The noise is drawn from a generator seeded with ``seed``, so the same tensor shape gets
    the same noise in every run and every call: corrupted runs are reproducible. (A draw of
    up to a million elements is kept per shape, dtype and device rather than drawn again.)
    """

    type_name = "Noise"
    config_fields = ("std", "seed")

    def __init__(
        self,
        std: float,
        seed: int = 0,
        *,
        index: Index | None = None,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, index=index, steps=steps)
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not std >= 0:
            raise ArgumentError(f"Noise: std must be a number >= 0, got {std!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ArgumentTypeError(f"Noise: seed must be an int, got {seed!r}")
        self.std = float(std)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = _part(self, x)
        if x.is_meta:  # a structure-only run checks shapes; there is no generator on meta
            return x.clone()
        part = x[index]
        shape, dtype, device = part.shape, x.dtype, x.device

        def draw() -> torch.Tensor:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            return self.std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

        if part.numel() > _MAX_NOISE_ELEMENTS:
            noise = draw()
        else:  # no sources: the draw depends only on the config (seed, std) and the key
            noise = _kept(self, "noise", (), (tuple(shape), dtype, device), draw)
        if self.index is None:
            return x + noise
        out = x.clone()
        out[index] = part + noise
        return out

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        """The full part's draw (every rank draws the same), this shard's positions of it."""
        part = _shard_part(self, shape, split)
        if part is None:
            return None
        with torch.no_grad():
            noise = Noise(self.std, self.seed)(torch.zeros(part.shape, dtype=dtype, device=device))
        return Add(_cut(noise, part, "noise"), index=part.index)


@register_layer
class StopGradient(InterventionLayer):
    """Pass the tensor through with no gradient flowing back (``detach``)."""

    type_name = "StopGradient"
    takes_index = False

    def __init__(self, *, on: int | str | None = None, steps: Steps = None) -> None:
        super().__init__(on=on, steps=steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        return self  # elementwise, no values of its own


def _shard_part(layer: InterventionLayer, shape: tuple[int, ...], split: Any) -> Any:
    """The part of ``layer``'s index on this shard (``None``: nothing here)."""
    from torchsurgeon.distributed.split import local_part

    return local_part(layer.index, shape, split)


def _cut(value: torch.Tensor, part: Any, name: str) -> torch.Tensor:
    from torchsurgeon.distributed.split import cut

    return cut(value, part, name)
