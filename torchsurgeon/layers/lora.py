"""``LowRankAdapter``: LoRA as an intervention layer that sits after the module it adapts.

LoRA (Hu et al., 2021) freezes a weight ``W`` and learns a low-rank correction: a module
``y = W x`` becomes ``y = W x + scale * B A x`` with ``A`` of shape ``[rank, in]`` and
``B`` of shape ``[out, rank]``. Written as a model rewrite, the frozen module stays exactly
where it is and an adapter is inserted *after* it::

    adapted = ts.select(model).at("model.layers.*.self_attn.q_proj").insert_after(
        ts.layers.LowRankAdapter.init(in_features=64, out_features=64, rank=4)
    )

An inserted layer normally sees one tensor (the module's output). This one declares
``reads_input = True``, so the site also hands it the module's input (see
:mod:`torchsurgeon.surgery.sites`): ``forward(y, input=x)`` returns ``y + scale * x A^T B^T``.
The base module is untouched and shared by every adapted model; the adapter is pure data
(``a``, ``b``, ``scale``), so an adapted model is a plan that travels like any other, and
``torch.func.functional_call`` trains the adapter tensors alone while the base stays frozen
(see :func:`torchsurgeon.methods.train_lora`). It works after anything that maps the last
dimension ``in -> out``: ``nn.Linear``, GPT-2's ``Conv1D``, a whole MLP.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchsurgeon.layers.base import InterventionLayer, Steps, register_layer
from torchsurgeon.surgery.errors import ArgumentError, ArgumentTypeError, SiteError

__all__ = ["LowRankAdapter"]


@register_layer
class LowRankAdapter(InterventionLayer):
    """Add ``scale * input @ a.T @ b.T`` to the output of the module it is inserted after.

    ``a`` is LoRA's ``A`` (``[rank, in_features]``), ``b`` its ``B``
    (``[out_features, rank]``). Insert it with ``insert_after``; inserted before a module it
    has no output to add to and says so.
    """

    type_name = "LowRankAdapter"
    trainable_fields = ("a", "b")
    tensor_fields = ("a", "b", "scale")
    takes_index = False
    reads_input = True

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float | torch.Tensor = 1.0,
        *,
        on: int | str | None = None,
        steps: Steps = None,
    ) -> None:
        super().__init__(on=on, steps=steps)
        for name, value in (("a", a), ("b", b)):
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                shown = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ArgumentTypeError(
                    f"LowRankAdapter: {name} must be a 2-d tensor, got {shown}; a is "
                    "[rank, in_features] and b is [out_features, rank]"
                )
        if a.shape[0] != b.shape[1]:
            raise ArgumentError(
                f"LowRankAdapter: a is {tuple(a.shape)} and b is {tuple(b.shape)}, so their "
                f"ranks disagree ({a.shape[0]} vs {b.shape[1]}); a is [rank, in_features], b is "
                "[out_features, rank]"
            )
        self._set_tensor("a", a)
        self._set_tensor("b", b)
        self._set_tensor("scale", scale)

    @classmethod
    def init(
        cls,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LowRankAdapter:
        """A fresh adapter as LoRA starts one: ``a`` small and random, ``b`` zero.

        With ``b = 0`` the adapted model computes exactly what the base computes until
        training moves ``b``. ``scale = alpha / rank`` (``alpha`` defaults to ``rank``, so
        ``scale = 1``). ``a`` is drawn from a generator seeded with ``seed``, uniform in
        ``±1/sqrt(in_features)``.
        """
        if rank < 1:
            raise ArgumentError(f"LowRankAdapter.init: rank must be >= 1, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(out_features, rank)
        scale = (rank if alpha is None else alpha) / rank
        return cls(a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), scale)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def on_shard(self, shape: tuple[int, ...], split: Any, dtype: Any, device: Any) -> Any:
        """After a column-wise projection: ``B``'s rows of this shard (a row-wise one sums
        the input shards' low-rank products instead; ``Sharded`` does that)."""
        return LowRankAdapter(self.a, self.b.narrow(0, split.offset, split.width), self.scale)

    def forward(self, x: torch.Tensor, input: torch.Tensor | None = None) -> torch.Tensor:
        if input is None:
            raise SiteError(
                f"{self._where()}LowRankAdapter needs the adapted module's input as well as "
                "its output; insert it with insert_after (it was called with one tensor only)"
            )
        if input.shape[-1] != self.a.shape[1] or x.shape[-1] != self.b.shape[0]:
            raise SiteError(
                f"{self._where()}the adapter maps {self.a.shape[1]} -> {self.b.shape[0]} "
                f"features, but the module maps {input.shape[-1]} -> {x.shape[-1]} (input "
                f"{tuple(input.shape)}, output {tuple(x.shape)})"
            )
        low = input.to(self.a.dtype) @ self.a.T
        return x + (low @ self.b.T * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        shape: dict[str, Any] = {"in": self.a.shape[1], "out": self.b.shape[0], "rank": self.rank}
        if not self.scale.is_meta:
            shape["scale"] = f"{float(self.scale):g}"
        return ", ".join(f"{k}={v}" for k, v in shape.items())
