"""Where each module of a tensor-parallel model stands: the layout of the tensors at its
two sides (:class:`SiteLayout`), found from the plan's styles and the model's weights before
it is sharded; :mod:`torchsurgeon.distributed.parallelize` applies them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement
from transformers.pytorch_utils import Conv1D

from torchsurgeon.distributed.split import Split
from torchsurgeon.layers.transformer.projection import HeadProjection, Projection
from torchsurgeon.surgery.errors import SurgeryError, closest
from torchsurgeon.surgery.paths import SITE_LISTS, child_path, describe, iter_nodes

__all__ = [
    "STYLE_NAMES",
    "UNSHARDED_STYLES",
    "Role",
    "SiteLayout",
    "TensorParallelError",
    "auto_plan",
    "layout_of",
    "own_style",
    "styles_of",
    "with_regions",
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


def own_style(style: ParallelStyle, module: nn.Module) -> ParallelStyle:
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


def layout_of(
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


def styles_of(model: nn.Module, plan: Mapping[str, Any] | str) -> dict[str, ParallelStyle]:
    if plan == "auto":
        plan = auto_plan(model)
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


def auto_plan(model: nn.Module) -> dict[str, str]:
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


def with_regions(model: nn.Module, layouts: dict[str, SiteLayout]) -> dict[str, SiteLayout]:
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
