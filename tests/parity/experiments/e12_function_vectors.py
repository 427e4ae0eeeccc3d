"""Function vectors: block 1's last-token state averaged over a batch of prompts in one run,
added at the last token of a query in the next.

nnsight: two traces in a session. torchsurgeon: a session whose second run's ``Add`` reads
the first run's record: ``ts.saved("h", run="fv").mean(0)[-1]``.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    prompts, query = ids[:3], ids[3:]
    with lm.session():
        with lm.trace(prompts):
            fv = lm.get(f.block(1)).output[:, -1].mean(0)
        with lm.trace(query):
            lm.get(f.block(1)).output[:, -1] += fv
            logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    prompts, query = ids[:3], ids[3:]
    probe = ts.select(model).at(f.block(1)).insert_after(ts.layers.Save("h"))
    add = ts.layers.Add(ts.saved("h", run="fv").mean(0)[-1], index=ts.idx[:, -1])
    steered = ts.select(model).at(f.block(1)).insert_after(add)
    results = run(ts.session(fv=(probe, prompts), steered=(steered, query)))
    return {"logits": results["steered"].output.logits}
