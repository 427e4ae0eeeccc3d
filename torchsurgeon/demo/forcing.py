"""The demo's experiment on any causal LM: find neurons that push an answer, force them.

1. **Check before paying.** :func:`inspect_checkpoint` builds the model from its config on
   the ``meta`` device (no weights read) to learn its layer count and MLP widths, so a bad
   ``--neurons`` is refused in a second, naming the valid range, before a large checkpoint
   is loaded.
2. **Attribution.** :func:`attribute` inserts a ``Save`` before every MLP's down projection
   (its input *is* the MLP's neurons) and an ``Add`` of a zero vector that requires grad
   after the token embedding (so gradients flow even where the weights do not require
   them); one forward and one ``torch.autograd.grad`` give, for each prompt and neuron at
   the last position, the activation ``a`` and the gradient ``g`` of
   ``logit(target) - logit(clean answer)``. To first order, forcing a set ``S`` of neurons
   to ``v`` changes that logit difference by ``sum over S of g * (v - a)``.
3. **Choice.** :meth:`Attribution.top_neurons` ranks neurons by their mean gradient (the
   ones whose rise most favours the target); :meth:`Attribution.value_for` solves the
   first-order estimate for the value that puts the target one logit above the clean answer
   in three quarters of the prompts.
4. **Forcing.** :func:`force` inserts the seed experiment's
   ``SetValues(ts.idx[n:, -1, neurons], value)`` before the down projection of each chosen
   layer; clean and forced copies of the prompts share one batch, and the clean rows must
   come out exactly as an unforced run gives them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torchsurgeon as ts
from torchsurgeon.demo.antonyms import DemoError, quiet_transformers
from torchsurgeon.methods.layout import (
    ModelLayout,
    UnknownFamilyError,
    in_features,
    layout_of,
    n_layers,
)

__all__ = [
    "Attribution",
    "Checkpoint",
    "DemoError",
    "Shape",
    "attribute",
    "check_neurons",
    "force",
    "inspect_checkpoint",
    "load_checkpoint",
    "parse_neurons",
]

Neurons = dict[int, list[int]]


def parse_neurons(text: str) -> Neurons:
    """``"12:7171,2519;13:9469"`` -> ``{12: [7171, 2519], 13: [9469]}``."""
    out: Neurons = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer_text, sep, neuron_text = part.partition(":")
        try:
            if not sep:
                raise ValueError
            layer = int(layer_text)
            neurons = [int(n) for n in neuron_text.split(",") if n.strip()]
        except ValueError:
            raise DemoError(
                f"--neurons: cannot read {part!r}; write LAYER:NEURON,NEURON;LAYER:NEURON, "
                "e.g. '2:71,305;3:19'"
            ) from None
        if layer in out:
            raise DemoError(f"--neurons: layer {layer} is listed twice; list it once")
        if not neurons:
            raise DemoError(f"--neurons: layer {layer} lists no neurons")
        repeated = sorted({n for n in neurons if neurons.count(n) > 1})
        if repeated:
            raise DemoError(f"--neurons: layer {layer} lists neuron(s) {repeated} twice")
        out[layer] = neurons
    if not out:
        raise DemoError("--neurons: no layers given; write e.g. '2:71,305;3:19'")
    return out


@dataclass(frozen=True)
class Shape:
    """What the checks need to know of a model: where its parts are, its MLP widths."""

    layout: ModelLayout
    widths: tuple[int, ...]  # the input width of each layer's MLP down projection

    @classmethod
    def of(cls, model: nn.Module, name: str) -> Shape:
        try:
            layout = layout_of(model)
        except UnknownFamilyError:
            raise DemoError(
                f"{name}: torchsurgeon.methods does not know where the MLPs of a "
                f"{type(model).__name__} are, so the demo cannot force its neurons; a GPT-2, "
                "Llama-family or GPT-NeoX checkpoint works"
            ) from None
        widths = tuple(
            in_features(ts.select(model).at(layout.in_block(layer, "mlp_down")).get())
            for layer in range(n_layers(model, layout))
        )
        return cls(layout, widths)


def check_neurons(neurons: Mapping[int, Sequence[int]], shape: Shape) -> None:
    """Refuse layers and neurons the model does not have, naming what it has."""
    count = len(shape.widths)
    for layer, chosen in neurons.items():
        if not 0 <= layer < count:
            raise DemoError(
                f"--neurons: layer {layer} does not exist: the model has {count} layers "
                f"(0-{count - 1})"
            )
        width = shape.widths[layer]
        bad = [n for n in chosen if not 0 <= n < width]
        if bad:
            raise DemoError(
                f"--neurons: neuron(s) {bad} of layer {layer} do not exist: its MLP is "
                f"{width} wide (neurons 0-{width - 1})"
            )


def _checkpoint_dir(path: Path, label: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise DemoError(f"{label}: no such directory")
    if not (directory / "config.json").is_file():
        raise DemoError(
            f"{label}: not a checkpoint directory (it has no config.json); give the folder "
            "that save_pretrained wrote"
        )
    return directory


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def inspect_checkpoint(path: Path, label: str | None = None) -> Shape:
    """The checkpoint's :class:`Shape`, from its config alone (a ``meta`` model, no weights).

    ``label`` names the checkpoint in errors (default ``--model PATH``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    label = label or f"--model {path}"
    directory = _checkpoint_dir(path, label)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # transformers raises many kinds; each is a bad checkpoint here
        raise DemoError(f"{label}: cannot read its config ({_one_line(error)})") from error
    return Shape.of(skeleton, label)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model (wrapped: a frozen tree), its tokenizer (left padding) and shape."""

    model: nn.Module
    tokenizer: Any
    shape: Shape


def load_checkpoint(path: Path, shape: Shape | None = None, label: str | None = None) -> Checkpoint:
    """Load a local causal-LM checkpoint directory and its tokenizer; nothing downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = label or f"--model {path}"
    directory = _checkpoint_dir(path, label)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise DemoError(f"{label}: cannot load its tokenizer ({_one_line(error)})") from error
    try:
        with quiet_transformers():
            hf_model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise DemoError(f"{label}: cannot load the checkpoint ({_one_line(error)})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # the last position is every prompt's next-token slot
    model = ts.wrap(hf_model.eval())
    return Checkpoint(model, tokenizer, shape or Shape.of(model, label))


def batch_of(tokenizer: Any, prompts: Sequence[str], copies: int = 1) -> dict[str, torch.Tensor]:
    """``copies`` stacked copies of the prompts, left-padded, with matching position ids."""
    batch = tokenizer(list(prompts) * copies, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a padded row starts at position 0 too
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": positions}


def _last_logits(output: Any) -> torch.Tensor:
    return output.logits[:, -1].float()


@dataclass(frozen=True)
class Attribution:
    """Per layer, ``[prompt, neuron]`` at the last position: the activations ``a`` and the
    gradients ``g`` of ``logit(target) - logit(clean answer)``, with that difference."""

    activations: tuple[torch.Tensor, ...]
    gradients: tuple[torch.Tensor, ...]
    difference: torch.Tensor  # [prompt]: logit(target) - logit(clean answer), clean

    def top_neurons(self, count: int) -> Neurons:
        """The ``count`` neurons (over all layers) whose rise most favours the target."""
        scores = torch.cat([g.mean(0) for g in self.gradients])
        owner = torch.cat(
            [torch.full((g.shape[1],), layer) for layer, g in enumerate(self.gradients)]
        )
        offsets = torch.cat(
            [torch.arange(g.shape[1]) for g in self.gradients]
        )  # the neuron index within its layer
        chosen: Neurons = {}
        for i in scores.topk(min(count, scores.numel())).indices.tolist():
            chosen.setdefault(int(owner[i]), []).append(int(offsets[i]))
        return {layer: sorted(chosen[layer]) for layer in sorted(chosen)}

    def _sums(self, neurons: Neurons) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum g, sum g * a)`` over the chosen neurons, per prompt."""
        g = sum(self.gradients[layer][:, n].sum(-1) for layer, n in neurons.items())
        ga = sum(
            (self.gradients[layer][:, n] * self.activations[layer][:, n]).sum(-1)
            for layer, n in neurons.items()
        )
        return torch.as_tensor(g), torch.as_tensor(ga)

    def value_for(self, neurons: Neurons, margin: float = 1.0, share: float = 0.75) -> float:
        """The value that, to first order, lifts the target ``margin`` logits above the clean
        answer in ``share`` of the prompts where raising these neurons helps at all."""
        g, ga = self._sums(neurons)
        helps = g > 0
        if not bool(helps.any()):
            raise DemoError(
                "--neurons: raising these neurons lowers the target on every prompt (their "
                "gradients are <= 0); pass --value (a negative one lowers them), or leave "
                "--neurons out to pick neurons by attribution"
            )
        need = margin - self.difference[helps]
        values = (need + ga[helps]) / g[helps]  # d + g (v - a) >= margin, solved for v
        return float(values.quantile(share))

    def estimate(self, neurons: Neurons, value: float) -> dict[tuple[int, int], float]:
        """Each chosen neuron's first-order share of the logit-difference change, averaged
        over prompts: ``mean of g * (value - a)``."""
        return {
            (layer, n): float(
                (self.gradients[layer][:, n] * (value - self.activations[layer][:, n])).mean()
            )
            for layer, chosen in neurons.items()
            for n in chosen
        }

    def scale(self, neurons: Neurons) -> float:
        """The largest activation magnitude of the chosen neurons on these prompts."""
        return max(float(self.activations[layer][:, n].abs().max()) for layer, n in neurons.items())


def attribute(
    checkpoint: Checkpoint, batch: Mapping[str, torch.Tensor], target: int
) -> Attribution:
    """Activations and gradients at every MLP's neurons (see the module docstring); the
    clean answer of each prompt is the model's own top next token."""
    model, layout = checkpoint.model, checkpoint.shape.layout
    embed = ts.select(model).at(layout.embed).get()
    entry = torch.zeros(embed.weight.shape[1], dtype=embed.weight.dtype, requires_grad=True)
    probe = ts.select(model).at(layout.embed).insert_after(ts.layers.Add(entry))
    layers = range(len(checkpoint.shape.widths))
    for layer in layers:
        site = layout.in_block(layer, "mlp_down")
        probe = ts.select(probe).at(site).insert_before(ts.layers.Save(f"neurons{layer}"))
    with torch.enable_grad():
        result = ts.run(probe, **batch)
        logits = result.output.logits[:, -1].float()
        rows = torch.arange(logits.shape[0])
        answers = logits.detach().argmax(-1)
        difference = logits[:, target] - logits[rows, answers]
        saved = [result.saved[f"neurons{layer}"] for layer in layers]
        gradients = torch.autograd.grad(difference.sum(), saved, allow_unused=True)
    return Attribution(
        activations=tuple(a[:, -1].detach().float() for a in saved),
        gradients=tuple(
            torch.zeros_like(a[:, -1], dtype=torch.float) if g is None else g[:, -1].float()
            for a, g in zip(saved, gradients, strict=True)
        ),
        difference=difference.detach(),
    )


def force(
    model: nn.Module, layout: ModelLayout, neurons: Neurons, value: float, rows: int
) -> nn.Module:
    """The seed rewrite: each chosen layer's down-projection input at ``[rows:, -1, neurons]``
    set to ``value``; returns the new model (``model`` is unchanged)."""
    probe = model
    for layer, chosen in neurons.items():
        probe = (
            ts.select(probe)
            .at(layout.in_block(layer, "mlp_down"))
            .insert_before(ts.layers.SetValues(ts.idx[rows:, -1, chosen], value))
        )
    return probe


def candidate_values(first: float, scale: float, tries: int = 4) -> list[float]:
    """``first``, then ever larger values: ``first + (2**k - 1) * step`` for k < ``tries``,
    with ``step`` the larger of ``|first|`` and ``scale``."""
    step = max(abs(first), scale, 1e-3)
    return [first + (2**k - 1) * step for k in range(tries)]


def needed(count: int, share: float = 0.75) -> int:
    """How many of ``count`` answers must change for a forcing to count as flipping them."""
    return math.ceil(share * count)
