"""Training the layers of a sharded model: each rank's gradients made whole.

``ts.train`` on a rewrite of a model sharded by :func:`~torchsurgeon.distributed.parallelize`
(localized, as ``tsd.apply`` returns it) runs on every rank with the same batches, loss and
optimizer. Each rank's backward gives, for every trained tensor, either its whole gradient
or only this rank's share of it, depending on where the layer sits
(:meth:`~torchsurgeon.distributed.sharded.Sharded.partial_fields`): a layer at a sharded site
touches only this rank's elements, so its gradient is summed over the ranks; a layer at a
replicated site computes the same thing everywhere and already has all of it. The shares are
summed in rank order (an all-gather, so every rank gets the same bits) and the whole
gradients are taken from rank 0, so every rank's optimizer takes the very same step and the
trained tensors stay identical on all of them — equal to training the unsharded model.

A trained tensor is named by its place in the plan (``"<layer path>.<field>"``, the
unsharded model's path); on the sharded tree that path holds the layer's
:class:`~torchsurgeon.distributed.sharded.Sharded` wrapper, with the layer inside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from torchsurgeon.distributed.collectives import sum_over_ranks
from torchsurgeon.distributed.parallelize import tensor_parallel_of
from torchsurgeon.distributed.sharded import Sharded
from torchsurgeon.surgery.paths import get_at

__all__ = ["grad_reduction"]

Grads = Sequence[torch.Tensor | None]


def grad_reduction(
    model: nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor]
) -> Callable[[Grads], list[torch.Tensor | None]] | None:
    """For a sharded ``model``: what makes each rank's gradients of ``names`` whole (and the
    same on every rank); None for a model that is not sharded."""
    info = tensor_parallel_of(model)
    if info is None:
        return None
    places = []
    for name in names:
        layer_path, _, field = name.rpartition(".")
        places.append((get_at(model, layer_path), field))
    mesh, group = info.mesh, info.mesh.get_group()

    def reduce(grads: Grads) -> list[torch.Tensor | None]:
        # asked after each backward: a site inside a region is laid out as its last call was
        partial = [isinstance(w, Sharded) and f in w.partial_fields() for w, f in places]
        whole: list[torch.Tensor | None] = []
        for grad, shared, tensor in zip(grads, partial, tensors, strict=True):
            if shared:  # this rank's share (none, if its copy touched nothing): summed
                share = grad if grad is not None else torch.zeros_like(tensor)
                whole.append(sum_over_ranks(share.contiguous(), mesh))
            elif grad is not None:  # the whole gradient everywhere: rank 0's bits for all
                grad = grad.contiguous()
                dist.broadcast(grad, group_src=0, group=group)
                whole.append(grad)
            else:
                whole.append(None)
        return whole

    return reduce
