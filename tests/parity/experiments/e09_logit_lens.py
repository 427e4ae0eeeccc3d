"""The logit lens: each block's residual stream through the final norm and the unembedding.

nnsight calls the model's modules inside the trace. torchsurgeon calls them with
``ts.call`` in ``plan.returning``, on the host's weights, so only the probabilities travel.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import LAYERS


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    probs = {}
    with lm.trace(ids):
        for i in range(LAYERS):
            logits = lm.lm_head(lm.get(f.norm)(lm.get(f.block(i)).output))
            probs[f"layer{i}"] = logits[:, -1].softmax(-1).save()
    return probs


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f"{f.blocks}.*").insert_after(ts.layers.Save("h{layer}"))
    lens = {}
    for i in range(LAYERS):
        logits = ts.call("lm_head", ts.call(f.norm, ts.saved(f"h{i}")))
        lens[f"layer{i}"] = logits[:, -1].softmax(-1)
    result = run(ts.plan(model).returning(**lens), ids)
    return {name: result.saved[name] for name in lens}
