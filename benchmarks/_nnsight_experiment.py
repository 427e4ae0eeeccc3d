"""The nnsight side of ``benchmarks/overhead.py``: the experiment as an nnsight trace.

It lives in a file of its own because nnsight reads the source of the ``with`` block it
runs; a body typed at a prompt or built with ``exec`` has none to read.
"""

from __future__ import annotations

from typing import Any

import torch


def run_nnsight(
    lm: Any, ids: torch.Tensor, vector: torch.Tensor, steer_at: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Save every block's output and add ``vector`` to block ``steer_at``'s output.

    ``lm`` is ``nnsight.NNsight(gpt2_lm_head_model)``. In transformers 5 a ``GPT2Block``
    returns its hidden states as a plain tensor (not a tuple), so ``block.output`` is that
    tensor. The steering is written out of place (``block.output = block.output + vector``)
    rather than as ``block.output[:] += vector``: the in-place form would also change the
    tensor already saved for that block, while every other method saves block 6 as it was
    before the steering.
    """
    saved: list[torch.Tensor] = []
    with lm.trace(ids):
        for i, block in enumerate(lm.transformer.h):
            saved.append(block.output.save())
            if i == steer_at:
                block.output = block.output + vector
        logits = lm.output.logits.save()
    return logits, saved
