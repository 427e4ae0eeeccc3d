"""``parallelize(model, mesh, plan)``: torch's tensor parallelism, with every site's layout known.

``torch.distributed.tensor.parallel.parallelize_module`` shards the listed ``nn.Linear`` /
``nn.Embedding`` modules column-wise (weight rows split: each rank computes part of the
output features) or row-wise (weight columns split: each rank takes part of the input
features and the partial outputs are all-reduced). It does so with hooks: a forward
pre-hook that makes the input a ``DTensor`` and a forward hook that makes the output a
plain local tensor again (``use_local_output=True``, the default). So, on each rank:

- before a column-wise module, intervention layers see a replicated ``DTensor`` (the full
  input); after it, a plain tensor holding this rank's part of the output features;
- before a row-wise module, a ``DTensor`` sharded on its last dimension (this rank's part
  of the input features); after it, the full, all-reduced output;
- in between — inside the module holding both, e.g. ``act_fn`` of a Llama MLP — plain local
  tensors, which carry no trace of being shards.

:func:`parallelize` calls ``parallelize_module`` with the user's plan and records, for every
module the plan names, how the tensors at its two sides are split (a
:class:`~torchsurgeon.distributed.split.Split` or replicated); for each module holding
sharded children (a *region*) that its own input and output are replicated; and for every
other module inside a region that its layout follows from the region's code (for those it
keeps a meta copy of the unsharded region, whose ``DTensor`` run finds it per call: see
:mod:`~torchsurgeon.distributed.inside`). Each of those modules gets a guard — a forward
pre-hook — that refuses to run intervention layers that were not placed for their site (see
:func:`~torchsurgeon.distributed.localize.localize`), so no layer ever acts on a shard as if
it were the whole tensor.

Three linear maps are not among the module types torch's styles take, and are sharded by a
style of the same kind with its own weight placements: GPT-2's ``Conv1D`` (weight
``[in, out]``: the other dimension split), a converted model's ``Projection`` (as an
``nn.Linear``) and ``HeadProjection`` (weight ``[head, d_head, d_model]``: split by heads,
column-wise only, so its output ``[batch, pos, head, d_head]`` is split along dimension -2).
A converted model's config carries its plan (``TransformerConfig.base_model_tp_plan``).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle

from torchsurgeon.distributed.inside import RegionProbe, meta_copy
from torchsurgeon.distributed.layouts import (
    SiteLayout,
    TensorParallelError,
    layout_of,
    own_style,
    styles_of,
    with_regions,
)
from torchsurgeon.plans.identity import BaseIdentity, identity_of
from torchsurgeon.surgery.frozen import is_frozen, wrap
from torchsurgeon.surgery.lineage import lineage_of
from torchsurgeon.surgery.paths import SITE_LISTS, child_path, describe

__all__ = [
    "SiteGuard",
    "SiteLayout",
    "TensorParallel",
    "TensorParallelError",
    "parallelize",
    "site_layouts",
    "tensor_parallel_of",
]


@dataclass(frozen=True)
class TensorParallel:
    """What :func:`parallelize` knows about a sharded model."""

    mesh: DeviceMesh
    identity: BaseIdentity
    layouts: Mapping[str, SiteLayout] = field(default_factory=dict)
    probes: Mapping[str, RegionProbe] = field(default_factory=dict)
    """Per region: what finds the layout of the sites inside it (see ``inside``)."""


_MODELS: weakref.WeakKeyDictionary[nn.Module, TensorParallel] = weakref.WeakKeyDictionary()


def tensor_parallel_of(model: nn.Module) -> TensorParallel | None:
    """The tensor-parallel record of ``model`` (or of the base it was rewritten from)."""
    found = _MODELS.get(model)
    return found if found is not None else _MODELS.get(lineage_of(model).base)


def site_layouts(model: nn.Module) -> dict[str, SiteLayout]:
    """Every guarded site of a model made by :func:`parallelize`, by path."""
    found = tensor_parallel_of(model)
    if found is None:
        raise TensorParallelError(
            "this model was not made by ts.distributed.parallelize, so its sites' layouts are "
            "unknown"
        )
    return dict(found.layouts)


class SiteGuard:
    """Forward pre-hook of a guarded module: refuse layers that would act on a shard blindly."""

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout

    def __call__(self, module: nn.Module, args: Any) -> None:
        layout = self.layout
        if layout.role != "region":
            for which in SITE_LISTS:
                for layer in module._modules.get(which) or ():
                    if not getattr(layer, "ts_sharded", False):
                        raise misplaced(layer, layout, which)
        self.check_children(module)

    def check_children(self, module: nn.Module) -> None:
        """Refuse a region whose sharded children were replaced or removed."""
        for name in self.layout.children:
            child = module._modules.get(name)
            if child is None or guard_of(child) is None:
                raise TensorParallelError(
                    f"the module at {describe(child_path(self.layout.path, name))} was replaced "
                    "or removed, but it is part of a tensor-parallel region (its tensors are "
                    "shards); replace and remove_from_parent are not supported there. Insert "
                    "layers before/after it instead."
                )


def guard_of(module: nn.Module) -> SiteGuard | None:
    """The :class:`SiteGuard` of a module, if it has one."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SiteGuard):
            return hook
    return None


