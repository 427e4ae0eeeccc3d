"""``Sharded``: an intervention layer placed at a tensor-parallel site.

Each rank runs the same model on its own shard of the sharded activations, so a layer at a
sharded site sees part of the tensor the unsharded model's layer would see. ``Sharded``
holds the layer (as its child ``layer``, where selectors and ``ts.run`` find it) and the
:class:`~torchsurgeon.distributed.split.Split` of its site, and makes the layer act on the
full tensor's elements:

- **Recording** (``Save``, ``SaveGrad``): the shards are gathered once, into the full tensor,
  which is recorded on every rank (or on rank 0 only, ``record_on="rank0"``); the shard
  itself passes on unchanged. Nothing is gathered outside ``ts.run``.
- **Editing where the edit is local to each shard** (``SetValues``, ``Add``, ``Scale``,
  ``Zero``, ``MeanAblate``, ``Noise``, ``Patch``, ``StopGradient``): each rank runs a copy of
  the layer cut to its shard — the index translated, the value cut the same way
  (:mod:`~torchsurgeon.distributed.split`) — or nothing, if it holds no element the index
  names. No communication. ``Noise`` draws the full tensor's noise (the same seed on every
  rank) and keeps its part. Each class says how it is cut, in its
  :meth:`~torchsurgeon.layers.base.InterventionLayer.on_shard`.
- **LowRankAdapter** after a column-wise projection adds ``B``'s local rows' share; after a
  row-wise one it sums the low-rank products of the input shards over the ranks (a tensor
  of ``batch x pos x rank`` elements).
- **ComputeGrad** passes the shard on; in the backward pass it gathers the gradient, edits
  the full gradient and keeps this rank's part.
- **Anything else** (a layer whose class keeps the default ``on_shard``, your own included):
  gather, run the layer on the full tensor, keep this rank's part (gather-edit-scatter).
  Correct for any layer that keeps the tensor's shape; it costs one all-gather per call.

Inside a region (between its projections) the split is the one the region's ``DTensor``
twin found for this call (:mod:`~torchsurgeon.distributed.inside`), and the local tensor is
checked against it first: its shape, and at a replicated site its values on every rank.

At a site whose tensor is replicated (the input of a column-wise projection, the output of
a row-wise one) the layer runs as it is, on the local copy of the full tensor. Layers before
a projection run ahead of its ``parallelize_module`` input hook (see ``localize``), on the
tensor the module was called with; a DTensor a layer does receive is taken apart and put
back together around the layer, with its placement, global shape and stride unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from torchsurgeon.distributed.collectives import (
    gather,
    gather_to_first,
    gather_whole,
    same_on_every_rank,
    settled,
    shared_input,
    sum_over_ranks,
)
from torchsurgeon.distributed.inside import InsideError, RegionProbe
from torchsurgeon.distributed.parallelize import SiteLayout, TensorParallelError
from torchsurgeon.distributed.split import Split
from torchsurgeon.layers.base import GATHER, InterventionLayer, Recorder
from torchsurgeon.layers.compute import ComputeGrad, Stop
from torchsurgeon.layers.index import remember
from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.layers.record import SaveGrad
from torchsurgeon.layers.run_state import run_state
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import SITE_LISTS, describe

__all__ = ["RECORD_ON", "Sharded"]

RECORD_ON = ("all", "rank0")
Sides = tuple[Split | None, Split | None]
"""The split of a layer's tensor and of its module's input (``None``: replicated)."""


class Sharded(nn.Module):
    """``layer`` at the ``which`` side (``ts_before``/``ts_after``) of the site ``layout``."""

    ts_sharded = True
    """Marks placed layers for the sites' guards (see ``parallelize.SiteGuard``)."""

    def __init__(
        self,
        layer: nn.Module,
        layout: SiteLayout,
        which: str,
        mesh: DeviceMesh,
        record_on: str = "all",
        probe: RegionProbe | None = None,
    ) -> None:
        super().__init__()
        if record_on not in RECORD_ON:
            raise ValueError(f"record_on must be one of {RECORD_ON}, got {record_on!r}")
        on = getattr(layer, "on", None)
        if on not in (None, 0):
            raise TensorParallelError(
                f"{type(layer).__name__} at {describe(layout.path)} has on={on!r}; at a "
                "tensor-parallel projection only the primary tensor (on=None) is supported"
            )
        self.layer = layer
        self.on = on
        self.reads_input = bool(getattr(layer, "reads_input", False))
        self.split = layout.side(which)
        self.input_split = layout.input if which == SITE_LISTS[1] else None
        self.probe = probe
        """For a site inside a region: what finds its layout when the region is called."""
        self.inside = layout.path[len(layout.region) + 1 :] if probe is not None else ""
        self.site = layout.path
        self.which = which
        self.mesh = mesh
        self.record_on = record_on
        self._ts_local: dict[Any, Any] = {}

    def partial_fields(self) -> frozenset[str]:
        """The layer's tensor fields whose gradient on this rank is only this rank's share,
        to be summed over the ranks when the layer is trained: every tensor of a layer at a
        sharded site (each rank's copy touches its own elements only), and after a row-wise
        projection an adapter's ``a`` (each rank multiplies its own input columns). The
        others are used alike on every rank, which then holds their whole gradient."""
        layer = self.layer
        fields = layer.tensors() if isinstance(layer, InterventionLayer) else {}
        split, split_in = self.split, self.input_split
        if self.probe is not None:  # as in the latest call (not run yet: no gradient at all)
            sides = self.probe.last.get(self.inside)
            if sides is None or sides.refused:
                return frozenset(fields)
            before = self.which == SITE_LISTS[0]
            split, split_in = (sides.input, None) if before else (sides.output, sides.input)
        if split is not None:
            return frozenset(fields)
        lora = original_class(layer) is LowRankAdapter
        return frozenset({"a"}) if lora and split_in is not None else frozenset()

    def extra_repr(self) -> str:
        side = "input" if self.which == SITE_LISTS[0] else "output"
        if self.probe is not None:
            shape = "inside the region, laid out as its DTensor twin finds per call"
        else:
            shape = self.split.describe() if self.split is not None else "replicated"
        return f"{side} of {describe(self.site)}: {shape}, record_on={self.record_on!r}"

    # -- the call ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, input: torch.Tensor | None = None) -> torch.Tensor:
        split, split_in = self._sides(x, input)
        local_in = self._local_input(input, split, split_in)
        if isinstance(x, DTensor):
            self._check_placement(x, split, "tensor")
            out = self._run(x.to_local(), local_in, (split, split_in))
            return DTensor.from_local(
                out, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
            )
        return self._run(settled(x), local_in, (split, split_in))

    def _sides(self, x: torch.Tensor, input: torch.Tensor | None) -> Sides:
        """The splits of the tensor and of the module's input, for this call."""
        if self.probe is None:
            return self.split, self.input_split
        before = self.which == SITE_LISTS[0]
        try:
            sides = self.probe.sides(self.inside)
            split, shape = sides.side(before)
            reads = not before and input is not None
            split_in, shape_in = sides.side(True) if reads else (None, None)
        except InsideError as error:
            raise TensorParallelError(f"{self._where()}{error}") from None
        self._check_shape(x, split, shape, "tensor")
        if reads:
            self._check_shape(input, split_in, shape_in, "input")
        return split, split_in

    def _check_shape(
        self, x: torch.Tensor, split: Split | None, full: tuple[int, ...] | None, what: str
    ) -> None:
        """Refuse a local tensor whose shape is not what its DTensor twin's placement implies."""
        local = list(full or ())
        if split is not None:
            local[split.dim] = split.width
        twin = (
            f"run on DTensors the region's code gives a tensor of full shape {full}, "
            f"{split.describe() if split is not None else 'replicated'}"
        )
        if full is None or tuple(x.shape) != tuple(local):
            raise TensorParallelError(
                f"{self._where()}this rank's {what} has shape {tuple(x.shape)}, but {twin}, "
                f"i.e. {tuple(local)} here: the local code does not compute the shard its "
                "DTensor twin does, so the layer cannot know which elements it sees"
            )
        if split is None and not same_on_every_rank([x], self.mesh)[0]:
            raise TensorParallelError(
                f"{self._where()}{twin}, but this rank's {what} differs from another rank's: "
                "the local code does not compute what its DTensor twin does (e.g. it slices "
                "the sharded features by position), so the layer cannot know what it sees"
            )

    def _local_input(
        self, input: torch.Tensor | None, split: Split | None, split_in: Split | None
    ) -> torch.Tensor | None:
        if input is None:
            return None
        if isinstance(input, DTensor):
            self._check_placement(input, split_in, "input")
            local = input.to_local()
        else:
            local = settled(input)
        if split is not None and split_in is None:
            # the whole input, used for this rank's output shard only: its gradient is a share
            return shared_input(local, self.mesh)
        return local

    def _check_placement(self, x: DTensor, split: Split | None, what: str) -> None:
        placement = x.placements[0]
        fits = (
            split is None
            if isinstance(placement, Replicate)
            else isinstance(placement, Shard)
            and split is not None
            and placement.dim % x.dim() == split.dim % x.dim()
        )
        if not fits:
            expected = split.describe() if split is not None else "replicated"
            raise TensorParallelError(
                f"{self._where()}the {what} is a DTensor placed {placement}, but the plan says "
                f"it is {expected}"
            )

    def _where(self) -> str:
        side = "before" if self.which == SITE_LISTS[0] else "after"
        return f"{type(self.layer).__name__} {side} {describe(self.site)} (tensor parallel): "

    def _run(self, x: torch.Tensor, input: torch.Tensor | None, sides: Sides) -> torch.Tensor:
        layer, split = self.layer, sides[0]
        if split is not None and (x.dim() < -split.dim or x.shape[split.dim] != split.width):
            raise TensorParallelError(
                f"{self._where()}this rank's tensor has shape {tuple(x.shape)}, but the site "
                f"is {split.describe()}"
            )
        if self.reads_input:
            return self._with_input(x, input, sides)
        if split is None:
            return layer(x)
        if original_class(layer) is Stop:
            return layer(x)  # ends the run: nothing to gather
        if original_class(layer) is SaveGrad:
            return self._record_grad(x, split)
        if original_class(layer) is ComputeGrad and x.requires_grad and torch.is_grad_enabled():
            return self._edit_grad(x, split)
        if isinstance(layer, Recorder):
            return self._record(x, split)
        local = self._local_layer(x, split)
        if local is None:
            return x
        if local is GATHER:
            return self._gathered(x, split, lambda full: layer(full))
        return local(x)

    # -- recording -----------------------------------------------------------------------

    def _record(self, x: torch.Tensor, split: Split) -> torch.Tensor:
        if run_state(self.layer) is None:  # not inside ts.run: nothing to gather
            return x
        full = self._full(x, split)
        if full is not None:
            self.layer(full)
        return x

    def _record_grad(self, x: torch.Tensor, split: Split) -> torch.Tensor:
        state = run_state(self.layer)
        if state is None:
            return x
        if not x.requires_grad:
            return self.layer(x)  # raises SaveGrad's own error

        def keep(grad: torch.Tensor) -> None:
            full = self._full(grad, split)
            if full is not None:
                state.store.append(full)

        x.register_hook(keep)
        # a backward= run asks autograd for these tensors' gradients (else it stops at the
        # nearest replicated site and skips this one)
        state.sites.append(x)
        return x

    def _edit_grad(self, x: torch.Tensor, split: Split) -> torch.Tensor:
        """``ComputeGrad`` at a sharded site: in the backward pass the shards' gradients are
        gathered, the expression edits the full gradient, and each rank keeps its part.
        (Editing a zero-padded gradient per rank and summing, as gather-edit-scatter would,
        is right only for an edit that maps zero to zero, element by element.)"""
        layer = self.layer
        edit = layer.gradient_edit()

        def edited(grad: torch.Tensor) -> torch.Tensor:
            full = gather_whole(grad, split, self.mesh)
            return self._own_part(edit(full), full, split, "the expression, given the gradient")

        return layer.through(x, edited)

    def _full(self, x: torch.Tensor, split: Split) -> torch.Tensor | None:
        if self.record_on == "all":  # recorded alike on every rank (a loss may read it)
            return gather_whole(x, split, self.mesh)
        return gather_to_first(x, split, self.mesh)

    # -- editing -------------------------------------------------------------------------

    @torch.compiler.disable  # index arithmetic on meta tensors: run eagerly, never traced
    def _local_layer(self, x: torch.Tensor, split: Split) -> Any:
        """The layer cut to this shard, ``None`` (nothing here) or ``GATHER``; kept per shape."""
        layer = self.layer
        tensors = layer.tensors() if isinstance(layer, InterventionLayer) else {}
        keep = not any(t.requires_grad for t in tensors.values())
        key = (tuple(x.shape), x.dtype, x.device, split)
        if keep and key in self._ts_local:
            return self._ts_local[key]
        shape = split.full_shape(tuple(x.shape))
        if not keep:  # the layer's tensors carry gradients: cut them afresh, in the graph
            return _local_copy(layer, shape, split, x.dtype, x.device)
        # Kept across calls, so made as plain tensors even inside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            local = _local_copy(layer, shape, split, x.dtype, x.device)
        remember(self._ts_local, key, local)
        return local

    def _gathered(self, x: torch.Tensor, split: Split, run: Any) -> torch.Tensor:
        full = gather(x, split, self.mesh)
        return self._own_part(run(full), full, split, "the layer")

    def _own_part(self, out: Any, full: torch.Tensor, split: Split, who: str) -> torch.Tensor:
        """This rank's part of ``out``, what ``who`` made of the full tensor ``full``."""
        if not isinstance(out, torch.Tensor) or out.shape != full.shape:
            shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TensorParallelError(
                f"{self._where()}{who} turned the full tensor {tuple(full.shape)} into "
                f"{shown}; at a sharded site it must keep the tensor's shape"
            )
        return out.narrow(split.dim % out.dim(), split.offset, split.width).contiguous()

    def _with_input(
        self, x: torch.Tensor, input: torch.Tensor | None, sides: Sides
    ) -> torch.Tensor:
        """A layer that reads the module's input too (LoRA), after the module."""
        layer, (split, split_in) = self.layer, sides
        if input is None:
            return layer(x)  # the layer says what it needs
        if original_class(layer) is not LowRankAdapter or (
            split is not None and split_in is not None
        ):
            if split is None:  # a replicated output: every rank uses the whole input alike
                full_in = gather_whole(input, split_in, self.mesh) if split_in else input
                return layer(x, input=full_in)
            full_in = gather(input, split_in, self.mesh) if split_in is not None else input
            return self._gathered(x, split, lambda full: layer(full, input=full_in))
        a, b = layer.a, layer.b
        if split is None and split_in is None:
            return layer(x, input=input)
        full_in = split_in.size if split_in is not None else input.shape[-1]
        full_out = split.size if split is not None else x.shape[-1]
        if a.shape[1] != full_in or b.shape[0] != full_out:
            raise ValueError(
                f"{self._where()}the adapter maps {a.shape[1]} -> {b.shape[0]} features, but "
                f"the module maps {full_in} -> {full_out}"
            )
        if split is not None:  # column-wise: this rank's output features are B's local rows
            return self._local_layer(x, split)(x, input=input)
        assert split_in is not None  # row-wise: sum the input shards' low-rank products
        a_local = a.narrow(1, split_in.offset, split_in.width)
        low = sum_over_ranks(input.to(a.dtype) @ a_local.T, self.mesh)
        return x + (low @ b.T * layer.scale).to(x.dtype)


def _local_copy(
    layer: nn.Module,
    shape: tuple[int, ...],
    split: Split,
    dtype: torch.dtype,
    device: torch.device,
) -> Any:
    """``layer`` cut to this rank's shard of a full tensor of ``shape``: a new layer, ``None``
    (this rank holds nothing the layer touches) or ``GATHER`` (it needs the full tensor) — as
    the layer's class says (:meth:`~torchsurgeon.layers.base.InterventionLayer.on_shard`)."""
    on_shard = getattr(layer, "on_shard", None)
    return GATHER if on_shard is None else on_shard(shape, split, dtype, device)
