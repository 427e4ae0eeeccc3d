"""``convert`` copies nothing: the converted model is made of the original's tensors.

``convert`` must build its modules around the ``transformers`` model's own storage (fused
and transposed weights as views), so every parameter of the converted model lives in a
storage of the original, every original parameter is used, and an in-place edit of one
shows in the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from model_zoo import make_hf_model
from torch import nn

import torchsurgeon.models as tsm


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_convert_shares_every_tensor(family: str, hf_models: Callable[[str], nn.Module]) -> None:
    hf = hf_models(family)
    model = tsm.convert(hf)
    assert _storages(model) == _storages(hf)


def test_gpt2_fused_qkv_are_views_at_the_right_offsets(
    hf_models: Callable[[str], nn.Module],
) -> None:
    hf = hf_models("gpt2")
    model = tsm.convert(hf)
    c_attn = hf.transformer.h[0].attn.c_attn.weight  # [d_model, 3 * d_model]
    attn = model.blocks[0].attn
    step = c_attn.shape[0] * c_attn.element_size()  # one d_model block of columns
    assert attn.q.weight.data_ptr() == c_attn.data_ptr()
    assert attn.k.weight.data_ptr() == c_attn.data_ptr() + step
    assert attn.v.weight.data_ptr() == c_attn.data_ptr() + 2 * step
    assert model.unembed.weight is model.embed.weight  # tied: one parameter at both sites
    assert model.embed.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_in_place_edit_of_the_original_shows_in_the_conversion(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    ids, mask = batch
    hf = make_hf_model("gpt_neox")  # private: it is edited
    model = tsm.convert(hf)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
        hf.gpt_neox.layers[0].attention.query_key_value.weight.mul_(2)
        after = model(ids, attention_mask=mask)
        expected = hf(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after)
    assert torch.allclose(after[0], expected[0], atol=1e-4)  # row 0 has no padding
