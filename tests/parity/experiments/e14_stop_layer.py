"""``Stop`` on a module's input: edit block 0, read the residual stream entering the final
norm, and stop before the norm and the unembedding run.

nnsight: ``.input`` then ``tracer.stop()``. torchsurgeon: ``Save`` then ``Stop``, both
inserted before the final norm; the edit upstream shows in what was saved.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids) as tracer:
        lm.get(f.block(0)).output[:, :, 0] = 0.0
        resid = lm.get(f.norm).input.save()
        tracer.stop()
    return {"resid": resid}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f.block(0)).insert_after(ts.layers.Zero(ts.idx[:, :, 0]))
    model = ts.select(model).at(f.norm).insert_before(ts.layers.Save("resid"))
    model = ts.select(model).at(f.norm).insert_before(ts.layers.Stop())
    return {"resid": run(model, ids).saved["resid"]}
