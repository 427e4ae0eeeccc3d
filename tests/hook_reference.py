"""Tiny seeded transformers models, and the plain-PyTorch hook references tests compare to.

Every model is built from a ``transformers`` config with random weights (nothing is ever
downloaded), seeded, in fp32 and eval mode, and returned *plain*: tests wrap it with
``ts.wrap`` themselves, so the plain model stays available as the unmodified reference that
ordinary ``register_forward_hook`` / ``register_forward_pre_hook`` hooks run on.

The helpers at the bottom (``hooks``, ``replace_input``, ``replace_output``) are the
reference side of the correctness tests: nothing here imports torchsurgeon. (A module of
its own, not ``conftest``, so that tests can import it: ``tests/models`` has a conftest
too, and two modules named ``conftest`` cannot both be imported by that name.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128
HIDDEN = 64

SEED_NEURONS: dict[int, list[int]] = {12: [7171, 2519, 1786], 13: [9469, 7737]}


def make_gpt2(attn: str = "sdpa", *, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=3,
        n_embd=HIDDEN,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval()


def make_llama(attn: str = "sdpa", *, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def make_bert(attn: str = "sdpa", *, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=3,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return BertForMaskedLM(config).eval()


def make_seed_llama(*, seed: int = 0) -> LlamaForCausalLM:
    """A Llama where the seed experiment's neurons exist: 14 layers, 9472-wide MLPs.

    The hidden size is small (32) so the whole model is ~13M parameters and fast on CPU.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=14,
        hidden_size=32,
        intermediate_size=9472,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------- reference hooks


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


@contextmanager
def hooks(
    model: nn.Module,
    *,
    pre: Mapping[str, Callable[..., Any]] | None = None,
    post: Mapping[str, Callable[..., Any]] | None = None,
    with_kwargs: bool = False,
) -> Iterator[None]:
    """Register plain forward pre-hooks / hooks on ``model`` by path; remove them on exit."""
    handles = []
    try:
        for path, fn in (pre or {}).items():
            module = get_module(model, path)
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        for path, fn in (post or {}).items():
            module = get_module(model, path)
            handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


def replace_input(fn: Callable[[torch.Tensor], torch.Tensor], position: int = 0) -> Callable:
    """A pre-hook that replaces positional argument ``position`` by ``fn(argument)``."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*args[:position], fn(args[position]), *args[position + 1 :])

    return hook


def replace_output(fn: Callable[[torch.Tensor], torch.Tensor], element: int = 0) -> Callable:
    """A hook that replaces the output (a tensor, or element ``element`` of a tuple)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return fn(output)
        items = list(output)
        items[element] = fn(items[element])
        return tuple(items)

    return hook


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` view the same bytes (a tree's own Parameter over the model's storage)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double() - b.detach().double()).abs().max().item()


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
