"""Generation with an edit at one step and a save at every step.

Greedy generation of ``NEW`` tokens; at step ``EDIT`` (step 0 is the prompt's pass, each
later step one new token) block 0's last position is zeroed, and block 1's output is kept at
every step. nnsight: ``lm.trace(ids, fn="generate", ...)`` (a plain ``NNsight`` model's
``generate``) with ``for step in tracer.iter[:NEW]``, the edit under ``if step == EDIT``.
torchsurgeon: ``Zero(..., steps=EDIT)`` and ``Save``, ``ts.run(model.generate, ...)``; the
saves come back per step in ``records``. One request on a host.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts

NEW, EDIT = 5, 2


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids, fn="generate", max_new_tokens=NEW, do_sample=False) as tracer:
        hidden = [].save()
        for step in tracer.iter[:NEW]:
            if step == EDIT:
                lm.get(f.block(0)).output[:, -1] = 0.0
            hidden.append(lm.get(f.block(1)).output)
        tokens = tracer.result.save()
    return {"tokens": tokens, "hidden": torch.cat(hidden, dim=1)}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    edit = ts.layers.Zero(ts.idx[:, -1], steps=EDIT)
    model = ts.select(model).at(f.block(0)).insert_after(edit)
    model = ts.select(model).at(f.block(1)).insert_after(ts.layers.Save("h1"))
    result = run(model.generate, ids, max_new_tokens=NEW, do_sample=False)
    return {"tokens": result.output, "hidden": torch.cat(result.records["h1"], dim=1)}
