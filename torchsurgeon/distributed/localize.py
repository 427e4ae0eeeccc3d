"""``localize``: place a sharded model's intervention layers for their sites; ``apply`` a plan.

A rewrite of a sharded model is made exactly as on the unsharded one — the same selectors,
the same layers, the same plan — and then, once, :func:`localize` wraps every layer that sits
before or after a tensor-parallel projection in a
:class:`~torchsurgeon.distributed.sharded.Sharded` that knows the projection's layout
(one more copy-on-write rewrite: the projections' private copies get new site lists; no
tensor is copied). A layer inside a sharded region is placed too, with the region's
:class:`~torchsurgeon.distributed.inside.RegionProbe` (hooked on the region) that finds its
layout each call; a layer inserted after ``localize`` is refused by the site's guard when
the model runs. Layers at replicated sites (the residual stream, a whole
MLP or attention block) are left as they are: every rank holds the full tensor there and
runs them as the unsharded model would.

The lineage (the steps that made the model) is kept, so :func:`plan` of a localized model is
the plan of the unsharded rewrite (``ts.plan`` with the identity the unsharded model had:
the weight fingerprint cannot be read from ``DTensor`` shards).

:func:`apply` is ``ts.apply`` for a sharded base followed by :func:`localize`: a plan made
against the unsharded model (or a structure-only copy of it) replays on every rank, checked
against the identity the unsharded model had before it was sharded.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from torchsurgeon.distributed.inside import RegionProbe
from torchsurgeon.distributed.parallelize import (
    SiteGuard,
    SiteLayout,
    TensorParallelError,
    guard_of,
    tensor_parallel_of,
)
from torchsurgeon.distributed.sharded import RECORD_ON, Sharded
from torchsurgeon.plans.identity import Match
from torchsurgeon.plans.plan import Plan
from torchsurgeon.plans.record import plan as plan_of
from torchsurgeon.plans.replay import apply as apply_plan
from torchsurgeon.surgery.frozen import freeze_tree
from torchsurgeon.surgery.paths import SITE_LISTS, child_path, iter_nodes
from torchsurgeon.surgery.rewrite import Edit, rewrite
from torchsurgeon.surgery.sites import _run_before

__all__ = ["apply", "localize", "plan"]


def localize(model: nn.Module, *, record_on: str = "all") -> nn.Module:
    """``model`` with every layer at a tensor-parallel projection placed for its site.

    ``record_on="all"`` records the full tensor of a sharded site on every rank;
    ``"rank0"`` only on rank 0 (a gather instead of an all-gather; the recorded tensor is
    detached). Layers already placed are left alone, so calling it again after more
    rewrites places only the new ones.
    """
    if record_on not in RECORD_ON:
        raise ValueError(f"record_on must be one of {RECORD_ON}, got {record_on!r}")
    info = tensor_parallel_of(model)
    if info is None:
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise TensorParallelError(
                "this model has DTensor parameters but was not sharded by "
                "ts.distributed.parallelize, so the layout of its sites is unknown; shard the "
                "plain model with ts.distributed.parallelize(model, mesh, plan) instead of "
                "parallelize_module"
            )
        raise TensorParallelError(
            "localize expects a model made by ts.distributed.parallelize (or rewritten from one)"
        )
    edits: dict[str, Edit] = {}
    regions = dict(iter_nodes(model))
    for path, node in regions.items():
        guard = guard_of(node)
        if guard is None:
            continue
        guard.check_children(node)  # a replaced child of a region is refused here already
        layout = guard.layout
        if layout.role == "region":
            continue
        probe = info.probes[layout.region] if layout.role == "inside" else None
        for which in SITE_LISTS:
            layers = list(node._modules.get(which) or ())
            if any(not isinstance(layer, Sharded) for layer in layers):
                edits[path] = _placing(guard.layout, info.mesh, record_on, probe)
            if probe is not None and layers and not _announces(regions[layout.region], probe):
                edits[layout.region] = _announcing(probe)
    return rewrite(model, edits)


def _announces(region: nn.Module, probe: RegionProbe) -> bool:
    return any(hook is probe for hook in region._forward_pre_hooks.values())


def _announcing(probe: RegionProbe) -> Edit:
    """Give the region (its copy) the probe's hooks: the inside layouts of each call."""

    def edit(node: nn.Module, path: str) -> nn.Module:
        if not _announces(node, probe):
            node.register_forward_pre_hook(probe, with_kwargs=True)
            node.register_forward_hook(probe.done, always_call=True)
        return node

    return edit


def _placing(
    layout: SiteLayout, mesh: DeviceMesh, record_on: str, probe: RegionProbe | None
) -> Edit:
    def edit(node: nn.Module, path: str) -> nn.Module:
        for which in SITE_LISTS:
            layers = node._modules.get(which)
            if not layers:
                continue
            placed = [
                layer
                if isinstance(layer, Sharded)
                else Sharded(layer, layout, which, mesh, record_on, probe)
                for layer in layers
            ]
            node._modules[which] = freeze_tree(nn.ModuleList(placed), child_path(path, which))
        if node._modules.get(SITE_LISTS[0]):
            _before_torch_input_hook(node)
        return node

    return edit


def _before_torch_input_hook(node: nn.Module) -> None:
    """Run the site's ``insert_before`` layers ahead of the projection's own input hook.

    ``parallelize_module`` gives each projection a pre-hook that wraps its input in a new
    ``DTensor``; layers run after it would see a tensor private to this projection. Run
    before it, they see the very tensor the module was called with, as on the unsharded
    model — which matters where one tensor feeds two projections (an MLP's gate and up):
    a ``SaveGrad`` there records the gradient from both, not from one. The guard stays
    first. The copy gets its own hook table (the original's is shared with other trees).
    """
    hooks = node._forward_pre_hooks
    guard = [k for k, h in hooks.items() if isinstance(h, SiteGuard)]
    ours = [k for k, h in hooks.items() if h is _run_before]
    rest = [k for k in hooks if k not in guard and k not in ours]
    node.__dict__["_forward_pre_hooks"] = OrderedDict((k, hooks[k]) for k in guard + ours + rest)


def plan(model: nn.Module) -> Plan:
    """``ts.plan`` of a rewrite of a sharded model: the plan of the same unsharded rewrite.

    Its base identity is the unsharded model's (recorded by ``parallelize``), so the plan
    applies to the unsharded model, to a structure-only copy of it, or to another sharding.
    """
    info = tensor_parallel_of(model)
    if info is None:
        raise TensorParallelError(
            "ts.distributed.plan expects a model made by ts.distributed.parallelize; for an "
            "unsharded model use ts.plan"
        )
    return plan_of(model, base_identity=info.identity)


def apply(
    plan: Plan,
    model: nn.Module,
    *,
    match: Match = "exact",
    record_on: str = "all",
) -> nn.Module:
    """``plan`` replayed on the sharded ``model`` and localized (see :func:`localize`).

    The plan's base identity is checked against the unsharded model's, which
    :func:`~torchsurgeon.distributed.parallelize.parallelize` recorded before sharding.
    """
    info = tensor_parallel_of(model)
    if info is None:
        raise TensorParallelError(
            "ts.distributed.apply expects a model made by ts.distributed.parallelize; for an "
            "unsharded model use ts.apply"
        )
    replayed = apply_plan(plan, model, match=match, base_identity=info.identity)
    return localize(replayed, record_on=record_on)
