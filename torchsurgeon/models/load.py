"""Load a local Hugging Face checkpoint directly into explicit layers.

``load(path)`` reads ``config.json``, memory-maps the safetensors file(s) and builds the
explicit model around the mapped tensors, so the model's weights *are* the file's pages:
nothing is read until used and nothing is copied (unless ``dtype`` or ``device`` asks for a
cast or a move, which copies one tensor at a time). No ``transformers`` model is built, and
nothing is downloaded: ``path`` must be a local directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from torchsurgeon.layers.transformer import Transformer
from torchsurgeon.models.build import build_transformer
from torchsurgeon.models.checkpoint import open_checkpoint
from torchsurgeon.models.errors import UnsupportedArchitectureError
from torchsurgeon.models.families import family_for
from torchsurgeon.models.source import TensorSource

__all__ = ["PROGRESS_BYTES", "load"]

PROGRESS_BYTES = 1 << 30
"""Checkpoints at least this large show a progress bar unless ``progress=False``."""


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> Transformer:
    """The explicit model stored in the checkpoint directory ``path``.

    ``dtype`` casts floating-point weights (default: as stored); ``device`` places them
    (default: CPU, memory-mapped). ``progress`` shows a progress bar (default: for
    checkpoints of 1 GiB or more). Raises
    :class:`~torchsurgeon.models.errors.CheckpointError` for a missing directory, config or
    tensor file, or a tensor whose shape does not match the config, and
    :class:`~torchsurgeon.models.errors.UnsupportedArchitectureError` for a model type with
    no conversion.
    """
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
            return model
    finally:
        checkpoint.close()


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
