"""Plots of the methods' results: heatmaps, head grids, logit-lens tables, comparisons.

Every function takes a result as a method returned it, draws it on a new matplotlib
``Figure`` with the Agg renderer (no display, no global ``pyplot`` state, safe in scripts,
tests and notebooks alike) and returns the figure; given ``path=``, it also writes a PNG
there. In a notebook the figure shows as the cell's value.

==========================  =====================================================
function                    draws
==========================  =====================================================
``heatmap(grid)``           an :class:`EffectGrid` (layer x position, layer x head)
``token_table(lens)``       a :class:`LogitLens`: top token per layer and position
``scatter(x, y)``           two grids against each other (attribution vs patching)
``probe_accuracy(result)``  a :class:`ProbeResult`: held-out accuracy per layer
``loss_curve(result)``      a :class:`LoraResult`: training loss per step
``token_shift(result)``     a :class:`NeuronForcing`: the tokens forcing raised most
==========================  =====================================================
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.lens import LogitLens
from torchsurgeon.methods.lora import LoraResult
from torchsurgeon.methods.neurons import NeuronForcing
from torchsurgeon.methods.probing import ProbeResult
from torchsurgeon.surgery.errors import ArgumentError

__all__ = [
    "PlotFigure",
    "heatmap",
    "loss_curve",
    "probe_accuracy",
    "save",
    "scatter",
    "token_shift",
    "token_table",
]

PathLike = str | Path | None


class PlotFigure(Figure):
    """A matplotlib ``Figure`` that also shows itself as a PNG in a notebook.

    The figures here are not managed by ``pyplot``, so a notebook's inline backend may not
    know them; ``_repr_png_`` makes them display as a cell's value all the same.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def _figure(width: float, height: float) -> PlotFigure:
    figure = PlotFigure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created); the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi, format="png")
    return target


def _done(figure: Figure, path: PathLike) -> Figure:
    if path is not None:
        save(figure, path)
    return figure


def heatmap(
    grid: EffectGrid,
    *,
    normalized: bool = False,
    annotate: bool | None = None,
    title: str | None = None,
    path: PathLike = None,
) -> Figure:
    """An effect grid as a diverging heatmap centred on zero (red up, blue down).

    ``normalized`` divides by ``clean - corrupted`` (1 = the site restores everything).
    ``annotate`` writes each value in its cell (default: when the grid has at most 64 cells).
    """
    values = grid.normalized() if normalized else grid.values
    values = values.detach().float().cpu()
    rows, cols = grid.shape
    figure = _figure(min(1.6 + 0.55 * cols, 14), min(max(2.4, 1.4 + 0.42 * rows), 12))
    axes = figure.add_subplot()
    bound = float(values.abs().max()) or 1.0
    image = axes.imshow(
        values.numpy(),
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound),
        aspect="auto",
    )
    axes.set_xticks(
        range(cols),
        grid.col_labels,
        rotation=60 if cols > 8 else 0,
        ha="right" if cols > 8 else "center",
        fontsize=8,
    )
    axes.set_yticks(range(rows), grid.row_labels, fontsize=8)
    axes.set_xlabel(grid.col_name)
    axes.set_ylabel(grid.row_name)
    measure = f"({grid.measure})" + (" / (clean - corrupted)" if normalized else "")
    axes.set_title(title or f"{grid.title}\n{measure}", fontsize=9)
    if annotate if annotate is not None else rows * cols <= 64:
        for (r, c), value in _cells(values):
            shade = "white" if abs(value) > 0.6 * bound else "black"
            axes.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=7, color=shade)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _done(figure, path)


def _cells(values: torch.Tensor) -> list[tuple[tuple[int, int], float]]:
    return [
        ((r, c), float(values[r, c]))
        for r in range(values.shape[0])
        for c in range(values.shape[1])
    ]


