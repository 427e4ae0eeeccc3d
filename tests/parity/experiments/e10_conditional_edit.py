"""A conditional edit: clip the norm of the tokens whose norm is above the batch's mean.

The condition depends on the data. nnsight computes it on the real tensor inside the trace;
torchsurgeon writes it as ``ts.ops.where`` in a ``Compute`` expression, evaluated where the
model runs.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        h = lm.get(f.block(1)).output
        norm = h.norm(dim=-1, keepdim=True)
        lm.get(f.block(1)).output = torch.where(norm > norm.mean(), h / norm * norm.mean(), h)
        logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    h = ts.here
    norm = h.norm(dim=-1, keepdim=True)
    clip = ts.layers.Compute(ts.ops.where(norm > norm.mean(), h / norm * norm.mean(), h))
    model = ts.select(model).at(f.block(1)).insert_after(clip)
    return {"logits": run(model, ids).output.logits}
