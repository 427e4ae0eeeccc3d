"""Sites inside a sharded region: their layout, read off the unsharded region run on DTensors.

Between the projections of a tensor-parallel region (``act_fn`` of a Llama MLP, the
dropout after GPT-2's ``c_proj``) each rank runs the model's own code on plain local
tensors, which carry no trace of how they are split. Guessing from shapes is not enough: a
reshape that folds the sharded dimension into another gives a tensor of the "right" local
size whose elements are interleaved, and a sum over the sharded features gives a tensor of
the full shape that differs from rank to rank. Neither may be recorded or edited as if it
were a known part of the full tensor.

What does know is ``DTensor``. :class:`RegionProbe` keeps a copy of the unsharded region
with its parameters on the meta device (no memory), sharded with the same styles but with
``use_local_output=False``, so its code runs on ``DTensor`` s and torch's sharding
propagation says, for every tensor between the projections, whether it is ``Shard(d)``
(split along ``d``), ``Replicate()`` (whole on every rank) or ``Partial()`` (a per-rank
share of a sum). When the real region is called and some site inside it holds layers, the
probe runs that copy once for the call's argument shapes (meta collectives communicate
nothing) and records the placement and full shape of every inside module's input and
output; the result is kept per argument signature. The layers inside the region
(:class:`~torchsurgeon.distributed.sharded.Sharded`) then act on the split the probe found,
and check that the local tensor has exactly the shape the placement implies, so a local
program that does something other than what its ``DTensor`` twin does is refused, not
trusted. A partial sum, a module called more than once with different layouts, a tensor the
region made for itself, or an argument that cannot be copied to meta (a key-value cache) is
refused with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from torchsurgeon.distributed.collectives import same_on_every_rank
from torchsurgeon.distributed.split import Split
from torchsurgeon.layers.index import remember
from torchsurgeon.surgery.errors import SurgeryError
from torchsurgeon.surgery.paths import child_path, describe

__all__ = ["InsideSides", "RegionProbe", "meta_copy"]

_LEAVES = (bool, int, float, str, type(None), torch.dtype, torch.device)
"""Argument values other than tensors a region may be called with (they enter the key);
tuples, lists, dicts and dataclass instances (a converted model's ``ForwardContext``) of
them are walked."""


class InsideError(SurgeryError, ValueError):
    """A site inside a sharded region whose layout cannot be known for this call."""


@dataclass(frozen=True)
class InsideSides:
    """The layout of one inside module's input and output for one call signature.

    ``input`` / ``output`` are the :class:`Split` (``None``: replicated) and
    ``input_shape`` / ``output_shape`` the full shapes; ``refused`` says why a side's
    layout is not known (a partial sum, a tensor made inside the region, ...).
    """

    input: Split | None
    output: Split | None
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    refused: Mapping[str, str]

    def side(self, before: bool) -> tuple[Split | None, tuple[int, ...] | None]:
        which = "input" if before else "output"
        if which in self.refused:
            raise InsideError(self.refused[which])
        return (self.input, self.input_shape) if before else (self.output, self.output_shape)


def meta_copy(region: nn.Module) -> nn.Module:
    """A copy of the unsharded ``region`` whose parameters and buffers are meta tensors.

    Only the module objects are copied (their tensors are replaced, not copied), so it costs
    no memory; it is in eval mode, so dropout draws nothing.
    """
    memo: dict[int, Any] = {}
    for tensor in [*region.parameters(), *region.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(region, memo).eval()


class RegionProbe:
    """Forward pre-hook of a region: the layouts of its inside sites for this call.

    ``styles`` are the styles of the region's sharded children (paths relative to it),
    copies with ``use_local_output=False``; ``unsharded`` the region's :func:`meta_copy`.
    """

    def __init__(
        self, path: str, unsharded: nn.Module, styles: dict[str, ParallelStyle], mesh: DeviceMesh
    ) -> None:
        self.path = path
        self.mesh = mesh
        self._unsharded: nn.Module | None = unsharded
        self._styles = styles
        self._sharded: nn.Module | None = None
        self._known: dict[Any, dict[str, InsideSides]] = {}
        self._lock = threading.Lock()
        self._call = threading.local()
        self.last: dict[str, InsideSides] = {}
        """The layouts of the latest call (what training's gradient reduction reads)."""

    def __copy__(self) -> RegionProbe:
        return self  # one per region of a sharded base, shared by every tree made from it

    def __deepcopy__(self, memo: dict[int, Any]) -> RegionProbe:
        return self

    # -- during the region's call ---------------------------------------------------------

    @torch.compiler.disable  # a meta DTensor run and a cache lookup: eager, never traced
    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._call.sides = None
        self._call.error = None
        try:
            leaves = _leaves(args, kwargs)
        except InsideError as error:
            # raised only if a layer inside asks for its layout
            self._call.error = f"{describe(self.path)}: {error}"
            return
        key = _key(leaves)
        sides = self._known.get(key)
        if sides is None:
            with self._lock:
                sides = self._analyse(args, kwargs, leaves)
                remember(self._known, key, sides)
        self._call.sides = sides
        self.last = sides

    def done(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: nothing outlives the call."""
        self._call.sides = None
        self._call.error = None

    def sides(self, inside: str) -> InsideSides:
        """The layout of the inside module at path ``inside`` (relative) in this call."""
        error = getattr(self._call, "error", None)
        if error is not None:
            raise InsideError(error)
        sides = getattr(self._call, "sides", None)
        if sides is None:
            raise InsideError(
                f"the layout inside {describe(self.path)} is known only while the region "
                "runs, and the region did not announce this call (was it replaced after "
                "ts.distributed.localize?)"
            )
        found = sides.get(inside)
        if found is None:
            raise InsideError(
                f"{describe(child_path(self.path, inside))} was not called when the unsharded "
                f"region {describe(self.path)} ran on meta tensors with this call's arguments, "
                "so its layout is unknown"
            )
        return found

    # -- the analysis ---------------------------------------------------------------------

    def _analyse(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], leaves: list[Leaf]
    ) -> dict[str, InsideSides]:
        named = [(where, v) for where, v in leaves if isinstance(v, torch.Tensor)]
        agree = same_on_every_rank([t for _, t in named], self.mesh)
        differing = [name for (name, _), same in zip(named, agree, strict=True) if not same]
        if differing:  # the twin is given whole (replicated) tensors: these are not
            reason = (
                f"the region {describe(self.path)} is called with {differing[0]} holding "
                "different values on different ranks (e.g. a key-value cache holding this "
                "rank's heads), so its DTensor twin, which takes every argument as whole, "
                "cannot find the layout of the sites inside it; run without a KV cache, or "
                "insert the layer at a projection of the region"
            )
            return {name: _refused(reason) for name in self._inside_names()}
        region = self._sharded_copy()
        seen: dict[str, list[tuple[Any, Any]]] = {}
        handles = []
        for name, module in region.named_modules():
            if name and name not in self._styles and not _under(name, self._styles):

                def record(module: nn.Module, a: Any, out: Any, name: str = name) -> None:
                    seen.setdefault(name, []).append((a[0] if a else None, out))

                handles.append(module.register_forward_hook(record))
        try:
            meta_args, meta_kwargs = _to_meta((args, kwargs), self.mesh)
            with torch.no_grad():
                region(*meta_args, **meta_kwargs)
        except Exception as error:  # what DTensor could not follow: refused where asked
            reason = (
                f"the unsharded region {describe(self.path)} could not run on DTensors to "
                f"find the layout of the tensors inside it ({type(error).__name__}: {error})"
            )
            return {name: _refused(reason) for name in self._inside_names()}
        finally:
            for handle in handles:
                handle.remove()
        return {name: self._sides(name, calls) for name, calls in seen.items()}

    def _inside_names(self) -> list[str]:
        region = self._sharded if self._sharded is not None else self._unsharded
        assert region is not None
        return [name for name, _ in region.named_modules() if name]

    def _sharded_copy(self) -> nn.Module:
        if self._sharded is None:
            assert self._unsharded is not None
            twin = parallelize_module(self._unsharded, self.mesh, self._styles)
            _replicate_the_rest(twin, self.mesh)
            self._sharded, self._unsharded = twin, None
        return self._sharded

    def _sides(self, name: str, calls: list[tuple[Any, Any]]) -> InsideSides:
        where = describe(child_path(self.path, name))
        found = {self._layout(where, "input", a) for a, _ in calls}
        made = {self._layout(where, "output", out) for _, out in calls}
        refused: dict[str, str] = {}
        picked: dict[str, tuple[Split | None, tuple[int, ...] | None]] = {}
        for which, layouts in (("input", found), ("output", made)):
            if len(layouts) > 1:
                refused[which] = (
                    f"{where} is called {len(calls)} times in one call of its region, with "
                    f"different layouts of its {which}; a layer there cannot be placed once"
                )
                continue
            (layout,) = layouts
            if isinstance(layout, str):
                refused[which] = layout
            else:
                picked[which] = layout
        split_in, shape_in = picked.get("input", (None, None))
        split_out, shape_out = picked.get("output", (None, None))
        return InsideSides(split_in, split_out, shape_in, shape_out, refused)

    def _layout(self, where: str, which: str, value: Any) -> Any:
        """``(split, full shape)`` of one tensor of the meta run, or why it is not known."""
        if not isinstance(value, torch.Tensor):
            return f"the {which} of {where} is a {type(value).__name__}, not a tensor"
        if not isinstance(value, DTensor):
            return (
                f"the {which} of {where} is a tensor the region makes itself, not one derived "
                "from its sharded projections, so torchsurgeon cannot say how it is laid out"
            )
        shape = tuple(value.shape)
        placement = value.placements[0]
        if isinstance(placement, Replicate):
            return (None, shape)
        if type(placement) is Shard:  # not a subclass: _StridedShard is interleaved
            dim = placement.dim % len(shape)
            parts = self.mesh.size()
            if shape[dim] % parts:
                return (
                    f"the {which} of {where} is split unevenly ({shape[dim]} elements along "
                    f"dimension {dim} over {parts} ranks)"
                )
            return (Split(dim - len(shape), shape[dim], parts, self.mesh.get_local_rank()), shape)
        instead = "Insert the layer at a projection of the region instead."
        if isinstance(placement, Partial):
            return (
                f"the {which} of {where} is a partial {placement.reduce_op} (Partial): each "
                f"rank holds a share of a {placement.reduce_op} over the sharded dimension, not "
                "a part of the full tensor, so no layer can act on it as the unsharded "
                f"model's would. {instead}"
            )
        return (
            f"the {which} of {where} is laid out as {placement!r}, not as equal contiguous "
            "parts of one dimension (e.g. the sharded features folded into another "
            "dimension, which interleaves the ranks' elements), so no layer can act on it as "
            f"the unsharded model's would. {instead}"
        )


def _replicate_the_rest(twin: nn.Module, mesh: DeviceMesh) -> None:
    """Make the twin's unsharded tensors (a norm's weight inside the region, buffers)
    replicated DTensors, as on the ranks every one of them is whole: DTensor ops refuse to
    mix plain tensors in."""
    for module in twin.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not isinstance(param, DTensor):
                whole = DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False)
                module._parameters[name] = nn.Parameter(whole, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not isinstance(buffer, DTensor):
                module._buffers[name] = DTensor.from_local(
                    buffer, mesh, [Replicate()], run_check=False
                )


def _refused(reason: str) -> InsideSides:
    return InsideSides(None, None, None, None, {"input": reason, "output": reason})


def _under(name: str, styles: Mapping[str, Any]) -> bool:
    return any(name.startswith(path + ".") for path in styles)


Leaf = tuple[str, Any]
"""An argument's place (``"argument 1.cache.keys[0]"``) and its value (a tensor or plain)."""


def _leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Leaf]:
    """Every tensor and plain value in a region call's arguments, by place; raises
    :class:`InsideError` for a value no meta copy can be made of (a DTensor, a cache)."""
    found = [leaf for i, v in enumerate(args) for leaf in _walk(v, f"argument {i}")]
    return found + [leaf for k, v in kwargs.items() for leaf in _walk(v, f"argument {k!r}")]


def _walk(value: Any, where: str) -> list[Leaf]:
    if isinstance(value, DTensor):
        raise InsideError(
            f"{where} of the region is a DTensor; only plain (replicated) tensors are "
            "supported as a region's arguments"
        )
    if isinstance(value, (torch.Tensor, *_LEAVES)):
        return [(where, value)]
    if type(value) in (tuple, list):
        return [leaf for i, v in enumerate(value) for leaf in _walk(v, f"{where}[{i}]")]
    if type(value) is dict:
        return [leaf for k, v in value.items() for leaf in _walk(v, f"{where}[{k!r}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a ForwardContext
        fields = dataclasses.fields(value)
        return [leaf for f in fields for leaf in _walk(getattr(value, f.name), f"{where}.{f.name}")]
    raise InsideError(
        f"the region is called with {where} of type {type(value).__name__}, which cannot be "
        "copied to meta tensors to find the layout of the sites inside it (a key-value "
        "cache: run without one, use_cache=False)"
    )


def _key(leaves: list[Leaf]) -> Any:
    """A hashable key for a region call: each place with its tensor's shape and dtype, or
    its plain value."""
    return tuple(
        (where, ("tensor", tuple(v.shape), v.dtype))
        if isinstance(v, torch.Tensor)
        else (where, (type(v).__name__, v))
        for where, v in leaves
    )


def _to_meta(value: Any, mesh: DeviceMesh) -> Any:
    if isinstance(value, torch.Tensor):
        meta = torch.empty(value.shape, dtype=value.dtype, device="meta")
        return DTensor.from_local(meta, mesh, [Replicate()], run_check=False)
    if type(value) in (tuple, list):
        return type(value)(_to_meta(v, mesh) for v in value)
    if type(value) is dict:
        return {k: _to_meta(v, mesh) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        twin = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(twin, f.name, _to_meta(getattr(value, f.name), mesh))
        return twin
    return value
