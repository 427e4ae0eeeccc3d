"""Clear errors for what cannot be converted or loaded, and for bad input.

Each message must name the problem (the architecture, the file, the tensor key, the
argument) and, where there is one, the way out (``ts.wrap``, safetensors, the shape the
config expects).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import torchsurgeon.models as tsm
from torchsurgeon.models import CheckpointError, UnsupportedArchitectureError


def test_convert_unsupported_architecture_points_to_wrap() -> None:
    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32
    )
    with pytest.raises(UnsupportedArchitectureError) as caught:
        tsm.convert(transformers.OPTForCausalLM(config))
    message = str(caught.value)
    assert "'opt'" in message and "ts.wrap(model)" in message
    for model_type in ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gemma2", "phi3", "bert"):
        assert model_type in message


def test_convert_rejects_non_models() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="model_type None"):
        tsm.convert(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="transformers model"):
        tsm.convert("gpt2")  # type: ignore[arg-type]


def test_convert_rejects_other_heads_of_a_supported_family() -> None:
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        tsm.convert(transformers.LlamaForSequenceClassification(config))


def test_unsupported_rope_scaling() -> None:
    config = transformers.Qwen2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                         "original_max_position_embeddings": 32},
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'yarn'"):
        tsm.convert(transformers.Qwen2ForCausalLM(config))


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        tsm.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        tsm.load(tmp_path)


def _copy(checkpoints: Callable[[str], Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(checkpoints(name), target)
    return target


def test_load_pickle_only_checkpoint(checkpoints: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(checkpoints, "gpt2", tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        tsm.load(path)


def test_load_missing_shard(checkpoints: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(checkpoints, "llama", tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        tsm.load(path)


def test_load_unsupported_model_type(checkpoints: Callable[[str], Path], tmp_path: Path) -> None:
    path = _copy(checkpoints, "gpt2", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"ts\.wrap"):
        tsm.load(path)


def test_load_shape_mismatch_names_the_tensor(
    checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    path = _copy(checkpoints, "mistral", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\]"
    ):
        tsm.load(path)


def test_bad_forward_inputs(hf_models: Callable[[str], nn.Module]) -> None:
    model = tsm.convert(hf_models("llama"))
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, pos\]"):
        model(ids[0])
    with pytest.raises(IndexError, match="token ids must lie in"):
        model(ids * 1000)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(3)[None])
    with pytest.raises(IndexError, match="learned positions"):
        tsm.convert(hf_models("gpt2"))(torch.ones(1, 65, dtype=torch.long))
