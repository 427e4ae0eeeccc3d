"""Models sharded over processes: every intervention sees and edits the full activation.

A model split with tensor parallelism (``torch.distributed.tensor.parallel``) is still one
module tree on every rank, with the unsharded model's paths; what changes is that some
activations exist only as shards, one per rank. This package makes intervention layers act
on those activations exactly as on the unsharded model's:

- :func:`parallelize` shards a plain model with ``parallelize_module`` and records, for
  every site, whether its tensor is replicated or split (and along what); it guards the
  sharded sites so that no layer ever runs on a shard as if it were the whole tensor.
- :func:`localize` places the layers of a rewrite of the sharded model for their sites —
  at the projections, and inside the regions between them, whose layouts the region's
  ``DTensor`` twin finds per call (:mod:`~torchsurgeon.distributed.inside`): recording
  layers gather the full tensor (once, and only inside ``ts.run``), edits that are local to
  each shard run on each shard with their index translated, and anything else gathers,
  edits and scatters. Converted models (``ts.convert``) shard by heads with their config's
  plan. :func:`apply` replays a plan made against the unsharded model
  and localizes it; :func:`plan` is ``ts.plan`` for a rewrite of a sharded model.
- :func:`launch` runs a function on N ranks on this machine (gloo on CPU, NCCL on GPU),
  bounded in time; :func:`run_plan` / :func:`run_plans` shard a model on N ranks, send them
  plans as bytes and return rank 0's :class:`~torchsurgeon.layers.results.Result`.

See ``docs/distributed.md`` for what is gathered, when, what it costs, and what is not
supported yet.
"""

from torchsurgeon.distributed.launch import (
    LaunchError,
    LaunchTimeout,
    RankFailed,
    launch,
    run_plan,
    run_plans,
)
from torchsurgeon.distributed.localize import apply, localize, plan
from torchsurgeon.distributed.parallelize import (
    SiteLayout,
    TensorParallelError,
    parallelize,
    site_layouts,
)
from torchsurgeon.distributed.sharded import Sharded
from torchsurgeon.distributed.split import Split

__all__ = [
    "LaunchError",
    "LaunchTimeout",
    "RankFailed",
    "Sharded",
    "SiteLayout",
    "Split",
    "TensorParallelError",
    "apply",
    "launch",
    "localize",
    "parallelize",
    "plan",
    "run_plan",
    "run_plans",
    "site_layouts",
]
