"""Base models — no language-model head — convert and load too, equal to ``transformers``.

A sentence-embedding checkpoint is a bare ``BertModel`` (``architectures: ["BertModel"]``);
a decoder's base model is ``LlamaModel``, ``GPT2Model``, ... For every family the converted
or loaded base model returns the last hidden state, and BERT's pooler output too, equal to
the ``transformers`` base model's on a batch padded on the left and on the right. A class no
family converts is refused with a message that lists what converts and never names as
unsupported a class it accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from model_zoo import BASE_CLASSES, make_hf_model, padding_position_ids
from torch import nn

import torchsurgeon.models as tsm
from torchsurgeon.layers.transformer import EncoderOutput
from torchsurgeon.models import UnsupportedArchitectureError

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def base_models() -> Callable[[str], nn.Module]:
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = make_hf_model(name, base=True)
        return cache[name]

    return get


def _reference(
    hf: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> transformers.utils.ModelOutput:
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=padding_position_ids(mask))


def _check(
    model: nn.Module, hf: nn.Module, family: str, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    expected = _reference(hf, ids, mask)
    with torch.no_grad():
        output = model(ids, attention_mask=mask)
    if family == "bert":  # BertModel has a pooler: (last_hidden_state, pooler_output)
        assert isinstance(output, EncoderOutput)
        hidden = output.last_hidden_state
        pooled = output.pooler_output
        assert pooled.shape == (ids.shape[0], hf.config.hidden_size)
        assert (pooled - expected.pooler_output).abs().max().item() <= TOLERANCE
    else:
        assert isinstance(output, torch.Tensor)
        hidden = output
    assert hidden.shape == (*ids.shape, hf.config.hidden_size)
    real = mask.bool()
    assert (hidden - expected.last_hidden_state).abs()[real].max().item() <= TOLERANCE
    assert expected.last_hidden_state.abs()[real].max() > 0.1  # a real comparison


def test_convert_base_model_matches(
    family: str,
    base_models: Callable[[str], nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    hf = base_models(family)
    assert type(hf) is BASE_CLASSES[family]
    model = tsm.convert(hf)
    assert model.unembed is None
    _check(model, hf, family, batch)


def test_load_base_checkpoint_matches(
    family: str,
    base_models: Callable[[str], nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    tmp_path: Path,
) -> None:
    hf = base_models(family)
    hf.save_pretrained(tmp_path)  # config.json says architectures: [<base class>]
    model = tsm.load(tmp_path)
    _check(model, hf, family, batch)


def test_the_base_of_a_language_model_converts_without_its_head(
    hf_models: Callable[[str], nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    hf = hf_models("llama")
    model = tsm.convert(hf.model)  # LlamaModel inside LlamaForCausalLM: the same tensors
    _check(model, hf.model, "llama", batch)
    assert model.embed.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    headless = tsm.convert(hf_models("bert").bert)  # BertForMaskedLM's BertModel: no pooler
    ids, mask = batch
    with torch.no_grad():
        out = headless(ids, attention_mask=mask)
    assert isinstance(out, torch.Tensor) and out.shape == (*ids.shape, 64)


def test_unsupported_class_error_lists_what_converts() -> None:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError) as caught:
        tsm.convert(transformers.BertForSequenceClassification(config))
    message = str(caught.value)
    assert "BertForSequenceClassification" in message
    assert "BertForMaskedLM" in message and "BertModel" in message  # what BERT converts as
    assert "(BertModel)." not in message  # never names an accepted class as the problem
    for model_type in ("gpt2", "llama", "gpt_neox", "gemma2", "phi3", "bert"):
        assert model_type in message
    assert "ts.wrap(model)" in message


def test_a_family_the_methods_know_but_no_conversion_covers() -> None:
    config = transformers.Qwen3Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="no conversion for Qwen3") as caught:
        tsm.convert(transformers.Qwen3ForCausalLM(config))
    assert "Convertible model types" in str(caught.value)
    assert "qwen3" not in tsm.supported_architectures()
    assert "BertModel" in tsm.supported_architectures()
