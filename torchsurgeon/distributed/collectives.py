"""The collectives a sharded site needs: gather a shard (two ways), gather it to rank 0, sum.

- :func:`gather` builds the full tensor on every rank from the shards (an all-gather along
  the split dimension). It is differentiable: the gradient of the full tensor, which each
  rank may compute differently, is summed over the ranks and cut back to each shard (a
  reduce-scatter) — what a gather-edit-scatter needs for ``backward`` to be right, since
  each rank keeps only its own part of the edited tensor.
- :func:`gather_whole` builds the same full tensor for a use every rank makes alike (a
  recording read by the loss, a replicated output): each shard's gradient is its own part
  of the full tensor's gradient, which every rank already has whole.
- :func:`shared_input` passes a replicated tensor to a per-shard use (an adapter after a
  column-wise projection reads the whole input): its backward sums the ranks' shares.
- :func:`gather_to_first` builds it on rank 0 only (a gather: rank 0 receives ``N - 1``
  shards and nobody else receives anything). The result is detached.
- :func:`same_on_every_rank` checks that tensors said to be replicated are (checksums).
- :func:`sum_over_ranks` adds a small tensor over the ranks (a LoRA adapter's low-rank
  partial products at a row-wise projection), in rank order so every rank gets the same
  bits; its gradient passes back unchanged (every rank uses the whole sum).

They run on torch's functional collectives (``torch.distributed._functional_collectives``),
over the process group of the model's device mesh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from torchsurgeon.distributed.split import Split

__all__ = [
    "gather",
    "gather_to_first",
    "gather_whole",
    "same_on_every_rank",
    "settled",
    "shared_input",
    "sum_over_ranks",
]


def settled(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain tensor: an asynchronous collective's result waited for.

    A row-wise projection's output is an ``AsyncCollectiveTensor`` (its all-reduce still in
    flight) until something reads it; waiting keeps the autograd graph.
    """
    if isinstance(x, funcol.AsyncCollectiveTensor):
        return funcol.wait_tensor(x)
    return x


def _all_gather_first_dim(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return settled(funcol.all_gather_single_autograd(x.contiguous(), 0, mesh.get_group()))


def gather(local: torch.Tensor, split: Split, mesh: DeviceMesh) -> torch.Tensor:
    """The full tensor, on every rank, from each rank's ``local`` shard."""
    if split.parts == 1:
        return local
    dim = split.dim % local.dim()
    full = _all_gather_first_dim(local.movedim(dim, 0), mesh)
    return full.movedim(0, dim)


def gather_whole(local: torch.Tensor, split: Split, mesh: DeviceMesh) -> torch.Tensor:
    """The full tensor on every rank, for a use every rank makes alike (a recording the same
    loss reads on every rank, a layer whose output is replicated): the gradient of the full
    tensor is then the same on every rank, and each shard's gradient is its own part of it,
    with no collective in the backward. (:func:`gather` would sum that replicated gradient
    over the ranks and give ``N`` times the true one.)"""
    if split.parts == 1:
        return local
    return _GatherWhole.apply(local, split, mesh.get_group())


class _GatherWhole(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, local: torch.Tensor, split: Split, group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.split = split
        dim = split.dim % local.dim()
        moved = local.movedim(dim, 0).contiguous()
        return settled(funcol.all_gather_single(moved, 0, group)).movedim(0, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        split = ctx.split
        return grad.narrow(split.dim % grad.dim(), split.offset, split.width), None, None


def shared_input(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` (the same on every rank) for a use each rank makes for its own shard only (an
    adapter after a column-wise projection reads the whole input for this rank's output
    columns): the identity forward; backward, each rank's gradient is its share, so the
    shares are summed over the ranks (in rank order: the same bits everywhere)."""
    if mesh.size() == 1:
        return x
    return _SharedInput.apply(x, mesh.get_group())


class _SharedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        stacked = funcol.all_gather_single(grad.unsqueeze(0).contiguous(), 0, ctx.group)
        return settled(stacked).sum(0), None


def gather_to_first(local: torch.Tensor, split: Split, mesh: DeviceMesh) -> torch.Tensor | None:
    """The full tensor on rank 0 (detached), ``None`` on the other ranks."""
    if split.parts == 1:
        return local.detach()
    group = mesh.get_group()
    shard = local.detach().contiguous()
    pieces = [torch.empty_like(shard) for _ in range(split.parts)] if split.part == 0 else None
    dist.gather(shard, pieces, group_dst=0, group=group)
    if pieces is None:
        return None
    return torch.cat(pieces, dim=split.dim % local.dim())


def same_on_every_rank(tensors: list[torch.Tensor], mesh: DeviceMesh) -> list[bool]:
    """For each tensor, whether it holds the same values on every rank: two checksums each
    (the sum and a position-weighted sum, in float64; equal tensors give equal bits), all
    of them in one all-gather."""
    if mesh.size() == 1 or not tensors:
        return [True] * len(tensors)
    sums = []
    for x in tensors:
        flat = x.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        sums += [flat.sum(), (flat * weights.reciprocal_()).sum()]
    mine = torch.stack(sums).unsqueeze(0).contiguous()
    seen = settled(funcol.all_gather_single(mine, 0, mesh.get_group()))
    agree = (seen == seen[0]).all(0).view(len(tensors), 2).all(1)
    return agree.tolist()


def sum_over_ranks(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` summed over the ranks of ``mesh`` (the same on every rank; differentiable).

    The sum is used whole on every rank (each computes the same loss from it), so the
    gradient of each rank's own ``x`` is the sum's gradient as it is: the backward is the
    identity, with no collective. (A differentiable all-gather would sum that replicated
    gradient over the ranks in its backward and give ``N`` times the true one.)
    """
    if mesh.size() == 1:
        return x
    return _SumOverRanks.apply(x, mesh.get_group())


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-gather and add in rank order (the same bits everywhere); backward: the
    identity (see :func:`sum_over_ranks`)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        stacked = funcol.all_gather_single(x.unsqueeze(0).contiguous(), 0, group)
        return settled(stacked).sum(0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None
