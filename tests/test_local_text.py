"""A researcher's first hour, locally: text into ``ts.run``, Hub names into ``ts.load``.

``ts.run(model, "text")`` tokenizes as a host does (left padding by default, the attention
mask and its position ids), so its logits equal the model run by hand on the tokenizer's own
padded batch. ``ts.load("org/name")`` reads the local Hugging Face cache only, and
``dtype=`` takes a dtype's name. Every model and tokenizer here is built locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from plan_cases import TEXTS, make_gpt2, make_llama, save_tokenizer

import torchsurgeon as ts
from torchsurgeon.models.errors import CheckpointError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    for name, make in (("gpt2", make_gpt2), ("llama", make_llama)):
        make().save_pretrained(root / name)
        save_tokenizer(root / name)
    make_gpt2().save_pretrained(root / "bare")  # no tokenizer
    return {"gpt2": root / "gpt2", "llama": root / "llama", "bare": root / "bare"}


def by_hand(model: Any, directory: Path, texts: list[str], side: str = "left") -> torch.Tensor:
    """The host's rule, spelled out: the tokenizer pads, positions follow the mask."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids = encoded["input_ids"]
    return logits(model(input_ids=ids, attention_mask=mask, position_ids=positions))


def logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loaded_model_runs_text_like_a_host(checkpoints: dict[str, Path], family: str) -> None:
    model = ts.load(checkpoints[family])
    with torch.no_grad():
        expected = by_hand(model, checkpoints[family], TEXTS)
        got = logits(ts.run(model, TEXTS).output)
        right = logits(ts.run(model, TEXTS, padding_side="right").output)
        one = logits(ts.run(model, "hello world").output)
    assert torch.equal(got, expected)
    with torch.no_grad():
        assert torch.equal(right, by_hand(model, checkpoints[family], TEXTS, "right"))
    # left padding: every row's last position is its last token, as if it ran alone
    torch.testing.assert_close(got[1, -1], one[0, -1], rtol=1e-4, atol=1e-4)


def test_wrapped_model_keeps_its_tokenizer_through_rewrites(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints["gpt2"]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = ts.wrap(hf, tokenizer=tokenizer)
    assert "_ts_tokenizer" not in hf.__dict__  # the user's module is untouched
    probe = ts.select(model).at("transformer.h.1").insert_after(ts.layers.Save("h1"))
    with torch.no_grad():
        result = ts.run(probe, TEXTS)
        expected = by_hand(model, path, TEXTS)
    assert torch.equal(logits(result.output), expected)
    assert result.saved["h1"].shape[:2] == expected.shape[:2]
    # a frozen tree given a tokenizer gets a new root; the tree it came from stays as it was
    plain = ts.wrap(hf)
    assert ts.wrap(plain, tokenizer=tokenizer) is not plain
    with pytest.raises(TypeError, match=r"ts\.wrap\(model, tokenizer=\.\.\.\)"):
        ts.run(plain, "hello")


def test_model_without_tokenizer_refuses_text(checkpoints: dict[str, Path]) -> None:
    model = ts.load(checkpoints["bare"])
    with pytest.raises(TypeError, match=r"no tokenizer.*ts\.wrap\(model, tokenizer=\.\.\.\)"):
        ts.run(model, ["hello", "world"])
    with pytest.raises(ValueError, match="padding_side"):
        ts.run(ts.load(checkpoints["gpt2"]), "hello", padding_side="middle")


def test_dtype_by_name(checkpoints: dict[str, Path]) -> None:
    model = ts.load(checkpoints["gpt2"], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(ts.load(checkpoints["gpt2"], dtype="auto").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"'bfloat16'.*'float32'"):
        ts.load(checkpoints["gpt2"], dtype="bf16")


def test_hub_name_loads_from_the_local_cache_only(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    make_gpt2().save_pretrained(snapshot)
    save_tokenizer(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local directory called org/tiny

    model = ts.load("org/tiny")
    with torch.no_grad():
        assert torch.equal(logits(ts.run(model, TEXTS).output), by_hand(model, snapshot, TEXTS))
    missing = r"hf download org/missing.*ts\.load\('org/missing'\)"
    with pytest.raises(CheckpointError, match=missing):
        ts.load("org/missing")
