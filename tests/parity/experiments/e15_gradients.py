"""Gradients: read the gradient reaching a block's output, and edit one on its way back.

The logit difference of two tokens is differentiated after the forward pass. nnsight:
``.output`` captured in the trace, then ``.grad`` read (``.save()``) and assigned inside
``with loss.backward():``, latest block first. torchsurgeon: ``SaveGrad`` records a
gradient, ``ComputeGrad`` replaces it (``ts.here`` is the gradient that arrives), and the
plan's ``with_backward(expr)`` is differentiated where the model runs. Block 1's gradient is
clipped, so block 0's shows the clip; ``g1`` is read before it.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts

CORRECT, WRONG = 3, 4
CLIP = 1e-3


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        h0, h1 = lm.get(f.block(0)).output, lm.get(f.block(1)).output
        logits = lm.output.logits[:, -1]
        with (logits[:, CORRECT] - logits[:, WRONG]).sum().backward():
            g1 = h1.grad.save()
            h1.grad = h1.grad.clamp(-CLIP, CLIP)
            g0 = h0.grad.save()
    return {"g0": g0, "g1": g1}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f.block(0)).insert_after(ts.layers.SaveGrad("g0"))
    clip = ts.layers.ComputeGrad(ts.here.clamp(-CLIP, CLIP))
    model = ts.select(model).at(f.block(1)).insert_after(clip)
    model = ts.select(model).at(f.block(1)).insert_after(ts.layers.SaveGrad("g1"))
    logits = ts.out("logits")[:, -1]
    result = run(ts.plan(model).with_backward((logits[:, CORRECT] - logits[:, WRONG]).sum()), ids)
    return {"g0": result.saved["g0"], "g1": result.saved["g1"]}
