"""Edit activations: set values, scale an MLP's output, project out a direction and clamp.

nnsight assigns to ``.output``; torchsurgeon inserts ``SetValues``, ``Scale`` and a
``Compute`` whose expression is the projection.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HIDDEN

DIRECTION = torch.nn.functional.normalize(
    torch.randn(HIDDEN, generator=torch.Generator().manual_seed(2)), dim=0
)


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    d = DIRECTION
    with lm.trace(ids):
        lm.get(f.block(0)).output[:, -1, :8] = 0.5
        lm.get(f.mlp(1)).output = lm.get(f.mlp(1)).output * 2.0
        h = lm.get(f.block(2)).output
        lm.get(f.block(2)).output = (h - (h @ d)[..., None] * d).clamp(-1.0, 1.0)
        logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    d, h = DIRECTION, ts.here
    set_last = ts.layers.SetValues(ts.idx[:, -1, :8], 0.5)
    model = ts.select(model).at(f.block(0)).insert_after(set_last)
    model = ts.select(model).at(f.mlp(1)).insert_after(ts.layers.Scale(2.0))
    project_out = ts.layers.Compute((h - (h @ d)[..., None] * d).clamp(-1.0, 1.0))
    model = ts.select(model).at(f.block(2)).insert_after(project_out)
    return {"logits": run(model, ids).output.logits}
