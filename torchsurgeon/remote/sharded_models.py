"""Models held as tensor-parallel shards by one rank of a group (spawned or on Ray).

Every rank loads every checkpoint and shards it with
:func:`~torchsurgeon.distributed.parallelize.parallelize` (the model's own
``base_model_tp_plan``; a converted checkpoint, by the conversion's heads and MLP features).
Rank 0 also describes each model — its structure and identity, computed from the unsharded
model before sharding — so the HTTP process validates plans and estimates their cost
against a structure-only stand-in, exactly as for a whole model.

On a rank a request is read with the stand-in's checks and replayed on the shards with
:func:`torchsurgeon.distributed.localize.apply` (:class:`OnShards`): recording layers gather
the full activation once, edits act on each shard (``docs/distributed.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.limits import Limits
from torchsurgeon.remote.worker import Worker

__all__ = ["OnShards", "load_sharded"]


def load_sharded(sources: dict[str, Any], device: str, limits: Limits) -> Worker:
    """A worker over this rank's shards of every model (inside a joined process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    from torchsurgeon.distributed.parallelize import parallelize
    from torchsurgeon.plans.identity import identity_of
    from torchsurgeon.plans.structure import structure_of
    from torchsurgeon.remote.calls import _attn_implementation
    from torchsurgeon.remote.checkpoints import load_checkpoint
    from torchsurgeon.surgery.frozen import wrap

    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    models = {}
    for name, data in sources.items():
        checkpoint = LocalCheckpoint.from_json(dict(data))
        module, tokenizer = load_checkpoint(checkpoint)
        module = module.eval()
        whole = wrap(module)
        standin = HostedModel.from_structure(
            name,
            structure_of(whole, identity_of(whole)),
            str(Path(checkpoint.path)),
            tokenizer is not None,
            converted=checkpoint.convert,
            attn_implementation=_attn_implementation(whole),
        )
        del whole
        if device == "cuda":
            module = module.to(torch.device("cuda", torch.cuda.current_device()))
        models[name] = OnShards(standin, parallelize(module, mesh, "auto"))
    return Worker(models, limits)


class OnShards:
    """The stand-in's checks, with each plan replayed on this rank's shards (``tsd.apply``)
    where a whole model would be rewritten."""

    def __init__(self, standin: HostedModel, sharded: Any) -> None:
        self._standin, self._sharded = standin, sharded

    def __getattr__(self, name: str) -> Any:  # read_plan, call_arguments, structure, ...
        return getattr(self._standin, name)

    def merged_view(self, plans: list[Any], scoped: Any) -> Any:
        """The shards with every plan's layers inserted as ``scoped(k, layer)``, placed for
        their sites (co-batching on the ranks)."""
        from torchsurgeon.distributed.localize import localize
        from torchsurgeon.remote.hosted import merged
        from torchsurgeon.surgery.frozen import wrap

        return localize(merged(wrap(self._sharded), plans, scoped))

    def prepare(self, plan: Any, limits: Limits, *_: Any) -> tuple[Any, None]:
        from torchsurgeon.distributed.localize import apply
        from torchsurgeon.distributed.parallelize import TensorParallelError
        from torchsurgeon.plans.errors import IdentityMismatchError, PlanError

        try:
            return apply(plan, self._sharded), None
        except IdentityMismatchError as error:
            message = f"model {self._standin.name!r}: {error}"
            raise ApiError(409, "identity_mismatch", message) from None
        except (PlanError, TensorParallelError) as error:  # e.g. a site inside a TP region
            raise ApiError(422, "plan_does_not_fit", str(error), "steps") from None