def misplaced(layer: nn.Module, layout: SiteLayout, which: str) -> TensorParallelError:
    """The error for ``layer`` at a guarded site where it cannot run as it is."""
    side = "before" if which == SITE_LISTS[0] else "after"
    name = type(layer).__name__
    where = f"{name} inserted {side} {describe(layout.path)}"
    split = layout.side(which)
    if layout.role == "inside":
        shape = f"inside the sharded region {describe(layout.region)}, where it may be a shard"
    else:
        shape = split.describe() if split is not None else "replicated"
    return TensorParallelError(
        f"{where} was not placed for tensor parallelism (the tensor there is {shape}); as it "
        "is it would act on this rank's shard as if it were the whole tensor. Call "
        "ts.distributed.localize(model) after the last rewrite (ts.distributed.apply does it "
        "for a plan)."
    )


# --------------------------------------------------------------------- other linear maps


def _same_model_everywhere(identity: BaseIdentity, mesh: DeviceMesh) -> None:
    if mesh.size() == 1:
        return
    seen: list[Any] = [None] * mesh.size()
    dist.all_gather_object(seen, identity.to_json(), group=mesh.get_group())
    for rank, other in enumerate(seen):
        if other != identity.to_json():
            raise TensorParallelError(
                f"rank {rank} built a different model from rank {mesh.get_local_rank()} "
                f"({'; '.join(identity.differences(BaseIdentity.from_json(other)))}); build "
                "the same weights on every rank (seed the model factory)"
            )


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def parallelize(
    model: nn.Module, mesh: DeviceMesh, plan: Mapping[str, Any] | str = "auto"
) -> nn.Module:
    """Shard ``model`` over ``mesh`` with ``plan`` and return it as a frozen tree.

    ``plan`` maps module paths (``fnmatch`` patterns per segment, as ``parallelize_module``
    takes them) to ``ColwiseParallel()`` / ``RowwiseParallel()`` or the strings
    ``"colwise"`` / ``"rowwise"``; ``"auto"`` uses the model's
    ``config.base_model_tp_plan`` (Llama, Qwen2, Mistral, ...). Like ``parallelize_module``,
    this shards ``model`` *in place* — its parameters become ``DTensor`` shards — so build
    the model on every rank, with the same weights (this is checked), and use the returned
    tree. Its selectors see the same paths as the unsharded model's, and
    ``ts.distributed.apply`` replays plans made against the unsharded model on it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize expects an nn.Module, got {type(model).__name__}")
    if is_frozen(model):
        raise TensorParallelError(
            "parallelize the plain model, before ts.wrap: parallelize_module replaces its "
            "parameters, which a torchsurgeon tree refuses"
        )
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise TensorParallelError("this model is already parallelized (it has DTensor parameters)")
    if mesh.ndim != 1:
        raise TensorParallelError(f"tensor parallelism takes a 1-D device mesh, got {mesh.ndim}-D")
    styles = styles_of(model, plan)
    parts, part = mesh.size(), mesh.get_local_rank()
    modules = dict(model.named_modules())
    layouts = {
        path: layout_of(path, modules[path], style, parts, part) for path, style in styles.items()
    }
    layouts = with_regions(model, layouts)
    identity = identity_of(model)
    _same_model_everywhere(identity, mesh)
    torch_plan = {path: own_style(style, modules[path]) for path, style in styles.items()}
    probes = _probes(modules, layouts, torch_plan, mesh)  # meta copies, made before sharding
    parallelize_module(model, mesh, torch_plan)
    for path, layout in layouts.items():
        modules[path].register_forward_pre_hook(SiteGuard(layout), prepend=True)
    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(_drop_grad)
    tree = wrap(model)
    _MODELS[tree] = TensorParallel(mesh, identity, layouts, probes)
    return tree


def _probes(
    modules: Mapping[str, nn.Module],
    layouts: Mapping[str, SiteLayout],
    torch_plan: Mapping[str, ParallelStyle],
    mesh: DeviceMesh,
) -> dict[str, RegionProbe]:
    """A :class:`RegionProbe` per region with modules inside it: a meta copy of the unsharded
    region and its children's styles, returning ``DTensor`` s (``use_local_output=False``)."""
    probes = {}
    holding = {layout.region for layout in layouts.values() if layout.role == "inside"}
    for region in holding:
        styles = {}
        for path, style in torch_plan.items():
            if path.rpartition(".")[0] == region:
                twin = copy.copy(style)
                twin.use_local_output = False
                styles[path[len(region) + 1 :]] = twin
        probes[region] = RegionProbe(region, meta_copy(modules[region]), styles, mesh)
    return probes
