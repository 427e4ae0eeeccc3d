"""Named tensors of a checkpoint, handed out checked, cast and (where possible) uncopied.

Conversions take every weight through a :class:`TensorSource`, which

- resolves a name under the prefixes a family's checkpoints use (``model.``,
  ``transformer.``, or none for a base model), so one family mapping reads an
  ``...ForCausalLM`` checkpoint and a bare base model alike;
- checks the tensor's shape and names the key and the checkpoint in the error;
- casts to the requested dtype and device (the only copies a load makes; without them
  every tensor is the memory-mapped or shared original), once per key even when a fused
  tensor is cut into several views;
- counts what it handed out, for a progress bar and for "was everything used?" checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from torchsurgeon.models.errors import CheckpointError

__all__ = ["TensorSource"]


class TensorSource:
    """Tensors by name, fetched on demand with ``fetch(key)``."""

    def __init__(
        self,
        keys: Iterable[str],
        fetch: Callable[[str], torch.Tensor],
        *,
        where: str,
        prefixes: Sequence[str] = ("",),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        on_take: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.keys = frozenset(keys)
        self._fetch = fetch
        self.where = where
        self.prefixes = tuple(prefixes)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._on_take = on_take
        self._taken: dict[str, torch.Tensor] = {}

    def key(self, name: str) -> str | None:
        """The checkpoint key holding ``name`` under one of the prefixes, if any."""
        return next((p + name for p in self.prefixes if p + name in self.keys), None)

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds ``name``."""
        return self.key(name) is not None

    def take(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """The tensor ``name``, checked to have ``shape``, in the requested dtype and device."""
        key = self.key(name)
        if key is None:
            tried = ", ".join(repr(p + name) for p in self.prefixes)
            raise CheckpointError(f"{self.where}: no tensor {tried} in the checkpoint")
        found = self._taken.get(key)
        if found is None:
            found = self._fetch(key)
            if tuple(found.shape) != tuple(shape):
                raise CheckpointError(
                    f"{self.where}: tensor {key!r} has shape {list(found.shape)}, expected "
                    f"{list(shape)} from the config"
                )
            if self._on_take is not None:
                self._on_take(found)  # as stored, before any cast
            found = self._cast(found)
            self._taken[key] = found
        return found

    def maybe(self, name: str, shape: Sequence[int]) -> torch.Tensor | None:
        """Like :meth:`take`, but ``None`` when the checkpoint has no ``name``."""
        return self.take(name, shape) if self.has(name) else None

    def taken_keys(self) -> frozenset[str]:
        """The keys handed out so far."""
        return frozenset(self._taken)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else None
        if dtype is None and self.device is None:
            return tensor
        return tensor.to(device=self.device, dtype=dtype)
