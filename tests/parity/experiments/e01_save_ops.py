"""Save a hidden state and compute on it where the model runs: its norm, the top token.

nnsight: operations on proxies inside the trace, then ``.save()``. torchsurgeon: the same
operations as expressions in ``plan.returning``, evaluated on the host after the forward.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        hidden = lm.get(f.block(1)).output
        norm = hidden.norm(dim=-1).save()
        top = lm.output.logits[:, -1].argmax(-1).save()
    return {"norm": norm, "top": top}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    probe = ts.select(model).at(f.block(1)).insert_after(ts.layers.Save("h1"))
    norm = ts.saved("h1").norm(dim=-1)
    top = ts.out("logits")[:, -1].argmax(-1)
    result = run(ts.plan(probe).returning(norm=norm, top=top), ids)
    return {"norm": result.saved["norm"], "top": result.saved["top"]}
