"""Read block 1's attention pattern and zero one head's output.

nnsight, on the ``transformers`` model (eager attention): the pattern is the attention
module's second output, a head's output a slice of the output projection's input.
torchsurgeon, on the model's conversion: both are nodes, ``blocks.1.attn.pattern``
``[batch, head, query, key]`` and ``blocks.1.attn.head_out`` ``[batch, pos, head, d_head]``.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HEAD_DIM

CONVERTED = True
"""``ts_version`` gets ``ts.convert(hf_model)``; the host serves the checkpoint converted."""
HEAD = 1


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids):
        heads = lm.get(f"{f.attn(1)}.{f.out_proj}").input
        heads[..., HEAD * HEAD_DIM : (HEAD + 1) * HEAD_DIM] = 0.0
        pattern = lm.get(f.attn(1)).output[1].save()
        logits = lm.output.logits.save()
    return {"pattern": pattern, "logits": logits}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    model = ts.select(model).at("blocks.1.attn.pattern").insert_after(ts.layers.Save("pattern"))
    zero_head = ts.layers.Zero(ts.idx[:, :, HEAD])  # head_out is [batch, pos, head, d_head]
    model = ts.select(model).at("blocks.1.attn.head_out").insert_after(zero_head)
    result = run(model, ids)
    return {"pattern": result.saved["pattern"], "logits": result.output}
