"""Where a model's parts sit: the layout every research method reads.

The methods in :mod:`torchsurgeon.methods` are written once, against *roles* — the list of
blocks, the token embedding, the final norm, the unembedding, and inside each block the
attention module, its output projection, the MLP and its down-projection — and a
:class:`ModelLayout` says at which paths those roles sit in a given model. Each family of
the table in :mod:`torchsurgeon.models.families` carries the layout of its ``transformers``
language-model class; :meth:`ModelLayout.without_head` derives the layout of its base model
(``GPT2Model``, ``LlamaModel``, ``BertModel``: the same parts under no prefix, and no
unembedding), and :data:`EXPLICIT` is the layout of every converted or loaded model
(:class:`~torchsurgeon.layers.transformer.Transformer`), the same in every family.

Per-head work uses the *input* of the attention output projection (``attn.c_proj`` in
GPT-2, ``self_attn.o_proj`` in Llama, ``attn.out`` in a converted model): a
``[batch, pos, n_heads * d_head]`` tensor in which head ``h`` is the last-dimension slice
``h * d_head : (h + 1) * d_head``. An MLP neuron is the input of the down-projection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchsurgeon.surgery.errors import ArgumentError

__all__ = ["EXPLICIT", "ModelLayout"]


@dataclass(frozen=True)
class ModelLayout:
    """The paths of a transformer's parts (block-relative where noted) and its head count.

    ``blocks`` is the ``ModuleList`` of transformer blocks; ``attn``, ``attn_out``, ``mlp``
    and ``mlp_down`` are paths *inside a block*. ``n_heads`` may be left ``None`` when the
    model's config has ``num_attention_heads`` (or ``n_heads``). ``final_norm`` and
    ``unembed`` are ``None`` in a base model without a language-model head; ``head`` is a
    transform applied before ``final_norm`` when decoding the residual stream (BERT's MLM
    dense layer in a converted model). ``pos_embed`` is the learned position embedding,
    where the model has one; ``block_norms`` are the norms inside a block, in the order of
    :data:`EXPLICIT`'s (``ln1``, ``ln2``, ``ln1_post``, ``ln2_post``), so that the two
    layouts pair them up (:mod:`~torchsurgeon.models.families.paths`).
    """

    family: str
    blocks: str
    embed: str
    final_norm: str | None
    unembed: str | None
    attn: str
    attn_out: str
    mlp: str
    mlp_down: str
    n_heads: int | None = None
    head: str | None = None
    pos_embed: str | None = None
    block_norms: tuple[str, ...] = ()

    def block(self, layer: int) -> str:
        """The path of block ``layer``."""
        return f"{self.blocks}.{layer}"

    def in_block(self, layer: int, role: str) -> str:
        """The path of the block-relative part ``role`` (a field name) of block ``layer``."""
        return f"{self.blocks}.{layer}.{getattr(self, role)}"

    def without_head(self, prefix: str) -> ModelLayout:
        """The layout of the base model found at ``prefix`` (e.g. ``"transformer."``).

        Paths under ``prefix`` lose it; the parts outside it (the unembedding, BERT's MLM
        transform) belong to the head and become ``None``.
        """

        def inside(path: str | None) -> str | None:
            if path is None or not path.startswith(prefix):
                return None
            return path[len(prefix) :]

        fields = {}
        for name in ("blocks", "embed"):
            path = inside(getattr(self, name))
            if path is None:
                raise ArgumentError(
                    f"without_head(prefix={prefix!r}): {self.family}'s {name} "
                    f"{getattr(self, name)!r} is not under it"
                )
            fields[name] = path
        return dataclasses.replace(
            self,
            **fields,
            final_norm=inside(self.final_norm),
            unembed=inside(self.unembed),
            head=inside(self.head),
            pos_embed=inside(self.pos_embed),
        )


EXPLICIT = ModelLayout(
    family="torchsurgeon",
    blocks="blocks",
    embed="embed",
    final_norm="final_norm",
    unembed="unembed",
    attn="attn",
    attn_out="attn.out",
    mlp="mlp",
    mlp_down="mlp.out",
    head="head",
    pos_embed="pos_embed",
    block_norms=("ln1", "ln2", "ln1_post", "ln2_post"),
)
"""The layout of a converted or loaded model (parts a given model lacks are dropped)."""
