"""The demo: a trained antonym model whose answers change when chosen neurons are forced.

A small recipe (two layers, a second or two of training) keeps these tests fast; the real
default recipe runs once, marked slow. Every figure the demo prints is checked against an
independent reference: the saved checkpoint loaded with plain ``transformers``, forced with
a hand-written ``register_forward_pre_hook``, and its gradients taken with hand-written
hooks. Checkpoints for ``--model`` are random-weight models with narrow MLPs saved here.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from rich.console import Console

import torchsurgeon as ts
from torchsurgeon.demo import DemoError, DemoRecipe, antonym_model, parse_neurons, run_demo
from torchsurgeon.demo.antonyms import build_tokenizer, cache_dir, checkpoint_path, questions
from torchsurgeon.demo.forcing import (
    attribute,
    batch_of,
    check_neurons,
    inspect_checkpoint,
    load_checkpoint,
    needed,
)

SMALL = DemoRecipe(n_layer=2, n_inner=128, steps=60)
THREADS = torch.get_num_threads()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def small(cache: Path):
    return antonym_model(SMALL, directory=cache)


@pytest.fixture(scope="module")
def small_run(small, cache: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo-out")
    console = quiet()
    result = run_demo(
        recipe=SMALL,
        cache=cache,
        html_path=out / "demo.html",
        png_path=out / "demo.png",
        top_k=2,
        console=console,
    )
    return result, console.file.getvalue()


def plain(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def narrow_checkpoint(directory: Path, family: str = "llama", width: int = 96) -> Path:
    """A random-weight model with a narrow MLP and the demo's tokenizer, saved to disk."""
    tokenizer = build_tokenizer(DemoRecipe())
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=width,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_inner=width, n_layer=2, n_head=4,
            n_positions=64, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# -- the trained model ------------------------------------------------------------------------


def test_language_is_the_seed_format_with_one_token_answers() -> None:
    pairs = questions(DemoRecipe())
    assert ("Q: cheap\nA:", " expensive") in pairs and ("Q: big\nA:", " small") in pairs
    assert ("Q: expensive\nA:", " cheap") in pairs  # asked both ways
    assert len(pairs) == 2 * len(DemoRecipe().pairs) >= 48
    tokenizer = build_tokenizer(DemoRecipe())
    ids = tokenizer(" expensive", add_special_tokens=False).input_ids
    assert len(ids) == 1 and tokenizer.decode(ids) == " expensive"
    assert tokenizer.unk_token_id not in tokenizer("Q: cheap\nA: expensive").input_ids


def test_recipe_refuses_a_word_in_two_pairs() -> None:
    with pytest.raises(ValueError, match="more than one pair"):
        DemoRecipe(pairs=(("big", "small"), ("small", "tiny")))


def test_trained_model_answers_every_question(small) -> None:
    assert small.accuracy == 1.0 and small.n_questions == 2 * len(SMALL.pairs)
    model, tokenizer = plain(small.path)  # an ordinary checkpoint directory
    batch = tokenizer([q for q, _ in questions(SMALL)], return_tensors="pt")
    with torch.no_grad():
        answers = model(**batch).logits[:, -1].argmax(-1)
    assert [tokenizer.decode([int(a)]) for a in answers] == [a for _, a in questions(SMALL)]


