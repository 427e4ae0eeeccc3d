"""The demo: find the neurons that make a model say a word, force them, watch answers change.

``torchsurgeon demo`` runs the seed experiment of this project on a model with real
structure. By default that is a small Llama trained here in seconds on a synthetic antonym
language (``'Q: cheap\\nA:'`` -> ``' expensive'``; :mod:`~torchsurgeon.demo.antonyms`) and
cached; ``--model PATH`` uses any local causal-LM checkpoint instead. Then
(:mod:`~torchsurgeon.demo.forcing`):

1. a ``Save`` before every MLP down projection and one backward pass give, for each neuron
   at the last position, its activation and the gradient of ``logit(target) - logit(clean
   answer)`` (target ``' small'`` by default);
2. the neurons whose rise most favours the target are chosen, and the value to force them
   to is solved from that first-order estimate (raised until most answers change, when the
   estimate falls short);
3. ``SetValues(ts.idx[n:, -1, neurons], value)`` goes before the down projection of each
   chosen layer, with clean and forced copies of the prompts in one batch.

It prints the rewrite as code, the clean and forced answers side by side with their
probabilities, the largest change in the clean rows (0: the edit touches only its rows),
and writes the rewritten tree as HTML (``ts.save_html``) and a PNG of the probabilities and
attributions (:mod:`~torchsurgeon.demo.report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

import torchsurgeon as ts
from torchsurgeon.demo.antonyms import (
    ANTONYMS,
    DemoRecipe,
    TrainedModel,
    antonym_model,
    cache_dir,
    checkpoint_path,
    prompt,
    questions,
)
from torchsurgeon.demo.forcing import (
    Checkpoint,
    DemoError,
    attribute,
    batch_of,
    candidate_values,
    check_neurons,
    force,
    inspect_checkpoint,
    load_checkpoint,
    needed,
    parse_neurons,
)
from torchsurgeon.demo.report import Answer, answers_table, rewrite_code, write_png

__all__ = [
    "ANTONYMS",
    "DemoError",
    "DemoRecipe",
    "DemoResult",
    "TrainedModel",
    "antonym_model",
    "cache_dir",
    "parse_neurons",
    "questions",
    "run_demo",
]

TABLE_WORDS = ("cheap", "hot", "fast", "small", "happy", "early", "loud", "full")
"""The questions in the table (a question whose answer is the target is left out)."""
NEURON_COUNT = 8
"""How many neurons the demo picks by attribution when ``--neurons`` is not given."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo computed and showed.

    ``clean`` / ``forced`` hold each prompt's top tokens with probabilities; ``changed``
    counts prompts whose top answer differs, ``to_target`` those now answering the target;
    ``max_clean_change`` is the largest |logit change| in the clean rows (0 when the edit
    touches only its rows); ``trained`` describes the demo model (None with ``--model``).
    """

    prompts: tuple[str, ...]
    clean: tuple[Answer, ...]
    forced: tuple[Answer, ...]
    forced_p_of_clean: tuple[float, ...]
    target: str
    neurons: dict[int, list[int]]
    value: float
    changed: int
    to_target: int
    max_clean_change: float
    html: Path
    png: Path
    trained: TrainedModel | None


def _target_token(checkpoint: Checkpoint, word: str, console: Console) -> tuple[int, str]:
    tokenizer = checkpoint.tokenizer
    ids = tokenizer(f" {word}", add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id
    if not ids or (unknown is not None and ids[0] == unknown):
        raise DemoError(f"--target {word!r}: the model's tokenizer does not know {' ' + word!r}")
    text = tokenizer.decode(ids[:1])
    if len(ids) > 1:
        console.print(f"--target {word!r} is {len(ids)} tokens; the demo uses the first, {text!r}")
    return int(ids[0]), text


def _top(probs: torch.Tensor, tokenizer, k: int) -> tuple[Answer, ...]:
    values, ids = probs.topk(k)
    return tuple(
        tuple((tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, row, strict=True))
        for ps, row in zip(values, ids, strict=True)
    )


def _describe_model(checkpoint: Checkpoint, trained: TrainedModel | None, path: Path) -> str:
    shape = checkpoint.shape
    widths = sorted(set(shape.widths))
    mlp = f"MLPs of {widths[0]} neurons" if len(widths) == 1 else f"MLPs of {widths} neurons"
    name = type(checkpoint.model).__name__
    if trained is None:
        return f"Model: {name} from {path} ({len(shape.widths)} layers, {mlp})."
    recipe = trained.recipe
    where = "read from the cache" if trained.cached else "trained now"
    right = round(trained.accuracy * trained.n_questions)
    return (
        f"Model: a {recipe.n_layer}-layer Llama (width {recipe.n_embd}, {mlp}) trained on "
        f"{trained.n_questions} antonym questions ('Q: cheap\\nA:' -> ' expensive') in "
        f"{trained.seconds:.1f} s ({where}: {trained.path}); it answers {right}/"
        f"{trained.n_questions} right."
    )


def _format_neurons(neurons: Mapping[int, Sequence[int]]) -> str:
    return "; ".join(f"layer {layer}: {', '.join(map(str, ns))}" for layer, ns in neurons.items())


def _force_until_most_change(
    checkpoint: Checkpoint,
    batch: Mapping[str, torch.Tensor],
    neurons: Mapping[int, list[int]],
    values: Sequence[float],
    rows: int,
    console: Console,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    """Force ``neurons`` in rows ``rows`` on to each of ``values`` in turn, until most
    forced answers differ from the clean ones; ``(model, clean logits, forced logits,
    value)`` of the last try (logits at the last position, every row)."""
    model, layout = checkpoint.model, checkpoint.shape.layout
    with torch.no_grad():
        clean = model(**batch).logits[:, -1].float()
        for tried in values:
            probe = force(model, layout, dict(neurons), tried, rows)
            forced = probe(**batch).logits[:, -1].float()
            changed = int((forced[rows:].argmax(-1) != clean[rows:].argmax(-1)).sum())
            if changed >= needed(rows) or tried == values[-1]:
                return probe, clean, forced, tried
            console.print(
                f"  forcing to {tried:.4g} changes {changed}/{rows} answers; trying more",
                highlight=False,
            )
    raise DemoError("--value: no value to force the neurons to; give at least one")


def run_demo(
    model_path: Path | None = None,
    *,
    neurons: Mapping[int, Sequence[int]] | None = None,
    value: float | None = None,
    target: str = "small",
    html_path: Path = Path("torchsurgeon-demo.html"),
    png_path: Path = Path("torchsurgeon-demo.png"),
    top_k: int = 1,
    retrain: bool = False,
    recipe: DemoRecipe | None = None,
    cache: Path | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring), print it, write the HTML and PNG.

    ``recipe`` and ``cache`` choose the trained model and where it is cached (default:
    :class:`DemoRecipe`, :func:`cache_dir`); they are unused with ``model_path``.
    """
    console = console or Console()
    if top_k < 1:
        raise DemoError(f"--top-k must be at least 1, got {top_k}")
    if value is not None and not math.isfinite(value):
        raise DemoError(f"--value must be a finite number, got {value}")
    word = target.strip()
    if not word or len(word.split()) != 1:
        raise DemoError(f"--target must be one word, e.g. 'small', got {target!r}")
    neurons = {int(k): [int(n) for n in v] for k, v in neurons.items()} if neurons else None

    recipe = recipe or DemoRecipe()
    answer_of = dict(recipe.pairs) | {b: a for a, b in recipe.pairs}
    trained = None
    if model_path is None:
        if word not in answer_of:
            raise DemoError(
                f"--target {word!r} is not a word of the demo model's language; pick one of "
                f"{', '.join(sorted(answer_of))}"
            )
        if retrain or not (checkpoint_path(recipe, cache) / "demo.json").is_file():
            console.print("Training the demo model (a few seconds, once; then it is cached) ...")
        trained = antonym_model(recipe, directory=cache, retrain=retrain)
        path = trained.path
        label = f"the cached demo model {path} (delete it, or pass --retrain)"
    else:
        path, label = Path(model_path), f"--model {model_path}"
    shape = inspect_checkpoint(path, label)  # config only: --neurons is checked before weights
    if neurons is not None:
        check_neurons(neurons, shape)
    checkpoint = load_checkpoint(path, shape, label)
    tokenizer, layout = checkpoint.tokenizer, shape.layout
    target_id, target_text = _target_token(checkpoint, word, console)
    words = [w for w in TABLE_WORDS if w in answer_of] or sorted(answer_of)[:8]
    prompts = tuple(prompt(w) for w in words if answer_of[w] != word)
    rows = len(prompts)
    console.print(_describe_model(checkpoint, trained, path), highlight=False)

    attribution = attribute(checkpoint, batch_of(tokenizer, prompts), target_id)
    chosen_by = "given by --neurons" if neurons else "chosen by attribution"
    neurons = neurons or attribution.top_neurons(NEURON_COUNT)
    if value is None:
        first = attribution.value_for(neurons)
        values = candidate_values(first, attribution.scale(neurons))
        how = (
            f"{first:.4g}, the first-order estimate that lifts {target_text!r} one logit over "
            "the clean answer in 3/4 of the prompts"
        )
    else:
        values, how = [value], f"{value:.4g} (--value)"
    batch = batch_of(tokenizer, prompts, copies=2)
    probe, clean, forced, used = _force_until_most_change(
        checkpoint, batch, neurons, values, rows, console
    )
    if used != values[0]:
        how += f", raised to {used:.4g} so that most answers change"
    console.print(
        f"Attribution: a Save before each of the {len(shape.widths)} MLP down projections and "
        f"one backward pass give each neuron's gradient of logit({target_text!r}) - "
        "logit(clean answer) at the last position.",
        highlight=False,
    )
    console.print(
        f"Forcing: {sum(map(len, neurons.values()))} neurons {chosen_by} "
        f"({_format_neurons(neurons)}) set to {how}; batch rows {rows} on are forced, rows "
        f"0-{rows - 1} are the same prompts, clean.",
        highlight=False,
    )
    site = f"{layout.blocks}.{{layer}}.{layout.mlp_down}"
    console.print("The rewrite, as code:")
    console.print(rewrite_code(site, neurons, used, rows), highlight=False, markup=False)

    clean_probs, forced_probs = clean[rows:].softmax(-1), forced[rows:].softmax(-1)
    clean_top = _top(clean_probs, tokenizer, top_k)
    forced_top = _top(forced_probs, tokenizer, top_k)
    p_of_clean = tuple(
        float(p) for p in forced_probs.gather(1, clean_probs.argmax(-1, keepdim=True))[:, 0]
    )
    title = (
        f"Clean vs forced: {sum(map(len, neurons.values()))} neurons set to {used:.4g} "
        f"(toward {target_text!r})"
    )
    console.print(answers_table(prompts, clean_top, forced_top, title))
    unchanged = float((forced[:rows] - clean[:rows]).abs().max())
    answers = forced[rows:].argmax(-1)
    changed = int((answers != clean[rows:].argmax(-1)).sum())
    to_target = int((answers == target_id).sum())
    console.print(f"clean rows 0-{rows - 1} max |change|: {unchanged:.3g} (expected 0)")
    console.print(
        f"answers changed: {changed}/{rows} ({to_target} now {target_text!r})", highlight=False
    )
    png = write_png(
        png_path, prompts, clean_top, forced_top, attribution.estimate(neurons, used), title
    )
    html = ts.save_html(probe, html_path, title=f"torchsurgeon demo: {title}")
    console.print(f"wrote the rewritten tree to {html} and the plot to {png}", highlight=False)
    return DemoResult(
        prompts=prompts,
        clean=clean_top,
        forced=forced_top,
        forced_p_of_clean=p_of_clean,
        target=target_text,
        neurons=neurons,
        value=used,
        changed=changed,
        to_target=to_target,
        max_clean_change=unchanged,
        html=Path(html),
        png=png,
        trained=trained,
    )
