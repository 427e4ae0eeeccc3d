"""Module inputs, keyword arguments included: read the attention's hidden states and its
``attention_mask`` keyword argument, and halve an MLP's input.

nnsight: ``.input`` (the first argument, positional or keyword) and ``.inputs`` (``(args,
kwargs)``). torchsurgeon: layers inserted before the module, ``on=`` naming the keyword.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        _, kwargs = lm.get(f.attn(1)).inputs
        mask = kwargs["attention_mask"].save()
        hidden = lm.get(f.attn(1)).input.save()
        lm.get(f.mlp(2)).input = lm.get(f.mlp(2)).input * 0.5
        logits = lm.output.logits.save()
    return {"hidden": hidden, "mask": mask, "logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at(f.attn(1)).insert_before(ts.layers.Save("hidden"))
    save_mask = ts.layers.Save("mask", on="attention_mask")
    model = ts.select(model).at(f.attn(1)).insert_before(save_mask)
    model = ts.select(model).at(f.mlp(2)).insert_before(ts.layers.Scale(0.5))
    result = run(model, ids)
    return {**result.saved, "logits": result.output.logits}
