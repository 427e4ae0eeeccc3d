"""Cross-prompt patching: block 1's output at position 2 of a clean prompt, written into a
corrupted prompt at position 5.

nnsight: two traces in a session (the clean value flows to the second; a plain ``NNsight``
model does not batch the invokes of one trace). torchsurgeon: a session of two runs; the
second reads the first's record with ``ts.saved(..., run=)``.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    clean, corrupt = ids[:2], ids[2:]
    with lm.session():
        with lm.trace(clean):
            h = lm.get(f.block(1)).output[:, 2]
        with lm.trace(corrupt):
            lm.get(f.block(1)).output[:, 5] = h
            logits = lm.output.logits.save()
    return {"logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    clean, corrupt = ids[:2], ids[2:]
    save = ts.select(model).at(f.block(1)).insert_after(ts.layers.Save("h1"))
    patch = ts.layers.SetValues(ts.idx[:, 5], ts.saved("h1", run="clean")[:, 2])
    patched = ts.select(model).at(f.block(1)).insert_after(patch)
    results = run(ts.session(clean=(save, clean), patched=(patched, corrupt)))
    return {"logits": results["patched"].output.logits}
