"""What the demo shows: the side-by-side table, the rewrite as code, a PNG and the HTML tree.

The table puts each prompt's clean answer next to its forced answer, with probabilities,
and says whether it changed. The PNG has two panels: each prompt's top answer and its
probability, clean and forced (the answer written in its bar), and the first-order
attribution of each forced neuron. It is drawn on a matplotlib ``Figure`` with
the Agg renderer (no display, no ``pyplot`` state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.table import Table

__all__ = ["Answer", "answers_table", "rewrite_code", "write_png"]

Answer = tuple[tuple[str, float], ...]
"""The top tokens of one prompt's next-token distribution, ``((text, probability), ...)``."""


def _cell(answer: Answer) -> str:
    return "\n".join(f"{text!r} {p:.3f}" for text, p in answer)


def answers_table(
    prompts: Sequence[str],
    clean: Sequence[Answer],
    forced: Sequence[Answer],
    title: str,
) -> Table:
    """Clean answer vs forced answer for each prompt (top tokens with probabilities)."""
    table = Table(title=title, title_justify="left")
    table.add_column("prompt")
    table.add_column("clean answer")
    table.add_column("neurons forced")
    table.add_column("changed", justify="center")
    for text, a, b in zip(prompts, clean, forced, strict=True):
        changed = a[0][0] != b[0][0]
        table.add_row(
            repr(text), _cell(a), _cell(b), "[bold green]yes[/]" if changed else "[red]no[/]"
        )
    return table


def rewrite_code(site: str, neurons: Mapping[int, Sequence[int]], value: float, rows: int) -> str:
    """The rewrite the demo made, as the ``ts`` code a reader would type; ``site`` is the
    down projection's path with ``{layer}`` for the layer (e.g.
    ``"model.layers.{layer}.mlp.down_proj"``)."""
    chosen = ", ".join(f"{layer}: {list(ns)}" for layer, ns in neurons.items())
    return "\n".join(
        [
            f"neurons = {{{chosen}}}",
            "probe = model",
            "for layer, chosen in neurons.items():",
            "    probe = (",
            f'        ts.select(probe).at(f"{site}")',
            f"        .insert_before(ts.layers.SetValues(ts.idx[{rows}:, -1, chosen], "
            f"{value:.4g}))",
            "    )",
        ]
    )


def write_png(
    path: Path,
    prompts: Sequence[str],
    clean: Sequence[Answer],
    forced: Sequence[Answer],
    estimates: Mapping[tuple[int, int], float],
    title: str,
) -> Path:
    """The two-panel plot (see the module docstring), written as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    width = 0.4
    for offset, answers, label, colour in (
        (-width / 2, clean, "clean", "tab:blue"),
        (width / 2, forced, "neurons forced", "tab:orange"),
    ):
        xs = [x + offset for x in range(len(prompts))]
        left.bar(xs, [a[0][1] for a in answers], width, label=label, color=colour)
        for x, answer in zip(xs, answers, strict=True):
            left.text(
                x,
                0.02,
                answer[0][0].strip(),
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=8,
                color="white",
            )
    left.set_xticks(
        range(len(prompts)), [_question(p) for p in prompts], rotation=30, ha="right", fontsize=8
    )
    left.set_ylim(0, 1.15)
    left.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    left.set_ylabel("probability")
    left.set_title("each question's answer (written in its bar) and its probability", fontsize=9)
    left.legend(loc="upper right", fontsize=8, ncols=2)

    labels = [f"L{layer} N{n}" for layer, n in estimates]
    right.barh(range(len(labels)), list(estimates.values()), color="tab:green")
    right.set_yticks(range(len(labels)), labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("first-order effect on logit(target) - logit(clean answer)")
    right.set_title("attribution of each forced neuron (gradient x change)", fontsize=9)
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _question(prompt: str) -> str:
    """``'Q: cheap\\nA:'`` -> ``'cheap'``; any other prompt as it is, shortened."""
    if prompt.startswith("Q: ") and prompt.endswith("\nA:"):
        return prompt[3:-3]
    text = prompt.replace("\n", " ")
    return text if len(text) <= 18 else text[:17] + "…"
