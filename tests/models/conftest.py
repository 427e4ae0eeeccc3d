"""Shared fixtures of the model tests: the test zoo's models, checkpoints and batches.

The models themselves are defined in :mod:`model_zoo` (importable from the tests here);
these fixtures build each one once per session, save it, and provide padded batches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_zoo import CAUSAL, FAMILIES, SEQ, VOCAB, make_hf_model
from torch import nn


@pytest.fixture(params=list(FAMILIES), scope="session")
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family's name in turn."""
    return request.param


@pytest.fixture(params=CAUSAL, scope="session")
def causal_family(request: pytest.FixtureRequest) -> str:
    """Each causal (generating) family's name in turn."""
    return request.param


_HF_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(scope="session")
def hf_models() -> Callable[[str], nn.Module]:
    """``get(name)``: the family's test model, built once per session. Do not modify it."""

    def get(name: str) -> nn.Module:
        if name not in _HF_CACHE:
            _HF_CACHE[name] = make_hf_model(name)
        return _HF_CACHE[name]

    return get


@pytest.fixture(scope="session")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, hf_models: Callable[[str], nn.Module]
) -> Callable[[str], Path]:
    """``get(name)``: a directory with the family's test model saved by ``save_pretrained``.

    Llama is saved in small shards, to exercise ``model.safetensors.index.json``.
    """
    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            path = tmp_path_factory.mktemp(f"ckpt_{name}")
            options = {"max_shard_size": "100KB"} if name == "llama" else {}
            hf_models(name).save_pretrained(path, **options)
            saved[name] = path
        return saved[name]

    return get


@pytest.fixture(scope="session")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: 3 sequences of 12, the second left-padded by 3, the third right by 4."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=generator)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, 8:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(scope="session")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: 2 prompts for generation, the second left-padded by 4."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 10), generator=generator)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask
