"""Shared fixtures: tiny seeded transformers models (plain, fp32, eval) and a token batch.

The builders and the hook-reference helpers live in :mod:`hook_reference`; the fixtures
here build each model once per session. Tests never change these models: they wrap them
(``ts.wrap`` shares every tensor and copies no structure back) and hook them only inside
``hook_reference.hooks``, which removes its hooks on exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from hook_reference import VOCAB, make_bert, make_gpt2, make_llama, make_seed_llama
from torch import nn
from transformers import BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gpt2_hf() -> GPT2LMHeadModel:
    return make_gpt2()


@pytest.fixture(scope="session")
def llama_hf() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture(scope="session")
def bert_hf() -> BertForMaskedLM:
    return make_bert()


@pytest.fixture(scope="session")
def seed_llama_hf() -> LlamaForCausalLM:
    return make_seed_llama()


@pytest.fixture(scope="session")
def tiny_model(
    gpt2_hf: GPT2LMHeadModel, llama_hf: LlamaForCausalLM, bert_hf: BertForMaskedLM
) -> Callable[[str], nn.Module]:
    """``tiny_model("gpt2" | "llama" | "bert")``: the session's plain model of that family."""
    models = {"gpt2": gpt2_hf, "llama": llama_hf, "bert": bert_hf}
    return models.__getitem__


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    """A (4, 7) batch of token ids (no padding), the same in every test."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(2, VOCAB, (4, 7), generator=generator)
