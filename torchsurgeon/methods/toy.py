"""A toy model with known circuitry: a two-layer transformer trained to continue repeats.

Interpretability methods are easiest to trust on a model whose answer is known. This one is
trained in seconds on a CPU on an *induction* task: each sequence is a prefix of distinct
random tokens, then a block of other distinct random tokens repeated to the end,
``[prefix] A B C ... A B C ... A B``, at a random offset and with a random period, so the only
way to predict the repeats is to find the earlier occurrence of the current token and copy
the token after it. Two-layer transformers learn this with *induction heads* (Olsson et al.,
2022): a head in layer 0 writes "my previous token was X" into each position, and a head in
layer 1 attends from the current token to the position whose previous token matches it and
copies that position's token.

The model is a ``transformers`` Llama (2 layers, width 32, 4 heads of 8, a small MLP): its
rotary position encoding makes "attend to the previous token" easy to learn, and the
canonical circuit above forms in a few hundred steps. At this width one layer-1 head does
most of the copying (wider models spread it evenly over all four), which makes it a crisp
target for the methods. (A GPT-2 of the same size, with learned absolute
positions, was tried first: within the same budget it learns a *shifted* variant instead —
layer-0 heads that look two and three tokens back, layer-1 heads that attend to the
earlier occurrence plus two — which is a fine circuit but not the textbook one the tests
check for.)

:func:`induction_model` trains the model from a :class:`ToyRecipe` (seeded, deterministic on a
given machine and thread count) and caches the weights on disk, keyed by a hash of the
recipe, in ``$TORCHSURGEON_CACHE`` or the system temp directory — so tests and notebooks in
one session train it once. Nothing is downloaded and no weights live in the repository.
:func:`induction_pairs` makes the clean/corrupted prompt pairs of the patching examples, and
:func:`induction_scores` measures each head's induction score from its attention pattern.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from transformers import LlamaConfig, LlamaForCausalLM

from torchsurgeon.surgery.errors import ArgumentError
from torchsurgeon.surgery.progress import progress as show_progress

__all__ = [
    "InductionBatch",
    "InductionTask",
    "ToyModel",
    "ToyRecipe",
    "cache_dir",
    "induction_model",
    "induction_pairs",
    "induction_scores",
    "repeated_tokens",
]

_FORMAT = 1  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class InductionTask:
    """Sequences of ``length`` tokens from ``vocab``: a prefix of distinct tokens, then a
    block of ``min_period`` to ``max_period`` other distinct tokens repeated to the end.

    ``length`` at most ``vocab``, and at least two copies of the longest block fit."""

    vocab: int = 64
    length: int = 32
    min_period: int = 4
    max_period: int = 12

    def __post_init__(self) -> None:
        if not 2 <= self.min_period <= self.max_period or 2 * self.max_period > self.length:
            raise ArgumentError(f"{self}: need 2 <= min_period <= max_period <= length / 2")
        if self.length > self.vocab:
            raise ArgumentError(f"{self}: vocab too small for sequences of distinct tokens")

    def sample(self, batch: int, generator: torch.Generator) -> InductionBatch:
        """``batch`` sequences, and which of their tokens induction predicts."""
        ids = torch.empty(batch, self.length, dtype=torch.long)
        periods = torch.randint(self.min_period, self.max_period + 1, (batch,), generator=generator)
        starts = torch.empty(batch, dtype=torch.long)
        for row, period in enumerate(periods.tolist()):
            start = int(torch.randint(0, self.length - 2 * period + 1, (1,), generator=generator))
            tokens = torch.randperm(self.vocab, generator=generator)
            copies = -(-(self.length - start) // period)  # as many as fill the sequence
            sequence = torch.cat([tokens[:start], tokens[start : start + period].repeat(copies)])
            sequence = sequence[: self.length]
            ids[row] = sequence
            starts[row] = start
        return InductionBatch(ids, induction_mask(ids), periods, starts)


def induction_mask(ids: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]``: token ``t`` follows an earlier occurrence of token ``t - 1``."""
    length = ids.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)  # [query, key], key < query
    same = (ids[:, :, None] == ids[:, None, :]) & earlier  # same[b, i, j]: x_j == x_i, j < i
    followed = ids[:, None, 1:] == ids[:, 1:, None]  # followed[b, i, j]: x_{j+1} == x_{i+1}
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1:] = (same[:, :-1, :-1] & followed).any(-1)
    return mask


