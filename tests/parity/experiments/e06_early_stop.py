"""Early stop: read block 0's output and run no further.

nnsight: ``tracer.stop()``. torchsurgeon: a ``Stop`` layer after the ``Save``; the run
returns what was saved, and no output.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids) as tracer:
        hidden = lm.get(f.block(0)).output.save()
        tracer.stop()
    return {"hidden": hidden}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f.block(0)).insert_after(ts.layers.Save("hidden"))
    model = ts.select(model).at(f.block(0)).insert_after(ts.layers.Stop())
    return {"hidden": run(model, ids).saved["hidden"]}
