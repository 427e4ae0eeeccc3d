"""Attribution patching: gradient x (clean - corrupted) activation, over the residual
stream's positions and over attention heads, for every layer, from one backward pass.

The score is the corrupted prompts' logit difference; its gradient at each site of the
corrupted run, times how far the clean run's activation is from the corrupted one, is the
linear estimate of what patching that site would change. The heads are the attention output
projection's input, ``[batch, pos, head * d_head]``, split into heads. nnsight: a clean trace,
then a corrupted one whose ``with loss.backward():`` reads every site's ``.grad`` (latest
first), inside ``lm.session()``. torchsurgeon: a session of the clean run and the corrupted
run with ``SaveGrad`` and ``with_backward``, the attributions computed on the host
(``returning``), so only they travel back: one request.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts
from parity.families import HEAD_DIM, HEADS, LAYERS

CORRECT, WRONG = 3, 4


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    def sites() -> Any:  # in the order the model reaches them: heads, then block output
        for i in range(LAYERS):
            yield lm.get(f"{f.attn(i)}.{f.out_proj}").input
            yield lm.get(f.block(i)).output

    with lm.session():
        with lm.trace(ids[:2]):
            clean = list(sites())
        with lm.trace(ids[2:]):
            acts = list(sites())
            logits = lm.output.logits[:, -1]
            with (logits[:, CORRECT] - logits[:, WRONG]).sum().backward():
                grads = [act.grad for act in reversed(acts)][::-1].save()
            scores = [g * (c - a) for g, c, a in zip(grads, clean, acts, strict=True)].save()
    by_head = [s.unflatten(-1, (HEADS, HEAD_DIM)).sum(-1) for s in scores[0::2]]
    return {
        **{f"heads{i}": s for i, s in enumerate(by_head)},
        **{f"resid{i}": s.sum(-1) for i, s in enumerate(scores[1::2])},
    }


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    resid, heads = f"{f.blocks}.*", f"{f.blocks}.*.{f.attn_name}.{f.out_proj}"
    clean = ts.select(model).at(resid).insert_after(ts.layers.Save("r{layer}"))
    clean = ts.select(clean).at(heads).insert_before(ts.layers.Save("z{layer}"))
    probe = ts.select(clean).at(resid).insert_after(ts.layers.SaveGrad("d_r{layer}"))
    probe = ts.select(probe).at(heads).insert_before(ts.layers.SaveGrad("d_z{layer}"))

    def score(key: str) -> ts.Expr:  # gradient x (clean - corrupted), at one site
        return ts.saved(f"d_{key}") * (ts.saved(key, run="clean") - ts.saved(key))

    scores = {f"resid{i}": score(f"r{i}").sum(-1) for i in range(LAYERS)}
    for i in range(LAYERS):
        scores[f"heads{i}"] = ts.ops.reduce(score(f"z{i}"), "b p (h d) -> b p h", "sum", h=HEADS)
    logits = ts.out("logits")[:, -1]
    corrupted = ts.plan(probe).with_backward((logits[:, CORRECT] - logits[:, WRONG]).sum())
    session = ts.session(clean=(clean, ids[:2]), corrupted=(corrupted.returning(**scores), ids[2:]))
    return dict(run(session)["corrupted"].saved)
