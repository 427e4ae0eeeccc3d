"""``load`` reads a checkpoint directory without copying it, and uses all of it.

The loaded model's tensors must stay memory-mapped: every parameter's data lies inside a
mapping of a checkpoint file (checked in ``/proc/self/maps``). Every tensor of the file is
used exactly once (nothing silently ignored), ``dtype`` casts (and a bfloat16 load matches
``from_pretrained(..., dtype=torch.bfloat16)``), and large loads can show a progress bar.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_zoo import FAMILIES, hf_logits, max_diff_on_tokens
from safetensors import safe_open

import torchsurgeon.models as tsm


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    files = {str(p.resolve()) for p in path.glob("*.safetensors")}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_load_keeps_tensors_memory_mapped(name: str, checkpoints: Callable[[str], Path]) -> None:
    path = checkpoints(name)  # llama: sharded; gpt2: one file
    model = tsm.load(path)
    ranges = _mapped_ranges(path)
    assert ranges
    for param_name, param in model.named_parameters():
        ptr = param.data_ptr()
        assert any(start <= ptr < end for start, end in ranges), param_name


def test_load_with_dtype_casts(
    checkpoints: Callable[[str], Path], batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    ids, mask = batch
    full = tsm.load(checkpoints("llama"))
    half = tsm.load(checkpoints("llama"), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        expected = full(ids, attention_mask=mask)
        got = half(ids, attention_mask=mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected)[mask.bool()].abs().mean() < 0.05


def test_load_uses_every_tensor_once(family: str, checkpoints: Callable[[str], Path]) -> None:
    path = checkpoints(family)
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    model = tsm.load(path)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(keys)  # one mapped storage per checkpoint tensor


def test_load_progress_bar(
    checkpoints: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    tsm.load(checkpoints("gpt2"), progress=True)
    assert "loading" in capsys.readouterr().err
    tsm.load(checkpoints("gpt2"))  # small: no bar by default
    assert capsys.readouterr().err == ""


def test_bfloat16_load_matches_transformers(
    family: str, checkpoints: Callable[[str], Path], batch: tuple[torch.Tensor, ...]
) -> None:
    # Same checkpoint, both loaded in bfloat16: the explicit layers round where transformers
    # does. GPT-NeoX's parallel residual adds its three terms in another order, which shows
    # at bfloat16 resolution (a few units in the last place).

    ids, mask = batch
    path = checkpoints(family)
    hf = (
        FAMILIES[family]
        .model_class.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
        .eval()
    )
    with torch.no_grad():
        got = tsm.load(path, dtype=torch.bfloat16)(ids, attention_mask=mask)
    diff = max_diff_on_tokens(got.float(), hf_logits(hf, ids, mask).float(), mask)
    assert diff <= (0.1 if family == "gpt_neox" else 1e-4)
