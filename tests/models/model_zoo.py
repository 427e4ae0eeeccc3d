"""The test zoo: one small random ``transformers`` model per supported family.

Every family is built from a config with random, seeded fp32 weights (3 layers, d_model 64,
vocab 211) chosen to exercise what makes the family different: grouped- and multi-query
attention, sliding windows shorter than the test sequences, rotary scalings (llama3,
linear, longrope past its original context), partial rotary, parallel residuals, Gemma's
wide heads, Gemma 2's soft-capping. Norm weights are perturbed so that ``1 + w`` offsets and
biases matter. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

VOCAB = 211
SEQ = 12
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class FamilySpec:
    """How to build the small test model of one family."""

    name: str
    model_class: Callable[..., nn.Module]
    config: Callable[[], transformers.PretrainedConfig]
    causal: bool = True


def _llama() -> transformers.PretrainedConfig:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return transformers.LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope)


def _mistral() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4)


def _qwen2() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        **COMMON,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )


def _gpt_neox() -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=True)


def _gemma() -> transformers.PretrainedConfig:
    # Stronger blocks than the default init, or the scaled tied embedding makes the random
    # model repeat its input token (a weak generation test).
    options = {**COMMON, "initializer_range": 0.3}
    return transformers.GemmaConfig(**options, num_key_value_heads=1, head_dim=32)


def _gemma2() -> transformers.PretrainedConfig:
    options = {**COMMON, "initializer_range": 0.02}  # larger weights saturate the soft-caps
    return transformers.Gemma2Config(
        **options,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
    )


def _phi3() -> transformers.PretrainedConfig:
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.1, 1.2, 1.3],
        "long_factor": [2.0, 3.0, 4.0, 5.0],
        "original_max_position_embeddings": 8,
    }
    return transformers.Phi3Config(
        **COMMON,
        num_key_value_heads=2,
        sliding_window=6,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_parameters=rope,
    )


def _gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )


def _bert() -> transformers.PretrainedConfig:
    return transformers.BertConfig(**COMMON, max_position_embeddings=64)


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("gpt2", transformers.GPT2LMHeadModel, _gpt2),
        FamilySpec("llama", transformers.LlamaForCausalLM, _llama),
        FamilySpec("mistral", transformers.MistralForCausalLM, _mistral),
        FamilySpec("qwen2", transformers.Qwen2ForCausalLM, _qwen2),
        FamilySpec("gpt_neox", transformers.GPTNeoXForCausalLM, _gpt_neox),
        FamilySpec("gemma", transformers.GemmaForCausalLM, _gemma),
        FamilySpec("gemma2", transformers.Gemma2ForCausalLM, _gemma2),
        FamilySpec("phi3", transformers.Phi3ForCausalLM, _phi3),
        FamilySpec("bert", transformers.BertForMaskedLM, _bert, causal=False),
    )
}
CAUSAL = [name for name, spec in FAMILIES.items() if spec.causal]
BASE_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "gpt2": transformers.GPT2Model,
    "llama": transformers.LlamaModel,
    "mistral": transformers.MistralModel,
    "qwen2": transformers.Qwen2Model,
    "gpt_neox": transformers.GPTNeoXModel,
    "gemma": transformers.GemmaModel,
    "gemma2": transformers.Gemma2Model,
    "phi3": transformers.Phi3Model,
    "bert": transformers.BertModel,  # with its pooler, as sentence-embedding checkpoints have
}
"""Each family's base model (no language-model head), written out independently."""


def make_hf_model(
    name: str, attn_implementation: str = "eager", *, base: bool = False
) -> nn.Module:
    """The seeded random test model of family ``name`` (the same weights on every call).

    ``base=True``: the family's base model (``BASE_CLASSES``) instead of its LM class.
    """
    spec = FAMILIES[name]
    config = spec.config()
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = (BASE_CLASSES[name] if base else spec.model_class)(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name.lower() or ".ln" in param_name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def padding_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding, as ``transformers``' ``generate`` computes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def hf_logits(hf_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``transformers`` model's logits for a padded batch (positions skip padding)."""
    with torch.no_grad():
        return hf_model(ids, attention_mask=mask, position_ids=padding_position_ids(mask)).logits


def max_diff_on_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest absolute difference of two ``[batch, pos, vocab]`` tensors on real tokens."""
    return (a - b).abs()[mask.bool()].max().item()
