"""Where the parts of each tested family sit: the paths an experiment names.

Both versions of an experiment address modules by these paths (nnsight with
``lm.get(path)``, torchsurgeon with ``ts.select(model).at(path)``), so one function body
serves GPT-2 and Llama alike.
"""

from __future__ import annotations

from dataclasses import dataclass

HIDDEN = 64
"""Model width of the tiny models (``tests/hook_reference.py``)."""
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
LAYERS = 3
VOCAB = 128


@dataclass(frozen=True)
class Family:
    """A model family's module paths: its blocks, attention, MLP and final norm."""

    name: str
    blocks: str
    """The ``ModuleList`` of decoder blocks."""
    attn_name: str
    """The attention module's name inside a block."""
    out_proj: str
    """The attention's output projection (its input holds the heads side by side)."""
    norm: str
    """The final norm before ``lm_head``."""
    mlp_class: str

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def attn(self, i: int) -> str:
        return f"{self.blocks}.{i}.{self.attn_name}"

    def mlp(self, i: int) -> str:
        return f"{self.blocks}.{i}.mlp"


GPT2 = Family("gpt2", "transformer.h", "attn", "c_proj", "transformer.ln_f", "GPT2MLP")
LLAMA = Family("llama", "model.layers", "self_attn", "o_proj", "model.norm", "LlamaMLP")
FAMILIES = {f.name: f for f in (GPT2, LLAMA)}