def test_cache_is_reused_and_keyed_by_recipe_and_torch_version(
    small, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    again = antonym_model(SMALL, directory=cache)
    assert again.cached and not small.cached and again.path == small.path
    assert again.seconds == pytest.approx(small.seconds)  # read back, not retrained
    facts = json.loads((small.path / "demo.json").read_text())
    assert facts["torch"] == torch.__version__ and facts["accuracy"] == small.accuracy
    assert DemoRecipe(seed=1).key() != DemoRecipe().key()
    key = SMALL.key()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert SMALL.key() != key
    assert not list(cache.glob("*.partial"))  # written aside, renamed into place


def test_cache_dir_is_the_users(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCHSURGEON_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "torchsurgeon"
    assert checkpoint_path(SMALL).parent == tmp_path / "torchsurgeon"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "torchsurgeon"
    monkeypatch.setenv("TORCHSURGEON_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


def test_a_damaged_cache_says_how_to_recover(small, tmp_path: Path) -> None:
    damaged = checkpoint_path(SMALL, tmp_path)
    shutil.copytree(small.path, damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(DemoError, match=r"the cached demo model .* pass --retrain\): cannot load"):
        run_demo(recipe=SMALL, cache=tmp_path, console=quiet())
    out = tmp_path / "out"
    result = run_demo(recipe=SMALL, cache=tmp_path, retrain=True, console=quiet(),
                      html_path=out / "d.html", png_path=out / "d.png")  # fmt: skip
    assert result.trained is not None and not result.trained.cached
    assert result.max_clean_change == 0.0 and result.changed >= needed(len(result.prompts))


def test_the_remains_of_a_cache_without_its_facts_are_replaced(tmp_path: Path) -> None:
    remains = checkpoint_path(SMALL, tmp_path)
    remains.mkdir(parents=True)
    (remains / "model.safetensors").write_bytes(b"half a file")
    trained = antonym_model(SMALL, directory=tmp_path)
    assert not trained.cached and (remains / "demo.json").is_file()
    assert (remains / "model.safetensors").stat().st_size > 1000


def test_training_is_deterministic(small, tmp_path: Path) -> None:
    other = antonym_model(SMALL, directory=tmp_path)
    from safetensors.torch import load_file

    mine = load_file(small.path / "model.safetensors")
    theirs = load_file(other.path / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# -- the experiment ---------------------------------------------------------------------------


def test_forcing_flips_answers_and_leaves_clean_rows_exact(small_run) -> None:
    result, printed = small_run
    rows = len(result.prompts)
    assert rows == 8
    assert result.max_clean_change == 0.0
    changed = [c[0][0] != f[0][0] for c, f in zip(result.clean, result.forced, strict=True)]
    assert sum(changed) == result.changed >= needed(rows)
    assert result.to_target >= needed(rows)
    answer = dict(questions(SMALL))
    assert [c[0][0] for c in result.clean] == [answer[p] for p in result.prompts]
    assert "clean rows 0-7 max |change|: 0 (expected 0)" in printed
    assert f"answers changed: {result.changed}/8" in printed
    assert "' expensive' " in printed and "' small' " in printed
    assert "ts.idx[8:, -1," in printed  # the rewrite, printed as code


def test_table_matches_a_hand_written_hook_reference(small, small_run) -> None:
    result, _ = small_run
    model, tokenizer = plain(small.path)
    rows = len(result.prompts)
    batch = tokenizer(list(result.prompts) * 2, return_tensors="pt")
    handles = []
    for layer, chosen in result.neurons.items():

        def force(module, args, chosen=chosen):
            x = args[0].clone()
            x[rows:, -1, chosen] = result.value
            return (x, *args[1:])

        down = model.model.layers[layer].mlp.down_proj
        handles.append(down.register_forward_pre_hook(force))
    try:
        with torch.no_grad():
            forced = model(**batch).logits[:, -1].softmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        clean = model(**batch).logits[:, -1].softmax(-1)
    assert torch.equal(forced[:rows], clean[:rows])
    for row, (c, f) in enumerate(zip(result.clean, result.forced, strict=True)):
        top_clean, top_forced = clean[rows + row].topk(2), forced[rows + row].topk(2)
        assert [tokenizer.decode([int(i)]) for i in top_forced.indices] == [t for t, _ in f]
        assert [tokenizer.decode([int(i)]) for i in top_clean.indices] == [t for t, _ in c]
        assert [p for _, p in f] == pytest.approx(top_forced.values.tolist(), abs=1e-5)


def test_attribution_matches_hand_written_gradients(small) -> None:
    checkpoint = load_checkpoint(small.path)
    prompts = ["Q: cheap\nA:", "Q: hot\nA:", "Q: loud\nA:"]
    batch = batch_of(checkpoint.tokenizer, prompts)
    target = checkpoint.tokenizer(" small", add_special_tokens=False).input_ids[0]
    got = attribute(checkpoint, batch, target)

    model, _ = plain(small.path)
    inputs: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args):
            inputs[layer] = args[0]

        return hook

    layers = model.model.layers
    handles = [layers[i].mlp.down_proj.register_forward_pre_hook(keep(i)) for i in range(2)]
    try:
        logits = model(**batch).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    answers = logits.argmax(-1)
    difference = logits[:, target] - logits[torch.arange(3), answers]
    grads = torch.autograd.grad(difference.sum(), [inputs[0], inputs[1]])
    for layer in range(2):
        torch.testing.assert_close(got.activations[layer], inputs[layer][:, -1].detach())
        torch.testing.assert_close(got.gradients[layer], grads[layer][:, -1])
    torch.testing.assert_close(got.difference, difference.detach())


def test_demo_leaves_torch_and_transformers_as_it_found_them(small_run) -> None:
    from transformers.utils import logging

    assert torch.get_num_threads() == THREADS  # training ran on one thread, then restored
    assert logging.is_progress_bar_enabled()  # hidden while loading and saving only


def test_outputs_are_a_png_and_the_rewritten_tree(small_run) -> None:
    result, _ = small_run
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = result.html.read_text()
    assert "SetValues" in page and "down_proj" in page


def test_given_neurons_and_value_are_used(small, cache: Path, tmp_path: Path) -> None:
    result = run_demo(
        recipe=SMALL,
        cache=cache,
        neurons={1: [3, 5]},
        value=0.5,
        html_path=tmp_path / "d.html",
        png_path=tmp_path / "d.png",
        console=quiet(),
    )
    assert result.neurons == {1: [3, 5]} and result.value == 0.5
    assert result.max_clean_change == 0.0


def test_target_must_be_a_word_of_the_language(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="not a word of the demo model's language"):
        run_demo(recipe=SMALL, cache=cache, target="zzz", html_path=tmp_path / "d.html",
                 png_path=tmp_path / "d.png", console=quiet())  # fmt: skip


@pytest.mark.slow
def test_default_recipe_flips_most_answers(tmp_path: Path) -> None:
    console = quiet()
    result = run_demo(
        cache=tmp_path / "cache",
        html_path=tmp_path / "demo.html",
        png_path=tmp_path / "demo.png",
        console=console,
    )
    assert result.trained is not None and not result.trained.cached
    assert result.trained.recipe == DemoRecipe()
    assert result.trained.accuracy == 1.0
    rows = len(result.prompts)
    assert result.changed >= needed(rows) and result.to_target >= needed(rows)
    assert result.max_clean_change == 0.0
    assert "max |change|: 0 (expected 0)" in console.file.getvalue()


# -- any checkpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_path_picks_fitting_neurons(family: str, tmp_path: Path) -> None:
    path = narrow_checkpoint(tmp_path / family, family, width=96)
    result = run_demo(
        model_path=path, html_path=tmp_path / "d.html", png_path=tmp_path / "d.png",
        console=quiet(),
    )  # fmt: skip
    assert result.trained is None
    assert all(0 <= n < 96 for ns in result.neurons.values() for n in ns)
    assert sum(map(len, result.neurons.values())) == 8
    assert result.max_clean_change == 0.0


def test_neurons_are_checked_against_the_model_before_its_weights_load(tmp_path: Path) -> None:
    path = narrow_checkpoint(tmp_path / "narrow", width=1536)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")  # would fail to load
    with pytest.raises(DemoError, match=r"its MLP is 1536 wide \(neurons 0-1535\)"):
        run_demo(model_path=path, neurons={1: [7171, 2519]}, console=quiet())
    with pytest.raises(DemoError, match=r"layer 12 does not exist: the model has 3 layers \(0-2\)"):
        run_demo(model_path=path, neurons={12: [1]}, console=quiet())
    with pytest.raises(DemoError, match="cannot load the checkpoint"):
        run_demo(model_path=path, neurons={1: [1535]}, console=quiet())


def test_check_neurons_reads_the_meta_model(tmp_path: Path) -> None:
    shape = inspect_checkpoint(narrow_checkpoint(tmp_path / "n", width=40))
    assert shape.widths == (40, 40, 40)
    check_neurons({0: [0, 39], 2: [1]}, shape)
    with pytest.raises(DemoError, match="neuron"):
        check_neurons({0: [40]}, shape)
    with pytest.raises(DemoError, match="layer -1 does not exist"):
        check_neurons({-1: [0]}, shape)


def test_a_family_without_a_known_mlp_is_refused_from_its_config(tmp_path: Path) -> None:
    config = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, word_embed_proj_dim=16)  # fmt: skip
    config.save_pretrained(tmp_path)  # no weights at all: the check reads the config only
    with pytest.raises(DemoError, match="does not know where the MLPs of a OPTForCausalLM are"):
        inspect_checkpoint(tmp_path)


def test_checkpoint_errors_are_demo_errors(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="no such directory"):
        inspect_checkpoint(tmp_path / "missing")
    with pytest.raises(DemoError, match=r"no config\.json"):
        inspect_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DemoError, match="cannot read its config"):
        inspect_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:x", "cannot read"),
        ("1", "cannot read"),
        ("1:", "lists no neurons"),
        ("1:2;1:3", "listed twice"),
        ("1:2,2", "twice"),
        (";", "no layers"),
    ],
)
def test_parse_neurons_refuses(text: str, message: str) -> None:
    with pytest.raises(DemoError, match=message):
        parse_neurons(text)


def test_parse_neurons() -> None:
    assert parse_neurons("12:7171,2519;13:9469") == {12: [7171, 2519], 13: [9469]}
    assert parse_neurons(" 0: 1, 2 ; ") == {0: [1, 2]}


def test_demo_model_is_a_wrapped_frozen_tree(small) -> None:
    checkpoint = load_checkpoint(small.path)
    assert ts.is_frozen(checkpoint.model)
    assert checkpoint.shape.widths == (SMALL.n_inner,) * SMALL.n_layer
