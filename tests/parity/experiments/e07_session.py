"""Values across traces: three forward passes, each reading the one before.

Run ``a`` averages block 1's output over its prompts; run ``b`` subtracts that mean from
block 1 on other prompts and keeps block 2's output; run ``c`` writes ``b``'s last-token
block-2 state into the first prompts. nnsight: traces inside ``model.session()``.
torchsurgeon: ``ts.session`` with ``ts.saved(key, run=...)``, sent as one request.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.session():
        with lm.trace(ids[:2]):
            mean = lm.get(f.block(1)).output.mean(dim=(0, 1))
        with lm.trace(ids[2:]):
            lm.get(f.block(1)).output = lm.get(f.block(1)).output - mean
            h2 = lm.get(f.block(2)).output
        with lm.trace(ids[:2]):
            lm.get(f.block(2)).output[:, -1] = h2[:, -1]
            logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    a = ts.select(model).at(f.block(1)).insert_after(ts.layers.Save("h1"))
    centre = ts.layers.Compute(ts.here - ts.saved("h1", run="a").mean(dim=(0, 1)))
    b = ts.select(model).at(f.block(1)).insert_after(centre)
    b = ts.select(b).at(f.block(2)).insert_after(ts.layers.Save("h2"))
    patch = ts.layers.SetValues(ts.idx[:, -1], ts.saved("h2", run="b")[:, -1])
    c = ts.select(model).at(f.block(2)).insert_after(patch)
    results = run(ts.session(a=(a, ids[:2]), b=(b, ids[2:]), c=(c, ids[:2])))
    return {"logits": results["c"].output.logits}
