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
import fnmatch
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement
from transformers.pytorch_utils import Conv1D

from torchsurgeon.distributed.inside import RegionProbe, meta_copy
from torchsurgeon.distributed.split import Split
from torchsurgeon.layers.transformer.projection import HeadProjection, Projection
from torchsurgeon.plans.identity import BaseIdentity, identity_of
from torchsurgeon.surgery.errors import SurgeryError, closest
from torchsurgeon.surgery.frozen import is_frozen, wrap
from torchsurgeon.surgery.lineage import lineage_of
from torchsurgeon.surgery.paths import SITE_LISTS, child_path, describe, iter_nodes

__all__ = [
    "SiteGuard",
    "SiteLayout",
    "TensorParallel",
    "TensorParallelError",
    "parallelize",
    "site_layouts",
    "tensor_parallel_of",
]

Role = Literal["colwise", "rowwise", "region", "inside"]
STYLE_NAMES: dict[str, type[ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
}
UNSHARDED_STYLES = ("replicated_with_grad_allreduce",)
"""``transformers`` plan styles that shard nothing (Qwen3's ``q_norm``/``k_norm``: weights kept
whole on every rank, their gradients summed when *they* are trained, which torchsurgeon does
not do): ``"auto"`` leaves those modules as they are, inside their region."""


class TensorParallelError(SurgeryError, ValueError):
    """A tensor-parallel plan, model or layer placement torchsurgeon cannot handle."""


@dataclass(frozen=True)
class SiteLayout:
    """How the tensors at the two sides of one module are laid out across the ranks.

    ``input`` is the split of what layers inserted *before* the module see, ``output`` of
    what layers inserted *after* it see (``None``: replicated, the full tensor on every
    rank). ``role`` is the module's part: ``colwise`` / ``rowwise`` (named by the plan),
    ``region`` (holds sharded children; its own input and output are replicated) or
    ``inside`` (within a region, not named by the plan: its tensors' layout follows from the
    region's code and is found per call, see ``inside``).
    ``children`` are the guarded children, which must stay in place.
    """

    path: str
    role: Role
    input: Split | None = None
    output: Split | None = None
    region: str = ""
    children: tuple[str, ...] = ()

    def side(self, which: str) -> Split | None:
        return self.input if which == SITE_LISTS[0] else self.output

    def describe(self) -> str:
        if self.role in ("colwise", "rowwise"):
            sides = [
                f"{name}: {split.describe() if split else 'replicated'}"
                for name, split in (("input", self.input), ("output", self.output))
            ]
            return f"{self.role} ({'; '.join(sides)})"
        if self.role == "region":
            return "a module holding sharded projections (its input and output are replicated)"
        return f"inside the sharded region {describe(self.region)}"


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


def _weight_splits(module: nn.Module) -> tuple[dict[str, Placement], dict[str, Placement]] | None:
    """For a linear map torch's styles do not take: how a column-wise and a row-wise split
    place its weight and bias; ``None`` for ``nn.Linear`` / ``nn.Embedding`` (torch's own).

    - ``Conv1D`` (GPT-2, weight ``[in, out]``): the weight's other dimension split;
    - ``Projection`` (a converted model, weight ``[out, in]``): as ``nn.Linear``;
    - ``HeadProjection`` (weight ``[head, d_head, d_model]``): column-wise only, by heads.
    """
    if isinstance(module, Conv1D):
        return {"weight": Shard(1), "bias": Shard(0)}, {"weight": Shard(0), "bias": Replicate()}
    if isinstance(module, Projection):
        return {"weight": Shard(0), "bias": Shard(0)}, {"weight": Shard(1), "bias": Replicate()}
    if isinstance(module, HeadProjection):
        return {"weight": Shard(0), "bias": Shard(0)}, {}
    return None


def _own_style(style: ParallelStyle, module: nn.Module) -> ParallelStyle:
    """``style`` for a module of :func:`_weight_splits` (an equivalent style otherwise)."""
    splits = _weight_splits(module)
    if splits is None:
        return style
    colwise = isinstance(style, ColwiseParallel)
    colwise_placements, rowwise_placements = splits
    placements = colwise_placements if colwise else rowwise_placements
    kind = type(module)

    def partition(name: str, part: nn.Module, mesh: DeviceMesh) -> None:
        if not isinstance(part, kind):
            return
        for key, placement in placements.items():
            param = part._parameters.get(key)
            if param is not None:
                sharded = distribute_tensor(param, mesh, [placement], src_data_rank=0)
                part.register_parameter(key, nn.Parameter(sharded, param.requires_grad))

    class OwnStyle(type(style)):  # type: ignore[misc]
        def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
            if not colwise:
                self.desired_input_layouts = (Shard(-1),)
            return distribute_module(
                module,
                device_mesh,
                partition,
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
            )

    copy = OwnStyle.__new__(OwnStyle)
    copy.__dict__.update(style.__dict__)
    if isinstance(module, HeadProjection):  # [batch, pos, head, d_head]: split by heads
        copy.output_layouts = (Shard(-2),)
    return copy


# --------------------------------------------------------------------- the plan


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear, Projection, Embedding (ids -> dim) or Conv1D; for
    a HeadProjection, ``(d_model, heads)``."""
    weight = module.weight
    if isinstance(module, (nn.Linear, Projection)):
        return weight.shape[1], weight.shape[0]
    if isinstance(module, Conv1D):
        return weight.shape[0], weight.shape[1]
    if isinstance(module, HeadProjection):
        return weight.shape[2], weight.shape[0]
    return 0, weight.shape[1]  # nn.Embedding: token ids in, embedding_dim out


def _split_of(
    layouts: tuple[Any, ...], size: int, parts: int, part: int, where: str, dim: int = -1
) -> Split | None:
    placement = layouts[0]
    if isinstance(placement, Replicate):
        return None
    if isinstance(placement, Shard) and placement.dim == -1:
        what = "heads" if dim == -2 else "features"
        if size % parts:
            raise TensorParallelError(
                f"{where}: {size} {what} do not split evenly over {parts} ranks; torch's "
                "tensor-parallel styles need equal shards (DTensor.from_local assumes them). "
                f"Use a world size that divides {size}."
            )
        return Split(dim, size, parts, part)
    raise TensorParallelError(
        f"{where}: layout {placement} is not supported; use Replicate() or Shard(-1) (the "
        "defaults of ColwiseParallel / RowwiseParallel)"
    )


def _layout(
    path: str, module: nn.Module, style: ParallelStyle, parts: int, part: int
) -> SiteLayout:
    where = f"{type(style).__name__} at {describe(path)}"
    if type(style) not in (ColwiseParallel, RowwiseParallel):
        raise TensorParallelError(
            f"{where}: ts.distributed.parallelize supports ColwiseParallel and RowwiseParallel "
            "(the Megatron MLP/attention split); SequenceParallel, PrepareModuleInput/Output "
            "and custom styles are not supported yet"
        )
    if not isinstance(module, (nn.Linear, nn.Embedding)) and _weight_splits(module) is None:
        raise TensorParallelError(
            f"{where}: the module is a {type(module).__name__}; the styles shard nn.Linear, "
            "nn.Embedding, transformers' Conv1D and a converted model's Projection / "
            "HeadProjection"
        )
    heads = isinstance(module, HeadProjection)
    if heads and not isinstance(style, ColwiseParallel):
        raise TensorParallelError(
            f"{where}: a HeadProjection ([batch, pos, d_model] to [batch, pos, head, d_head]) "
            "is split by heads, column-wise; use ColwiseParallel / 'colwise'"
        )
    if not style.use_local_output:
        raise TensorParallelError(
            f"{where}: use_local_output=False is not supported (sites after the module would "
            "see DTensors and the code between the projections would run on DTensors); use the "
            "default, use_local_output=True"
        )
    features_in, features_out = _features(module)
    dim = -2 if heads else -1  # a HeadProjection's output is [batch, pos, head, d_head]
    output = _split_of(style.output_layouts, features_out, parts, part, where + " output", dim)
    if isinstance(style, ColwiseParallel):
        return SiteLayout(path, "colwise", None, output)
    embedding = isinstance(module, nn.Embedding)
    if embedding:
        split_in = None
    else:
        split_in = _split_of((Shard(-1),), features_in, parts, part, where + " input")
    return SiteLayout(path, "rowwise", split_in, output)


def _resolve(model: nn.Module, key: str) -> list[str]:
    """The exact paths ``parallelize_module`` applies a plan key to (fnmatch per segment)."""
    found = [("", model)]
    for token in key.split("."):
        found = [
            (child_path(path, name), child)
            for path, node in found
            for name, child in node.named_children()
            if fnmatch.fnmatch(name, token)
        ]
    return [path for path, _ in found]


def _styles(model: nn.Module, plan: Mapping[str, Any] | str) -> dict[str, ParallelStyle]:
    if plan == "auto":
        plan = _auto_plan(model)
    if not isinstance(plan, Mapping) or not plan:
        raise TensorParallelError(
            "the tensor-parallel plan must be a non-empty dict {module path (fnmatch "
            "patterns per segment, as parallelize_module takes): ColwiseParallel() / "
            "RowwiseParallel() / 'colwise' / 'rowwise'}, or 'auto'"
        )
    styles: dict[str, ParallelStyle] = {}
    for key, style in plan.items():
        if isinstance(style, str):
            if style not in STYLE_NAMES:
                raise TensorParallelError(
                    f"tensor-parallel plan entry {key!r}: style {style!r} is not supported; use "
                    f"one of {sorted(STYLE_NAMES)} (or ColwiseParallel() / RowwiseParallel())"
                )
            style = STYLE_NAMES[style]()
        paths = _resolve(model, key)
        if not paths:
            paths_known = (p for p, _ in model.named_modules() if p)
            guesses = ", ".join(repr(g) for g in closest(key, paths_known))
            raise TensorParallelError(
                f"tensor-parallel plan entry {key!r} matches no module (nearest: {guesses}); "
                "parallelize_module would skip it with a warning"
            )
        for path in paths:
            if path in styles:
                raise TensorParallelError(f"two tensor-parallel plan entries match {path!r}")
            styles[path] = style
    return styles


def _auto_plan(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise TensorParallelError(
            f"tp_plan='auto': {type(model).__name__} has no config.base_model_tp_plan; pass a "
            "plan, e.g. {'transformer.h.*.mlp.c_fc': 'colwise', 'transformer.h.*.mlp.c_proj': "
            "'rowwise'}"
        )
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not hasattr(model, prefix):
        prefix = ""
    return {
        child_path(prefix, key): value
        for key, value in plan.items()
        if value not in UNSHARDED_STYLES  # its weights stay whole: a module inside a region
    }


def _regions(model: nn.Module, layouts: dict[str, SiteLayout]) -> dict[str, SiteLayout]:
    """Add the regions (parents of sharded modules) and everything inside them."""
    by_parent: dict[str, list[SiteLayout]] = {}
    for layout in layouts.values():
        by_parent.setdefault(layout.path.rpartition(".")[0], []).append(layout)
    out = dict(layouts)
    modules = dict(iter_nodes(model))
    for parent, children in by_parent.items():
        makes = [c.path for c in children if c.role == "colwise" and c.output is not None]
        takes = [c.path for c in children if c.role == "rowwise" and c.input is not None]
        if bool(makes) != bool(takes):
            lonely = makes or takes
            raise TensorParallelError(
                f"the tensor-parallel plan shards {lonely[0]!r} but no "
                f"{'RowwiseParallel' if makes else 'ColwiseParallel'} module under "
                f"{describe(parent)} {'takes' if makes else 'makes'} the sharded activation, "
                "so a shard would leave the block as if it were the whole tensor. Pair every "
                "sharded ColwiseParallel output with a RowwiseParallel input under the same "
                "parent (or gather it: ColwiseParallel(output_layouts=Replicate()))"
            )
        if not makes:
            continue
        for path, _ in iter_nodes(modules[parent], parent):
            if path == parent or path in layouts:
                continue
            out[path] = SiteLayout(path, "inside", region=parent)
        if parent in out:
            raise TensorParallelError(f"{parent!r} is both a sharded region and inside one")
        out[parent] = SiteLayout(parent, "region")
    for path in layouts:
        parent = out.get(path.rpartition(".")[0])
        if parent is not None and parent.role == "inside":
            raise TensorParallelError(
                f"{path!r} sits inside the sharded region {parent.region!r}; nested "
                "tensor-parallel regions are not supported"
            )
    with_children = {}
    for path, layout in out.items():
        names = tuple(
            name
            for name, child in modules[path]._modules.items()
            if child is not None and child_path(path, name) in out
        )
        with_children[path] = replace(layout, children=names)
    return with_children


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
    styles = _styles(model, plan)
    parts, part = mesh.size(), mesh.get_local_rank()
    modules = dict(model.named_modules())
    layouts = {
        path: _layout(path, modules[path], style, parts, part) for path, style in styles.items()
    }
    layouts = _regions(model, layouts)
    identity = identity_of(model)
    _same_model_everywhere(identity, mesh)
    torch_plan = {path: _own_style(style, modules[path]) for path, style in styles.items()}
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
