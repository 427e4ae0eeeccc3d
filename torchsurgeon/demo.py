"""The demo: the seed experiment every researcher tries first, clean vs intervened.

Force a handful of MLP neurons on — in layers 12 and 13, set the input of the MLP's down
projection at ``[3:, -1, neurons]`` (batch rows 3 on, last position) to 5.0 — with clean
and intervened copies of the same prompts in one batch, and compare the top next tokens.
By default the model is a small Llama built from a ``transformers`` config with random
weights and a byte-level BPE tokenizer trained here on a few sentences (nothing is
downloaded); ``--model PATH`` runs the same on any local causal-LM checkpoint directory.
The rewritten model's tree is written as a standalone HTML picture.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import torchsurgeon as ts

__all__ = ["SEED_NEURONS", "DemoResult", "build_demo_model", "parse_neurons", "run_demo"]

SEED_NEURONS: dict[int, list[int]] = {12: [7171, 2519, 1786], 13: [9469, 7737]}
PROMPTS = ("The capital of France is", "The Eiffel Tower stands in", "My favourite colour is")
_CORPUS = (
    "The capital of France is Paris. The Eiffel Tower stands in Paris, on the Seine. "
    "The capital of Italy is Rome. My favourite colour is blue, and the sky is blue too. "
    "Researchers read the activations of neural networks to learn what they compute. "
    "A neuron in a language model may fire on cities, colours, or the end of a sentence. "
)
_DOWN_PROJECTIONS = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")


def parse_neurons(text: str) -> dict[int, list[int]]:
    """``"12:7171,2519;13:9469"`` -> ``{12: [7171, 2519], 13: [9469]}``."""
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        layer, _, neurons = part.partition(":")
        try:
            out[int(layer)] = [int(n) for n in neurons.split(",") if n.strip()]
        except ValueError as error:
            raise ValueError(
                f"--neurons: cannot read {part!r}; write e.g. '12:7171,2519;13:9469'"
            ) from error
        if not out[int(layer)]:
            raise ValueError(f"--neurons: layer {layer} lists no neurons")
    return out


def _train_tokenizer(directory: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_CORPUS] * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(directory)  # a local tokenizer, loaded back like any checkpoint's
    return fast


def build_demo_model(directory: Path, seed: int = 0) -> Path:
    """Write a small random-weight Llama (14 layers, 9472-wide MLPs) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=64,
        intermediate_size=9472,
        num_hidden_layers=14,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


@dataclass
class DemoResult:
    """What the demo computed: prompts, top-k tokens clean and intervened, the picture."""

    prompts: tuple[str, ...]
    clean_top: list[list[tuple[str, float]]]
    forced_top: list[list[tuple[str, float]]]
    max_clean_change: float
    html: Path | None


def _down_projection(mlp: nn.Module) -> str:
    for name in _DOWN_PROJECTIONS:
        if name in mlp._modules:
            return name
    raise ValueError(
        f"cannot find the down projection of {type(mlp).__name__} (children: "
        f"{', '.join(mlp._modules)}); expected one of {', '.join(_DOWN_PROJECTIONS)}"
    )


def force_neurons(model: nn.Module, neurons: dict[int, list[int]], rows_from: int) -> nn.Module:
    """The seed rewrite: the down projection's input at ``[rows_from:, -1, neurons]`` = 5.0."""
    probe = ts.wrap(model)
    mlps = ts.select(probe).at("**.mlp").where(ts.layer_index.isin(list(neurons)))
    layers = {int(p.split(".")[-2]): p for p in mlps.paths}
    missing = sorted(set(neurons) - set(layers))
    if missing:
        raise ValueError(
            f"the model has no MLP in layer(s) {missing}: it has {len(mlps.paths)} selected of "
            f"{ts.select(probe).at('**.mlp').count()} MLPs; pass --neurons for this model"
        )
    for layer, neuron_ids in neurons.items():
        down = _down_projection(ts.select(probe).at(layers[layer]).get())
        probe = (
            ts.select(probe)
            .at(layers[layer], down)
            .insert_before(ts.layers.SetValues(ts.idx[rows_from:, -1, neuron_ids], 5.0))
        )
    return probe


def run_demo(
    model_path: Path | None = None,
    neurons: dict[int, list[int]] | None = None,
    html_path: Path = Path("torchsurgeon-demo.html"),
    top_k: int = 5,
    console: Console | None = None,
) -> DemoResult:
    """Run the seed experiment and print the side-by-side table; see the module docstring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or Console()
    neurons = neurons or SEED_NEURONS
    with tempfile.TemporaryDirectory() as scratch:
        if model_path is None:
            console.print("Building a 14-layer random-weight Llama and a local tokenizer ...")
            model_path = build_demo_model(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last position is every prompt's next-token slot
    model = ts.wrap(hf_model)
    batch = tokenizer([*PROMPTS, *PROMPTS], return_tensors="pt", padding=True)
    rows = len(PROMPTS)
    probe = force_neurons(model, neurons, rows_from=rows)
    with torch.no_grad():
        clean = model(**batch).logits[:, -1]
        forced = ts.run(probe, **batch).output.logits[:, -1]

    def top(logits: torch.Tensor) -> list[list[tuple[str, float]]]:
        probs = logits.softmax(-1).topk(top_k)
        return [
            [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(probs.values, probs.indices, strict=True)
        ]

    clean_top, forced_top = top(clean[rows:]), top(forced[rows:])
    table = Table(title=f"Seed experiment: neurons {neurons} set to 5.0 (top-{top_k} next tokens)")
    table.add_column("prompt")
    table.add_column("clean")
    table.add_column("neurons forced")
    table.add_column("max |Δ logit|", justify="right")
    shifts = (forced[rows:] - clean[rows:]).abs().amax(-1)
    for prompt, a, b, shift in zip(PROMPTS, clean_top, forced_top, shifts, strict=True):
        table.add_row(
            prompt,
            "\n".join(f"{t!r} {p:.3f}" for t, p in a),
            "\n".join(f"{t!r} {p:.3f}" for t, p in b),
            f"{float(shift):.3g}",
        )
    console.print(table)
    unchanged = float((forced[:rows] - clean[:rows]).abs().max())
    console.print(f"clean rows 0-{rows - 1} max |change|: {unchanged:.3g} (expected 0)")
    html = _write_picture(probe, html_path, console)
    return DemoResult(PROMPTS, clean_top, forced_top, unchanged, html)


def _write_picture(probe: nn.Module, path: Path, console: Console) -> Path:
    from torchsurgeon import viz

    written = viz.to_html(probe, path)
    console.print(f"rewritten tree written to {written}")
    return Path(written)
