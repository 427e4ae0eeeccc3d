"""A rewritten model compiles whole (``fullgraph=True``) and ``ts.run`` on it matches eager.

One compile (~10-30 s on CPU): a small GPT-2 with a ``Save``, an ``Add`` and a ``SetValues``.
The compiled model is checked against eager torchsurgeon and against the plain model with
the same edits as hooks; the saved activations must come back from the compiled graph too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hook_reference import HIDDEN, VOCAB, hooks, make_gpt2, max_diff, replace_input, replace_output
from torch import nn

import torchsurgeon as ts

pytestmark = pytest.mark.slow

ATOL = 1e-5


def test_compiled_rewritten_gpt2_matches_eager() -> None:
    hf = make_gpt2()
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    model = ts.wrap(hf)
    probe = ts.select(model).at("transformer.h.0").insert_after(ts.layers.Save("resid_0"))
    probe = ts.select(probe).at("transformer.h.1").insert_after(ts.layers.Add(vec, 2.0))
    probe = (
        ts.select(probe)
        .at("transformer.h.2.mlp.c_proj")
        .insert_before(ts.layers.SetValues(ts.idx[:, -1, [3, 5, 8]], 4.0))
    )
    probe = ts.select(probe).at("transformer.h.2").insert_after(ts.layers.Save("resid_2"))
    ids = torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))

    torch._dynamo.reset()
    compiled = torch.compile(probe, fullgraph=True)
    with torch.no_grad():
        eager = ts.run(probe, ids)
        got = ts.run(compiled, ids)
        again = ts.run(compiled, ids)  # the recorders get fresh lists on every run
        plain_call = compiled(ids)  # outside ts.run nothing is recorded, nothing breaks

        kept: dict[str, torch.Tensor] = {}

        def keep(key: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                kept[key] = output

            return hook

        def force(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[:, -1, [3, 5, 8]] = 4.0
            return out

        post = {
            "transformer.h.0": keep("resid_0"),
            "transformer.h.1": replace_output(lambda x: x + 2.0 * vec),
            "transformer.h.2": keep("resid_2"),
        }
        with hooks(hf, pre={"transformer.h.2.mlp.c_proj": replace_input(force)}, post=post):
            reference = hf(ids).logits

    assert set(got.saved) == set(eager.saved) == {"resid_0", "resid_2"}
    assert max_diff(got.output.logits, eager.output.logits) <= ATOL
    assert max_diff(again.output.logits, eager.output.logits) <= ATOL
    assert max_diff(plain_call.logits, eager.output.logits) <= ATOL
    assert max_diff(got.output.logits, reference) <= ATOL
    for key in ("resid_0", "resid_2"):
        assert max_diff(got.saved[key], eager.saved[key]) <= ATOL, key
        assert max_diff(again.saved[key], eager.saved[key]) <= ATOL, key
        assert max_diff(got.saved[key], kept[key]) <= ATOL, key
    assert got.saved["resid_0"] is not again.saved["resid_0"]
    assert max_diff(got.output.logits, hf(ids).logits) > 1e-3  # the edits are in the graph
