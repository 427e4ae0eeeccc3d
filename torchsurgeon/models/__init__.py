"""Hugging Face checkpoints as explicit-dataflow models, proven equal to ``transformers``.

- :func:`load` builds an explicit model from a local checkpoint directory (memory-mapped
  safetensors; no download, no copy).
- :func:`convert` builds one around an in-memory ``transformers`` model's own tensors.
- :func:`generate` generates with either — or with a ``transformers`` causal LM, plain or
  wrapped — greedy or sampled, through a KV cache.

Supported families: GPT-2, Llama, Mistral, Qwen2, GPT-NeoX (Pythia), Gemma, Gemma 2, Phi-3
and BERT (encoder with its masked-language-model head), each as its language model or its
base model (``LlamaModel``, ``BertModel``: no head; they return hidden states). The family
table (:data:`FAMILIES`) is the one the research methods read too. Every converted model
has the same site names (``blocks.{i}.attn.pattern``, ``blocks.{i}.resid_mid``, ...; see
``docs/models.md``), so one selector path works in every family. Other architectures raise
:class:`UnsupportedArchitectureError`; ``ts.wrap(model)`` works on any ``nn.Module``.
"""

from torchsurgeon.layers.transformer import EncoderOutput, KVCache, Transformer, TransformerConfig
from torchsurgeon.models.convert import convert
from torchsurgeon.models.errors import CheckpointError, UnsupportedArchitectureError
from torchsurgeon.models.families import FAMILIES, supported_architectures
from torchsurgeon.models.generate import generate
from torchsurgeon.models.load import load

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "EncoderOutput",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "UnsupportedArchitectureError",
    "convert",
    "generate",
    "load",
    "supported_architectures",
]
