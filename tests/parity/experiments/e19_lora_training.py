"""LoRA training: 5 AdamW steps on an MLP projection, the base frozen.

A rank-4 adapter after block 1's MLP input projection (GPT-2's ``Conv1D`` ``c_fc``, Llama's
``nn.Linear`` ``up_proj``) adds ``SCALE * x @ a.T @ b.T`` to its output; ``a`` and ``b``
are trained on the next-token loss, alternating two batches, with ``torch.optim.AdamW`` and
its defaults (``lr`` aside). nnsight: one trace per step, the adapter written into
``.output``, ``torch.autograd.grad`` toward ``a`` and ``b``, the optimizer stepped between
traces. torchsurgeon: a ``LowRankAdapter`` inserted after the projection and the loop as data,
``ts.training(...)`` with ``ts.optim.AdamW`` (torch's defaults, ``weight_decay=0.01``
included): ``ts.train`` here, one request on a host (``ts.train(..., backend=client)``).
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HIDDEN

STEPS, LR, RANK, SCALE = 5, 1e-2, 4, 2.0
SITE = {"gpt2": ("mlp.c_fc", 4 * HIDDEN), "llama": ("mlp.up_proj", 2 * HIDDEN)}
"""The adapted module in block 1, and its output width."""
A = (torch.rand(RANK, HIDDEN, generator=torch.Generator().manual_seed(4)) * 2 - 1) / 8
"""The adapter's starting ``a`` (``b`` starts at zero, as LoRA's does)."""


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    site, width = f"{f.block(1)}.{SITE[f.name][0]}", SITE[f.name][1]
    a, b = A.clone().requires_grad_(), torch.zeros(width, RANK, requires_grad=True)
    optimizer = torch.optim.AdamW([a, b], lr=LR)
    losses = []
    for step in range(STEPS):
        batch = (ids[:2], ids[2:])[step % 2]
        with lm.trace(batch):
            x = lm.get(site).input
            lm.get(site).output = lm.get(site).output + x @ a.T @ b.T * SCALE
            logits = lm.output.logits[:, :-1]
            loss = -logits.log_softmax(-1).gather(-1, batch[:, 1:, None]).mean()
            a.grad, b.grad = torch.autograd.grad(loss, [a, b])
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": torch.tensor(losses), "a": a.detach(), "b": b.detach()}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    site, width = f"{f.block(1)}.{SITE[f.name][0]}", SITE[f.name][1]
    adapter = ts.layers.LowRankAdapter(A, torch.zeros(width, RANK), SCALE)
    model = ts.select(model).at(site).insert_after(adapter)
    logits = ts.out("logits")[:, :-1]
    loss = -logits.log_softmax(-1).gather(-1, ts.input("input_ids")[:, 1:, None]).mean()
    params = ts.select(model).at_instances_of("LowRankAdapter")
    optimizer = ts.optim.AdamW(lr=LR)
    fit = ts.training(
        model, [ids[:2], ids[2:]], loss=loss, params=params, optimizer=optimizer, steps=STEPS
    )
    result = run(fit)
    trained = {name.rpartition(".")[2]: tensor for name, tensor in result.tensors.items()}
    return {"losses": torch.tensor(result.losses), **trained}
