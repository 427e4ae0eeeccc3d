"""Residual blocks, with the residual stream between sublayers as hook points.

Every block has the same sites whatever its wiring, so one selector path works in every
family: ``resid_pre`` (the stream entering the block), ``ln1``, ``attn``, ``resid_mid``,
``ln2``, ``mlp``, ``resid_post`` (the stream leaving it). The three wirings:

- :class:`PreNormBlock` (GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma 2, Phi-3, GPT-NeoX with
  ``use_parallel_residual=False``)::

      resid_mid  = resid_pre + ln1_post(attn(ln1(resid_pre)))
      resid_post = resid_mid + ln2_post(mlp(ln2(resid_mid)))

  ``ln1_post``/``ln2_post`` exist only in Gemma 2 (``None`` elsewhere).
- :class:`ParallelBlock` (GPT-NeoX/Pythia): attention and MLP both read ``resid_pre``::

      resid_mid  = resid_pre + attn(ln1(resid_pre))
      resid_post = resid_mid + mlp(ln2(resid_pre))

  so ``resid_mid`` is the stream with the attention output added, and editing it changes
  ``resid_post`` but not what the MLP reads.
- :class:`PostNormBlock` (BERT): the norms come after each residual addition::

      resid_mid  = ln1(resid_pre + attn(resid_pre))
      resid_post = ln2(resid_mid + mlp(resid_mid))
"""

from __future__ import annotations

import torch
from torch import nn

from torchsurgeon.layers.transformer.attention import Attention
from torchsurgeon.layers.transformer.context import ForwardContext
from torchsurgeon.layers.transformer.hook import HookPoint

__all__ = ["ParallelBlock", "PostNormBlock", "PreNormBlock"]


class PreNormBlock(nn.Module):
    """Norm, sublayer, (optional post-norm), add — for attention, then for the MLP."""

    def __init__(
        self,
        ln1: nn.Module,
        attn: Attention,
        ln2: nn.Module,
        mlp: nn.Module,
        *,
        ln1_post: nn.Module | None = None,
        ln2_post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.resid_pre = HookPoint()
        self.ln1 = ln1
        self.attn = attn
        self.ln1_post = ln1_post
        self.resid_mid = HookPoint()
        self.ln2 = ln2
        self.mlp = mlp
        self.ln2_post = ln2_post
        self.resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """Apply the block to the residual stream ``x`` ([batch, pos, d_model])."""
        positions = context.positions
        x = self.resid_pre(x, positions)
        attn_out = self.attn(self.ln1(x), context)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        x = self.resid_mid(x + attn_out, positions)
        mlp_out = self.mlp(self.ln2(x))
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        return self.resid_post(x + mlp_out, positions)


class ParallelBlock(nn.Module):
    """Attention and MLP read the same input; both outputs are added to it."""

    def __init__(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.resid_pre = HookPoint()
        self.ln1 = ln1
        self.attn = attn
        self.resid_mid = HookPoint()
        self.ln2 = ln2
        self.mlp = mlp
        self.resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """Apply the block to the residual stream ``x`` ([batch, pos, d_model])."""
        positions = context.positions
        x = self.resid_pre(x, positions)
        attn_out = self.attn(self.ln1(x), context)
        mlp_out = self.mlp(self.ln2(x))
        mid = self.resid_mid(x + attn_out, positions)
        return self.resid_post(mid + mlp_out, positions)


class PostNormBlock(nn.Module):
    """Sublayer, add, norm — for attention, then for the MLP (the original Transformer)."""

    def __init__(self, attn: Attention, ln1: nn.Module, mlp: nn.Module, ln2: nn.Module) -> None:
        super().__init__()
        self.resid_pre = HookPoint()
        self.attn = attn
        self.ln1 = ln1
        self.resid_mid = HookPoint()
        self.mlp = mlp
        self.ln2 = ln2
        self.resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """Apply the block to the residual stream ``x`` ([batch, pos, d_model])."""
        positions = context.positions
        x = self.resid_pre(x, positions)
        x = self.resid_mid(self.ln1(x + self.attn(x, context)), positions)
        return self.resid_post(self.ln2(x + self.mlp(x)), positions)
