"""One family table for the conversions and the methods.

Every family's entry says where its parts sit in the ``transformers`` model; the methods
read those layouts, and every converted model has one layout of its own. For each family of
the zoo: the methods find the layout of the language model, of its base model and of both
conversions, and the logit lens — which reads the blocks, the final norm and the
unembedding — gives the same distributions on the ``transformers`` model and on its
conversion, whose last layer is the model's own output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from model_zoo import make_hf_model
from torch import nn

import torchsurgeon.models as tsm
from torchsurgeon import methods as M


def test_methods_and_models_read_one_table() -> None:
    assert M.FAMILIES is tsm.FAMILIES
    for model_type, family in tsm.FAMILIES.items():
        assert model_type in family.model_types
        assert family.layout.blocks and family.layout.attn_out and family.layout.mlp_down


def test_every_family_has_a_layout_for_the_methods(
    family: str, hf_models: Callable[[str], nn.Module]
) -> None:
    hf = hf_models(family)
    base = make_hf_model(family, base=True)
    for model in (hf, base, tsm.convert(hf), tsm.convert(base)):
        layout = M.layout_of(model)
        assert layout.n_heads == 4
        assert len(model.get_submodule(layout.blocks)) == 3
    assert M.layout_of(tsm.convert(hf)).blocks == "blocks"
    assert M.layout_of(base).unembed is None and M.layout_of(tsm.convert(base)).unembed is None


def test_logit_lens_agrees_on_the_model_and_its_conversion(
    family: str, hf_models: Callable[[str], nn.Module]
) -> None:
    hf = hf_models(family)
    converted = tsm.convert(hf)
    ids = torch.randint(3, 200, (7,), generator=torch.Generator().manual_seed(0))
    lens = M.logit_lens(converted, ids)
    with torch.no_grad():
        own = converted(ids[None])[0].float().log_softmax(-1)
    assert (lens.log_probs[-1] - own).abs().max() <= 1e-4  # the last layer is the output
    # (Phi-3's rotary module writes its frequencies during forward: a frozen tree lets a
    # module's own code update its caches, so the wrapped model runs.)
    reference = M.logit_lens(hf, ids)
    difference = (reference.log_probs - lens.log_probs).abs().max()
    if family == "gemma2":
        # transformers' Gemma 2 soft-caps its logits in forward, outside lm_head: a lens on
        # the transformers model decodes without the cap, the conversion's unembed has it.
        assert difference > 1e-5
    else:
        assert difference <= 1e-4
