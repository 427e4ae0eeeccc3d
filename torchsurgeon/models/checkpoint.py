"""Reading a local Hugging Face checkpoint directory: its config and its safetensors files.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. Tensors are memory-mapped through
``safetensors.safe_open``: taking one maps its bytes from the file without reading them,
so pages are read on first use and no second copy is ever made (peak memory while loading
stays near the checkpoint's size). Nothing here touches the network.
"""

from __future__ import annotations

import difflib
import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from torchsurgeon.models.errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """An opened checkpoint: its config dict and memory-mapped tensors by key."""

    path: Path
    config: dict[str, Any]
    files: dict[str, Path]
    """The safetensors file holding each tensor key."""
    nbytes: int
    """Total size of the safetensors files."""
    _handles: dict[Path, Any] = field(default_factory=dict, init=False, repr=False)
    _stack: ExitStack = field(default_factory=ExitStack, init=False, repr=False)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key``, memory-mapped from its file."""
        file = self.files[key]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            self._handles[file] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        """Close the file handles (tensors already taken stay valid)."""
        self._stack.close()
        self._handles.clear()


def _near(root: Path) -> str:
    """``"; did you mean '...'?"`` naming the sibling directory most like ``root``, or ``""``."""
    try:
        siblings = [p.name for p in root.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    found = difflib.get_close_matches(root.name, siblings, n=1, cutoff=0.6)
    return f"; did you mean {str(root.parent / found[0])!r}?" if found else ""


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open the checkpoint directory ``path``, with clear errors for what is missing."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist{_near(root)}")
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r} is not a directory; pass the checkpoint directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(root)!r} has no config.json; is it a Hugging Face checkpoint?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    files = _tensor_files(root)
    return Checkpoint(
        path=root,
        config=config,
        files=files,
        nbytes=sum(f.stat().st_size for f in set(files.values())),
    )


def _tensor_files(root: Path) -> dict[str, Path]:
    index_file = root / _INDEX
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_file} has no readable weight_map: {error}") from error
        files = {key: root / name for key, name in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index_file} lists shards that are missing: {missing}")
        return files
    single = root / _SINGLE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" It has {others}: torchsurgeon reads safetensors only (no pickle). Load it with "
        "transformers and use torchsurgeon.models.convert(model), or re-save it with "
        "model.save_pretrained(path)."
        if others
        else ""
    )
    raise CheckpointError(f"{str(root)!r} has neither {_SINGLE} nor {_INDEX}.{hint}")