@dataclass(frozen=True)
class InductionBatch:
    """Token ids ``[batch, length]``; ``mask`` marks the tokens an induction head predicts
    (from the second token of the second copy on); ``periods`` and ``starts`` locate the
    copies."""

    ids: torch.Tensor
    mask: torch.Tensor
    periods: torch.Tensor
    starts: torch.Tensor


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that determines the toy model: task, architecture, training."""

    task: InductionTask = InductionTask()
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 4
    n_inner: int = 64
    steps: int = 600
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """A hash of the recipe (and the training code's format version)."""
        text = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def config(self, attn_implementation: str = "sdpa") -> LlamaConfig:
        """The ``transformers`` config of the model."""
        return LlamaConfig(
            vocab_size=self.task.vocab,
            max_position_embeddings=self.task.length,
            num_hidden_layers=self.n_layer,
            hidden_size=self.n_embd,
            num_attention_heads=self.n_head,
            num_key_value_heads=self.n_head,
            intermediate_size=self.n_inner,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            attn_implementation=attn_implementation,
        )


@dataclass(frozen=True)
class ToyModel:
    """The trained model (plain ``transformers``, eval mode) and how well it copies.

    ``loss`` and ``accuracy`` are measured on held-out sequences at the positions an
    induction head can predict; ``seconds`` is the training time (0 when loaded from cache).
    """

    model: LlamaForCausalLM
    recipe: ToyRecipe
    loss: float
    accuracy: float
    path: Path
    seconds: float


def cache_dir() -> Path:
    """``$TORCHSURGEON_CACHE``, else ``<system temp>/torchsurgeon-cache``."""
    root = os.environ.get("TORCHSURGEON_CACHE")
    return Path(root) if root else Path(tempfile.gettempdir()) / "torchsurgeon-cache"


def _masked_loss(logits: torch.Tensor, batch: InductionBatch) -> torch.Tensor:
    prediction, target, mask = logits[:, :-1], batch.ids[:, 1:], batch.mask[:, 1:]
    return torch.nn.functional.cross_entropy(prediction[mask], target[mask])


def _evaluate(model: LlamaForCausalLM, recipe: ToyRecipe) -> tuple[float, float]:
    held_out = recipe.task.sample(512, torch.Generator().manual_seed(recipe.seed + 1_000_003))
    with torch.no_grad():
        logits = model(held_out.ids).logits
    prediction = logits[:, :-1].argmax(-1)
    mask = held_out.mask[:, 1:]
    accuracy = (prediction[mask] == held_out.ids[:, 1:][mask]).float().mean()
    return float(_masked_loss(logits, held_out)), float(accuracy)


def _train(recipe: ToyRecipe, progress: bool | None = None) -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):  # seed the initialisation, leave the caller's RNG
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(recipe.config())
    model.train()
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup, decay = 50, int(recipe.steps * 0.75)

    def rate(step: int) -> float:  # linear warm-up, constant, then a linear decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        if step < decay:
            return 1.0
        return 1.0 - 0.9 * (step - decay) / max(1, recipe.steps - decay)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    bar = show_progress(range(recipe.steps), desc="toy model", enabled=progress, unit="step")
    for _ in bar:
        batch = recipe.task.sample(recipe.batch, generator)
        loss = _masked_loss(model(batch.ids).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=loss.detach())
    return model.eval()


