"""The demo's model: a small Llama that answers antonym questions, trained here in seconds.

A newcomer learns nothing from forcing neurons of a random-weight model: its "answers" are
byte tokens. So the demo trains a model with real, checkable behaviour on a synthetic
question-answer language in the seed experiment's format — ``'Q: cheap\\nA:'`` is answered
``' expensive'``, ``'Q: big\\nA:'`` ``' small'`` — over a few dozen antonym pairs, asked in
both directions. The tokenizer is word-level (GPT-2's byte-level pre-tokenizer, one token per
word with its leading space), built from those sentences here, so every answer is one token
and reads as a word. Nothing is downloaded.

Training is seeded, full-batch (every question, every step; the loss is on the answer
token only) and on one thread (the matrices are tiny: a second thread costs more in
synchronisation than it saves, and much more on a busy machine), so a recipe gives the same
weights on a given machine. The
result is an ordinary checkpoint directory — ``config.json``, ``model.safetensors`` and the
tokenizer files, plus ``demo.json`` with the recipe, the accuracy and the training time —
that ``AutoModelForCausalLM.from_pretrained`` and ``torchsurgeon demo --model`` load like any
other. It is cached under ``$TORCHSURGEON_CACHE`` or the user's cache directory
(``$XDG_CACHE_HOME``, else ``~/.cache``, then ``torchsurgeon/``), in a folder named by a hash
of the recipe and the torch and transformers versions; it is written to a temporary folder
and renamed into place, so a concurrent reader sees all of it or none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from torchsurgeon.surgery.errors import SurgeryError

__all__ = [
    "ANTONYMS",
    "DemoRecipe",
    "TrainedModel",
    "antonym_model",
    "build_tokenizer",
    "cache_dir",
    "checkpoint_path",
    "prompt",
    "questions",
    "quiet_transformers",
]

_FORMAT = 1  # bump when the training code changes what a recipe produces

ANTONYMS: tuple[tuple[str, str], ...] = (
    ("big", "small"),
    ("cheap", "expensive"),
    ("hot", "cold"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("early", "late"),
    ("light", "dark"),
    ("open", "closed"),
    ("old", "young"),
    ("hard", "soft"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("tall", "short"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("full", "empty"),
    ("thick", "thin"),
    ("wide", "narrow"),
    ("clean", "dirty"),
    ("high", "low"),
    ("good", "bad"),
    ("first", "last"),
    ("win", "lose"),
    ("push", "pull"),
    ("day", "night"),
    ("black", "white"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("love", "hate"),
    ("buy", "sell"),
    ("true", "false"),
    ("alive", "dead"),
    ("begin", "end"),
    ("inside", "outside"),
    ("friend", "enemy"),
)
"""The language's word pairs; each is asked both ways (``big`` -> ``small``, ``small`` ->
``big``), so no word may appear in two pairs."""

_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No ``transformers`` progress bars (loading, saving) inside; restored after."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def prompt(word: str) -> str:
    """The question about ``word``: ``'Q: word\\nA:'`` (the answer follows with a space)."""
    return f"Q: {word}\nA:"


class DemoError(SurgeryError, ValueError):
    """A problem with the demo's arguments or checkpoint, said in one line."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that determines the demo model: the language, the architecture, training."""

    pairs: tuple[tuple[str, str], ...] = ANTONYMS
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_inner: int = 512
    steps: int = 100
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        words = [w for pair in self.pairs for w in pair]
        repeated = sorted({w for w in words if words.count(w) > 1})
        if repeated:
            raise DemoError(
                f"DemoRecipe.pairs: {repeated} appear in more than one pair; list each word once"
            )
        if not all(w.isalpha() and w.islower() for w in words):
            raise DemoError(
                "DemoRecipe.pairs: words must be lower-case letters only, e.g. ('big', 'small')"
            )
        if self.threads < 1 or self.steps < 1:
            raise DemoError(
                f"DemoRecipe.threads and .steps must be at least 1, got threads={self.threads}, "
                f"steps={self.steps}"
            )

    def key(self) -> str:
        """A hash of the recipe, the training code's format and the torch/transformers
        versions (other versions may train other weights)."""
        facts = {
            "format": _FORMAT,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **dataclasses.asdict(self),
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def questions(recipe: DemoRecipe) -> list[tuple[str, str]]:
    """``(prompt, answer)`` for every pair, both ways: ``('Q: big\\nA:', ' small')``, ..."""
    pairs = [*recipe.pairs, *((b, a) for a, b in recipe.pairs)]
    return [(prompt(a), f" {b}") for a, b in pairs]


@dataclass(frozen=True)
class TrainedModel:
    """The checkpoint directory of a trained recipe and what training measured.

    ``accuracy`` is the share of :func:`questions` the model answers right (greedy next
    token); ``seconds`` is how long training took when it ran (read back from the cache
    otherwise); ``cached`` says whether this call found it on disk.
    """

    path: Path
    recipe: DemoRecipe
    accuracy: float
    n_questions: int
    seconds: float
    cached: bool


def cache_dir() -> Path:
    """``$TORCHSURGEON_CACHE``, else ``$XDG_CACHE_HOME/torchsurgeon``, else
    ``~/.cache/torchsurgeon``."""
    root = os.environ.get("TORCHSURGEON_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torchsurgeon"


def build_tokenizer(recipe: DemoRecipe) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of the recipe's language (``' expensive'`` is one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [question + answer for question, answer in questions(recipe)]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(_SPECIAL)))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def _config(recipe: DemoRecipe, vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.n_embd,
        intermediate_size=recipe.n_inner,
        num_hidden_layers=recipe.n_layer,
        num_attention_heads=recipe.n_head,
        num_key_value_heads=recipe.n_head,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _encode(
    tokenizer: transformers.PreTrainedTokenizerFast, recipe: DemoRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt ids [n, pos], answer ids [n])``; every prompt has the same length."""
    pairs = questions(recipe)
    ids = [tokenizer(q + a, add_special_tokens=False).input_ids for q, a in pairs]
    if len({len(row) for row in ids}) != 1:
        raise DemoError(
            "tokenizer: the demo language's sentences differ in length; build it with "
            "build_tokenizer(recipe)"
        )
    batch = torch.tensor(ids)
    return batch[:, :-1], batch[:, -1]


def _train(
    recipe: DemoRecipe, vocab: int, prompts: torch.Tensor, answers: torch.Tensor
) -> transformers.LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):  # seed the initialisation, leave the caller's RNG
        torch.manual_seed(recipe.seed)
        model = transformers.LlamaForCausalLM(_config(recipe, vocab))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)  # tiny matrices: one thread is fastest, and steady
    try:
        for _ in range(recipe.steps):
            logits = model(prompts).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, answers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def checkpoint_path(recipe: DemoRecipe | None = None, directory: Path | str | None = None) -> Path:
    """Where :func:`antonym_model` keeps the checkpoint of ``recipe``."""
    folder = Path(directory) if directory is not None else cache_dir()
    return folder / f"antonyms-{(recipe or DemoRecipe()).key()}"


def antonym_model(
    recipe: DemoRecipe | None = None,
    *,
    directory: Path | str | None = None,
    retrain: bool = False,
) -> TrainedModel:
    """The checkpoint of ``recipe``: from the cache in ``directory`` (default
    :func:`cache_dir`), or trained and cached now (always, with ``retrain``)."""
    recipe = recipe or DemoRecipe()
    path = checkpoint_path(recipe, directory)
    folder = path.parent
    facts_file = path / "demo.json"
    if not retrain and facts_file.is_file():
        facts = json.loads(facts_file.read_text())
        return TrainedModel(
            path, recipe, facts["accuracy"], facts["questions"], facts["seconds"], True
        )
    tokenizer = build_tokenizer(recipe)
    prompts, answers = _encode(tokenizer, recipe)
    start = time.perf_counter()
    model = _train(recipe, len(tokenizer), prompts, answers)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(prompts).logits[:, -1].argmax(-1) == answers).float().mean())
    facts = {
        "recipe": dataclasses.asdict(recipe),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accuracy": accuracy,
        "questions": len(answers),
        "seconds": seconds,
    }
    folder.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".partial", dir=folder))
    try:
        with quiet_transformers():
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        (partial / "demo.json").write_text(json.dumps(facts, indent=1) + "\n")
        if retrain or not facts_file.is_file():  # else another process just finished it
            if path.exists():  # the copy being retrained, or the remains of a damaged one
                shutil.rmtree(path)
            os.replace(partial, path)  # atomic for a reader: all of it or none
    except OSError:
        if not facts_file.is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return TrainedModel(path, recipe, accuracy, len(answers), seconds, False)
