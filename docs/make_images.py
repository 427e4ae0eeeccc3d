"""Draw the figures of ``docs/methods.md`` into ``docs/images/`` (small PNGs, committed).

Each figure is one method run on the toy induction model of ``torchsurgeon.methods.toy``
(trained in seconds, cached in the temp directory), with the same code the page shows.
Run from the repository root:

    python docs/make_images.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import torchsurgeon as ts
from torchsurgeon import methods
from torchsurgeon.methods import plots, toy

IMAGES = Path(__file__).resolve().parent / "images"


def main() -> None:
    start = time.perf_counter()
    trained = toy.induction_model()
    model = ts.wrap(trained.model)
    print(f"toy model: held-out copy accuracy {trained.accuracy:.4f}, loss {trained.loss:.4f}")

    # Activation patching: clean prompts copy a block, corrupted ones change the token after
    # the earlier occurrence of the last token.
    clean, corrupted, correct, wrong = toy.induction_pairs(16, seed=3)
    metric = methods.LogitDiff(correct, wrong)
    tail = slice(14, None)  # the last 17 positions: the block and its copy
    resid = methods.activation_patching(model, clean[:, tail], corrupted[:, tail], metric)
    plots.heatmap(resid, normalized=True, path=IMAGES / "patching_resid.png")
    heads = methods.activation_patching(model, clean, corrupted, metric, over="heads")
    plots.heatmap(heads, path=IMAGES / "patching_heads.png")
    print("top heads by patching:", heads.top(3))

    # Attribution patching against the real thing, head by head.
    estimate = methods.attribution_patching(model, clean, corrupted, metric, over="heads")
    plots.scatter(estimate, heads, path=IMAGES / "attribution_vs_patching.png")

    # Causal tracing: noise the first copy's "Y Z" (the last token's earlier occurrence and
    # the answer after it), restore one hidden state at a time.
    prompt = clean[0, tail]
    traced = methods.causal_tracing(model, prompt, subject=[8, 9], samples=8)
    plots.heatmap(traced, path=IMAGES / "causal_tracing.png")

    # Head knockout on the clean prompts.
    knocked = methods.head_knockout(model, clean, metric)
    plots.heatmap(knocked, path=IMAGES / "head_knockout.png")

    # The logit lens of one prompt.
    lens = methods.logit_lens(model, prompt)
    plots.token_table(lens, path=IMAGES / "logit_lens.png")

    # Neuron forcing.
    forced = methods.force_neurons(model, clean[:4], {1: [3, 17, 40]}, 5.0, rows=slice(2, None))
    plots.token_shift(forced, path=IMAGES / "neuron_forcing.png")

    # Probes: is the token induction predicts next in the lower half of the vocabulary?
    batch = trained.recipe.task.sample(1024, torch.Generator().manual_seed(7))
    sequences = batch.ids[batch.mask[:, -1]]  # the last token is a repeat
    upper = (sequences[:, -1] < 32).long()
    probe = methods.train_probe(model, sequences[:, :-1], upper, position=-1)
    plots.probe_accuracy(probe, path=IMAGES / "probe_accuracy.png")

    # LoRA: teach the copying model to count (each token followed by its successor).
    g = torch.Generator().manual_seed(0)
    counting = (torch.randint(0, 64, (256, 1), generator=g) + torch.arange(16)) % 64
    lora = methods.train_lora(
        model, counting, targets="model.layers.*.**.*_proj", rank=8, steps=150, batch_size=64
    )
    plots.loss_curve(lora, path=IMAGES / "lora_loss.png")

    sizes = {p.name: p.stat().st_size // 1024 for p in sorted(IMAGES.glob("*.png"))}
    print(f"wrote {len(sizes)} images ({sizes} KiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