def induction_model(
    recipe: ToyRecipe | None = None,
    *,
    directory: Path | str | None = None,
    retrain: bool = False,
    attn_implementation: str = "sdpa",
    progress: bool | None = None,
) -> ToyModel:
    """The trained toy model of ``recipe``: from the cache, or trained (and cached) now.

    ``attn_implementation="eager"`` loads the same weights into a model that can return
    attention patterns (``output_attentions=True``). ``progress`` shows a bar while it
    trains (default: on a terminal, unless ``TORCHSURGEON_PROGRESS=0``; ``False`` never).
    """
    recipe = recipe or ToyRecipe()
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / f"toy-induction-{recipe.key()}.safetensors"
    seconds = 0.0
    if retrain or not path.exists():
        start = time.perf_counter()
        trained = _train(recipe, progress)
        seconds = time.perf_counter() - start
        loss, accuracy = _evaluate(trained, recipe)
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        metadata = {"recipe": json.dumps(dataclasses.asdict(recipe)), "loss": str(loss)}
        metadata["accuracy"] = str(accuracy)
        save_model(trained, str(partial), metadata=metadata)
        os.replace(partial, path)  # atomic: a concurrent reader sees all or nothing
    model = LlamaForCausalLM(recipe.config(attn_implementation))
    load_model(model, str(path))
    model.eval()
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return ToyModel(
        model, recipe, float(metadata["loss"]), float(metadata["accuracy"]), path, seconds
    )


def induction_pairs(
    n: int,
    *,
    task: InductionTask | None = None,
    period: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(clean, corrupted, correct, wrong)`` prompt pairs for patching an induction model.

    Each clean prompt holds a block of ``period`` distinct tokens and then its copy, cut
    before its last token: ``[prefix] A B ... Y Z [A B ... Y]`` — the induction answer is
    ``correct = Z``. The corrupted prompt replaces ``Z``'s earlier occurrence by a fresh
    token ``wrong``, so an induction head there predicts ``wrong``. Same length, one pair per
    row; ``LogitDiff(correct, wrong)`` is positive when the model copies.
    """
    task = task or InductionTask()
    generator = torch.Generator().manual_seed(seed)
    length = task.length - 1
    clean = torch.empty(n, length, dtype=torch.long)
    correct = torch.empty(n, dtype=torch.long)
    wrong = torch.empty(n, dtype=torch.long)
    for row in range(n):
        start = task.length - 2 * period  # the copy ends the sequence
        tokens = torch.randperm(task.vocab, generator=generator)
        block = tokens[start : start + period]
        sequence = torch.cat([tokens[:start], block, block[:-1]])
        clean[row] = sequence
        correct[row] = block[-1]
        wrong[row] = tokens[start + period]  # a token that appears nowhere in the prompt
    corrupted = clean.clone()
    corrupted[:, task.length - period - 1] = wrong
    return clean, corrupted, correct, wrong


def repeated_tokens(n: int, period: int, *, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """``[n, 2 * period]``: ``period`` distinct random tokens, then the same again."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.stack([torch.randperm(vocab, generator=generator)[:period] for _ in range(n)])
    return torch.cat([block, block], dim=1)


def induction_scores(model: LlamaForCausalLM, ids: torch.Tensor, period: int) -> torch.Tensor:
    """``[layer, head]``: mean attention from each second-copy position ``i`` to ``i - period
    + 1`` (the token after the current token's earlier occurrence), on repeated ``ids``.

    ``model`` must return attention patterns: load it with ``attn_implementation="eager"``.
    """
    with torch.no_grad():
        patterns = model(ids, output_attentions=True).attentions
    if not patterns or patterns[0] is None:
        raise ArgumentError(
            "the model returned no attention patterns; use attn_implementation='eager'"
        )
    query = torch.arange(period, ids.shape[1])
    return torch.stack(
        [pattern[:, :, query, query - period + 1].mean((0, 2)) for pattern in patterns]
    )
