"""Load a local Hugging Face checkpoint directly into explicit layers.

``load(path)`` reads ``config.json``, memory-maps the safetensors file(s) and builds the
explicit model around the mapped tensors, so the model's weights *are* the file's pages:
nothing is read until used and nothing is copied (unless ``dtype`` or ``device`` asks for a
cast or a move, which copies one tensor at a time). No ``transformers`` model is built, and
nothing is downloaded: ``path`` is a local directory, or a Hub name (``"org/name"``) already
in the local Hugging Face cache. The checkpoint's tokenizer, when it has one, comes along
(``ts.run(model, "text")``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from tqdm import tqdm

from torchsurgeon.layers.transformer import Transformer
from torchsurgeon.models.build import build_transformer
from torchsurgeon.models.checkpoint import open_checkpoint
from torchsurgeon.models.errors import CheckpointError, UnsupportedArchitectureError
from torchsurgeon.models.families import family_for
from torchsurgeon.models.source import TensorSource
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, closest
from torchsurgeon.surgery.tokenized import load_tokenizer, with_tokenizer

__all__ = ["PROGRESS_BYTES", "load"]

PROGRESS_BYTES = 1 << 30
"""Checkpoints at least this large show a progress bar unless ``progress=False``."""

DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "half", "float", "double")
}
"""The dtype names ``load(..., dtype=)`` takes as strings (and ``"auto"``: as stored)."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> Transformer:
    """The explicit model stored in the checkpoint directory ``path`` (or cached Hub name).

    ``dtype`` casts floating-point weights (a dtype or its name, ``"bfloat16"``; default
    and ``"auto"``: as stored); ``device`` places them
    (default: CPU, memory-mapped). ``progress`` shows a progress bar (default: for
    checkpoints of 1 GiB or more). Raises
    :class:`~torchsurgeon.models.errors.CheckpointError` for a missing directory, config or
    tensor file, or a tensor whose shape does not match the config, and
    :class:`~torchsurgeon.models.errors.UnsupportedArchitectureError` for a model type with
    no conversion.
    """
    dtype = _dtype(dtype)
    path = _local(path)
    checkpoint = open_checkpoint(path)
    try:
        model_type = checkpoint.config.get("model_type")
        architectures = checkpoint.config.get("architectures") or [None]
        family = family_for(model_type, architectures[0])
        assert family.config is not None and family.weights is not None  # family_for checked
        # A checkpoint saved from a base model (a sentence-embedding BertModel) says so in
        # its architectures; without any, it is read as the family's language model.
        with_head = architectures[0] is None or architectures[0] in family.classes
        hf_config = _hf_config(model_type, checkpoint.config)
        config = family.config(hf_config)
        show = progress if progress is not None else checkpoint.nbytes >= PROGRESS_BYTES
        with tqdm(
            total=checkpoint.nbytes,
            unit="B",
            unit_scale=True,
            desc=f"loading {Path(path).name}",
            disable=not show,
        ) as bar:
            source = TensorSource(
                checkpoint.files,
                checkpoint.tensor,
                where=str(checkpoint.path),
                prefixes=family.prefixes,
                dtype=dtype,
                device=device,
                on_take=lambda tensor: bar.update(tensor.numel() * tensor.element_size()),
            )
            model = build_transformer(config, family.weights(config, source, with_head))
            bar.update(bar.total - bar.n)  # tensors a tied model never takes, file headers
    finally:
        checkpoint.close()
    tokenizer = load_tokenizer(checkpoint.path)
    return model if tokenizer is None else with_tokenizer(model, tokenizer)  # type: ignore[return-value]


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise ArgumentTypeError(
            f"ts.load(dtype=): a torch.dtype or its name ('bfloat16'), got "
            f"{type(dtype).__name__} {dtype!r}"
        )
    name = dtype.removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPES:
        prefixed = [n for n in DTYPES if n.startswith(name.lower())]
        near = prefixed or closest(name.lower(), [*DTYPES, "auto"], n=1)
        raise ArgumentError(
            f"ts.load(dtype={dtype!r}) is not a floating-point dtype name; did you mean "
            f"{near[0]!r}? Use one of {', '.join(repr(n) for n in DTYPES)}, 'auto' (as stored), "
            "or a torch.dtype"
        )
    return DTYPES[name]


def _local(path: str | Path) -> Path:
    """``path`` itself, or the local Hugging Face cache's snapshot of the Hub name ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"ts.load(path=): a checkpoint directory or a cached Hub name ('org/name'), as a "
            f"str or Path, got {type(path).__name__}"
        )
    local = Path(path).expanduser()
    name = str(path)
    if local.exists() or isinstance(path, Path) or not _HUB_NAME.match(name):
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE")  # read now, not when huggingface_hub was imported
    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{name!r} is neither a local directory nor in the local Hugging Face cache, and "
            f"ts.load never downloads. Get it with `hf download {name}` (or "
            f"`huggingface-cli download {name}`), then ts.load({name!r}) again; or pass the "
            "path of a checkpoint directory."
        ) from None


def _hf_config(model_type: str, config: dict[str, object]) -> object:
    # The transformers config class fills in the family's defaults and normalises old
    # spellings (rope_scaling -> rope_parameters); built from the dict, never fetched.
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise UnsupportedArchitectureError(
            f"transformers does not know model_type {model_type!r}: {error}"
        ) from error