def token_table(lens: LogitLens, *, title: str | None = None, path: PathLike = None) -> Figure:
    """The logit lens as a table: each cell the top token, shaded by its probability."""
    probs = lens.top_log_probs[..., 0].exp().float().cpu()
    layers, positions = probs.shape
    figure = _figure(min(1.8 + 0.75 * positions, 16), min(max(2.2, 1.2 + 0.38 * layers), 12))
    axes = figure.add_subplot()
    image = axes.imshow(probs.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for layer in range(layers):
        for position in range(positions):
            label = lens.top_labels[layer][position][0]
            shade = "white" if probs[layer, position] > 0.6 else "black"
            axes.text(
                position, layer, _short(label), ha="center", va="center", fontsize=7, color=shade
            )
    axes.set_xticks(range(positions), lens.position_labels, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(layers), lens.layer_labels, fontsize=8)
    axes.set_xlabel("position (input token)")
    axes.set_ylabel("decoded after block")
    axes.set_title(title or "logit lens: top token (shade = its probability)", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8, label="p(top token)")
    return _done(figure, path)


def _short(label: str, width: int = 7) -> str:
    text = label.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def scatter(
    estimate: EffectGrid,
    actual: EffectGrid,
    *,
    title: str | None = None,
    path: PathLike = None,
) -> Figure:
    """One grid against another, cell by cell, with their correlation (e.g. attribution
    patching's estimate against activation patching's measurement)."""
    if estimate.shape != actual.shape:
        raise ArgumentError(f"the grids differ in shape: {estimate.shape} vs {actual.shape}")
    x = actual.values.detach().float().flatten().cpu()
    y = estimate.values.detach().float().flatten().cpu()
    correlation = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.numel() > 1 else math.nan
    figure = _figure(4.6, 4.2)
    axes = figure.add_subplot()
    axes.scatter(x.numpy(), y.numpy(), s=14, alpha=0.75)
    low = float(min(x.min(), y.min()))
    high = float(max(x.max(), y.max()))
    axes.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel(f"{actual.title}")
    axes.set_ylabel(f"{estimate.title}")
    axes.set_title(title or f"per-site effects, r = {correlation:.3f}", fontsize=9)
    return _done(figure, path)


def probe_accuracy(
    result: ProbeResult, *, title: str | None = None, path: PathLike = None
) -> Figure:
    """Held-out (and training) accuracy of each layer's probe, with the chance level."""
    figure = _figure(max(3.6, 0.5 * len(result.layer_labels) + 2), 3.2)
    axes = figure.add_subplot()
    steps = range(len(result.layer_labels))
    axes.plot(steps, result.accuracy.numpy(), marker="o", label="held out")
    axes.plot(steps, result.train_accuracy.numpy(), marker=".", linestyle=":", label="train")
    axes.axhline(result.chance, color="grey", linestyle="--", linewidth=0.8, label="majority class")
    axes.set_xticks(list(steps), result.layer_labels)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("residual stream after block")
    axes.set_ylabel("accuracy")
    axes.legend(fontsize=8)
    axes.set_title(
        title or f"linear probes ({result.n_train} train / {result.n_test} test)", fontsize=9
    )
    return _done(figure, path)


def loss_curve(result: LoraResult, *, title: str | None = None, path: PathLike = None) -> Figure:
    """The training loss of a LoRA run, step by step."""
    figure = _figure(4.6, 3.2)
    axes = figure.add_subplot()
    axes.plot(range(1, len(result.losses) + 1), result.losses.numpy())
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.set_title(
        title or f"LoRA training: {result.initial_loss:.3g} -> {result.final_loss:.3g}", fontsize=9
    )
    return _done(figure, path)


def token_shift(
    result: NeuronForcing, *, row: int = -1, title: str | None = None, path: PathLike = None
) -> Figure:
    """The tokens whose log-probability forcing raised the most, for one forced batch row."""
    batch = result.top_ids.shape[0]
    if not -batch <= row < batch or row % batch not in result.forced_rows:
        raise ArgumentError(
            f"row {row} was not forced (forced rows: {list(result.forced_rows)}); its shift is "
            "zero and it has no raised tokens to show"
        )
    ids = result.top_ids[row].tolist()
    labels = result.top_labels[row]
    shifts = [float(result.shift[row, t]) for t in ids]
    figure = _figure(4.6, 0.8 + 0.28 * len(ids))
    axes = figure.add_subplot()
    axes.barh(range(len(ids)), shifts[::-1])
    axes.set_yticks(range(len(ids)), [_short(t, 12) for t in labels[::-1]], fontsize=8)
    axes.set_xlabel("change of log-probability")
    axes.set_title(title or f"forced neurons: most raised tokens (row {row})", fontsize=9)
    return _done(figure, path)
