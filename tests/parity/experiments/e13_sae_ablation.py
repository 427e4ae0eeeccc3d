"""SAE feature ablation: encode block 1's output with a (random, fixed) sparse autoencoder,
zero one feature, decode, and run on from the reconstruction.

nnsight computes it on the real tensor in the trace; torchsurgeon writes it as one
``Compute`` expression whose constants (the SAE's weights) travel in the plan.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HIDDEN

_g = torch.Generator().manual_seed(13)
FEATURES, FEATURE = 256, 7
W_ENC = torch.randn(HIDDEN, FEATURES, generator=_g) / HIDDEN**0.5
B_ENC = 0.1 * torch.randn(FEATURES, generator=_g)
W_DEC = torch.randn(FEATURES, HIDDEN, generator=_g) / FEATURES**0.5
B_DEC = 0.1 * torch.randn(HIDDEN, generator=_g)
KEEP = torch.ones(FEATURES).index_fill(0, torch.tensor([FEATURE]), 0.0)
"""1 for every feature but the ablated one."""


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        h = lm.get(f.block(1)).output
        acts = torch.relu((h - B_DEC) @ W_ENC + B_ENC)
        acts[..., FEATURE] = 0.0
        lm.get(f.block(1)).output = acts @ W_DEC + B_DEC
        logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    acts = ((ts.here - B_DEC) @ W_ENC + B_ENC).relu()
    ablate = ts.layers.Compute((acts * KEEP) @ W_DEC + B_DEC)
    model = ts.select(model).at(f.block(1)).insert_after(ablate)
    return {"logits": run(model, ids).output.logits}
