"""Steering during generation: a vector added at every step, and at a slice of steps.

Greedy generation of ``NEW`` tokens, steered along ``DIRECTION``: ``4 * DIRECTION`` added
to block 0's output at every step, and ``-16 * DIRECTION`` to block 2's output at steps 1
to 3 only (step 0 is the prompt's pass); the last position's logits are kept at every step.
nnsight: assignments inside ``for step in tracer.iter[:NEW]``, the second one under
``if step in STEPS``. torchsurgeon: two ``Add`` layers, the second with
``steps=slice(1, 4)``, and a ``Save`` on ``lm_head``; ``ts.run(model.generate, ...)``, one
request on a host.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HIDDEN

NEW = 6
STEPS = range(1, 4)
DIRECTION = torch.nn.functional.normalize(
    torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3)), dim=0
)


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids, fn="generate", max_new_tokens=NEW, do_sample=False) as tracer:
        logits = [].save()
        for step in tracer.iter[:NEW]:
            lm.get(f.block(0)).output = lm.get(f.block(0)).output + 4.0 * DIRECTION
            if step in STEPS:
                lm.get(f.block(2)).output = lm.get(f.block(2)).output + -16.0 * DIRECTION
            logits.append(lm.lm_head.output[:, -1])
        tokens = tracer.result.save()
    return {"tokens": tokens, "logits": torch.stack(logits)}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f.block(0)).insert_after(ts.layers.Add(DIRECTION, 4.0))
    some_steps = ts.layers.Add(DIRECTION, -16.0, steps=slice(STEPS.start, STEPS.stop))
    model = ts.select(model).at(f.block(2)).insert_after(some_steps)
    model = ts.select(model).at("lm_head").insert_after(ts.layers.Save("logits"))
    result = run(model.generate, ids, max_new_tokens=NEW, do_sample=False)
    logits = torch.stack([step[:, -1] for step in result.records["logits"]])
    return {"tokens": result.output, "logits": logits}
