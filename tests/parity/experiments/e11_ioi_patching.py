"""IOI-style activation patching: each block's clean output at each position, patched into
the corrupted prompts, scored by the logit difference of two answer tokens.

A sweep over 3 layers x 5 positions. nnsight: one trace per patch inside a session.
torchsurgeon: one session (a clean run and 15 patched runs) sent as one request; the logit
difference is computed on the host (``returning(diff=...)``), so only it travels back.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import LAYERS

CORRECT, WRONG = 3, 4
"""The answer tokens: the indirect object (correct) and the subject."""


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    clean, corrupt = ids[:2, :5], ids[2:, :5]
    diffs = {}
    with lm.session():
        with lm.trace(clean):
            hidden = [lm.get(f.block(layer)).output for layer in range(LAYERS)]
        for layer in range(LAYERS):
            for pos in range(clean.shape[1]):
                with lm.trace(corrupt):
                    lm.get(f.block(layer)).output[:, pos] = hidden[layer][:, pos]
                    logits = lm.output.logits[:, -1]
                    diffs[f"l{layer}p{pos}"] = (logits[:, CORRECT] - logits[:, WRONG]).save()
    return diffs


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    clean, corrupt = ids[:2, :5], ids[2:, :5]
    logits = ts.out("logits")[:, -1]
    diff = logits[:, CORRECT] - logits[:, WRONG]
    probe = ts.select(model).at(f"{f.blocks}.*").insert_after(ts.layers.Save("h{layer}"))
    runs = {"clean": (probe, clean)}
    for layer in range(LAYERS):
        for pos in range(clean.shape[1]):
            patch = ts.layers.SetValues(ts.idx[:, pos], ts.saved(f"h{layer}", run="clean")[:, pos])
            patched = ts.select(model).at(f.block(layer)).insert_after(patch)
            runs[f"l{layer}p{pos}"] = (ts.plan(patched).returning(diff=diff), corrupt)
    results = run(ts.session(**runs))
    return {name: results[name].saved["diff"] for name in runs if name != "clean"}
