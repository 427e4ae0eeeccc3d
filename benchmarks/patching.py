"""Batched activation patching: every (layer, position) of a sweep in one forward pass.

The experiment: activation patching of the residual stream after every block, at every
position, on a 12-block GPT-2-shaped model 256 wide (``GPT2Config(n_layer=12, n_embd=256,
n_head=8)``, GPT-2's 50257-token vocabulary, random seeded weights, eval mode, fp32, CPU),
one clean and one corrupted prompt of 16 tokens that differ at position 4, metric the logit
difference of two answer tokens at the last position — 12 x 16 = 192 patched runs. Every
method passes ``logits_to_keep=1``: only the last position is unembedded, as the metric needs.

``loop``
    What one writes by hand: cache the clean run's block outputs with forward hooks, then one
    forward pass of the corrupted prompt per site, a hook setting that site to the clean
    value — 194 forward passes of one row.
``batched``
    ``ts.methods.activation_patching(model, clean, corrupted, metric)``: one forward pass of
    the clean and corrupted prompts finds the sites where the two differ (in a causal model,
    positions 4 on: patching a site where they are equal changes nothing, so its effect is
    exactly 0 and it is not run), then the model is rewritten with one
    ``Patch(source_rows=[0], target_rows=[row], index=ts.idx[position])`` per remaining site
    — combined into one ``Patch`` table per block, inserted in one rewrite — and runs once,
    on a batch of 2 + 144 rows. The time includes both passes and the rewrite.
``batched-4``
    The same with ``max_rows=50``: after the probe, forward passes of up to 50 rows (three
    for the 144 sites; four for all 192).

Before anything is timed, the three must give the same 12 x 16 grid (``allclose`` at
1e-4); the script prints ``batched and per-site results agree``. Timing is interleaved: each
repetition calls every method once, in an order rotated by one per repetition, after one
warm-up round; each call is timed with ``time.perf_counter_ns``. The table gives the median
and interquartile range per method and the ratio of medians to the loop. ``rewrite ms`` is
the cost of building the batched model's layers alone (192 ``Patch`` edits combined into
one table per block, one rewrite; no forward pass).

    python benchmarks/patching.py            # the full run (about 2 minutes on 2 cores)
    python benchmarks/patching.py --quick    # a smoke run on a 2-block model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _timing import cpu_name, quartiles
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts
from torchsurgeon import methods
from torchsurgeon.methods.batching import insert_all

SEED = 0
CORRUPTED_AT = 4


def make_model(layers: int, width: int, heads: int, vocab: int, positions: int) -> nn.Module:
    torch.manual_seed(SEED)
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=max(positions, 16),
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def make_prompts(vocab: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    clean = torch.randint(0, vocab, (1, positions), generator=g)
    corrupted = clean.clone()
    corrupted[0, CORRUPTED_AT] = (clean[0, CORRUPTED_AT] + 1) % vocab
    return clean, corrupted


def loop_method(
    model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, metric: methods.Metric
) -> torch.Tensor:
    """One forward pass per site with plain hooks: the hand-written baseline."""
    blocks = model.transformer.h
    kept: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(i, o))
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        model(clean, logits_to_keep=1)
        for handle in handles:
            handle.remove()
        base = metric(model(corrupted, logits_to_keep=1).logits).mean()
        grid = torch.zeros(len(blocks), clean.shape[1])
        for layer, block in enumerate(blocks):
            for position in range(clean.shape[1]):

                def patch(
                    module: nn.Module,
                    args: Any,
                    output: torch.Tensor,
                    layer: int = layer,
                    position: int = position,
                ) -> torch.Tensor:
                    out = output.clone()
                    out[:, position] = kept[layer][:, position]
                    return out

                handle = block.register_forward_hook(patch)
                grid[layer, position] = metric(model(corrupted, logits_to_keep=1).logits).mean()
                handle.remove()
    return grid - base


def batched_method(
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: methods.Metric,
    max_rows: int | None,
) -> torch.Tensor:
    grid = methods.activation_patching(
        model, clean, corrupted, metric, max_rows=max_rows, forward_kwargs={"logits_to_keep": 1}
    )
    return grid.values


def rewrite_only(model: nn.Module, layers: int, positions: int) -> nn.Module:
    """The batched method's rewrite alone, for every site: no forward pass."""
    edits = [
        (
            f"transformer.h.{layer}",
            "insert_after",
            ts.layers.Patch([0], [2 + layer * positions + position], index=ts.idx[position]),
        )
        for layer in range(layers)
        for position in range(positions)
    ]
    return insert_all(model, edits)


def differing_sites(model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor) -> int:
    """How many (block, position) outputs differ between the clean and corrupted runs."""
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, []).append(o))
        for i, b in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        model(clean, logits_to_keep=1)
        model(corrupted, logits_to_keep=1)
    for handle in handles:
        handle.remove()
    return sum(int((a != b).any(-1).sum()) for a, b in outputs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 blocks, 64 wide, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.heads, args.vocab, args.positions, args.reps = (
            2,
            64,
            4,
            1000,
            8,
            2,
        )

    model = ts.wrap(make_model(args.layers, args.width, args.heads, args.vocab, args.positions))
    clean, corrupted = make_prompts(args.vocab, args.positions)
    metric = methods.LogitDiff(correct=11, wrong=12)
    sites = args.layers * args.positions
    chunk = max(3, (sites + 3) // 4 + 2)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "loop": lambda: loop_method(model, clean, corrupted, metric),
        "batched": lambda: batched_method(model, clean, corrupted, metric, None),
        "batched-4": lambda: batched_method(model, clean, corrupted, metric, chunk),
    }
    active = differing_sites(model, clean, corrupted)
    forwards = {"loop": sites + 2, "batched": 2, "batched-4": 1 + -(-active // (chunk - 2))}

    print(
        f"model: GPT2 {args.layers} blocks x {args.width} wide, {args.heads} heads, vocab "
        f"{args.vocab}; prompts 1 x {args.positions}; {sites} sites ({active} where clean "
        f"and corrupted differ); {args.reps} reps",
        flush=True,
    )
    results = {name: run() for name, run in runs.items()}  # also the warm-up round
    reference = results["loop"]
    for name, grid in results.items():
        if not torch.allclose(grid, reference, rtol=1e-4, atol=1e-4):
            raise AssertionError(
                f"{name} differs from the loop: max |diff| "
                f"{(grid - reference).abs().max().item():.3g}"
            )
    if reference.abs().max() == 0:
        raise AssertionError("the corruption had no effect on the metric")
    print("batched and per-site results agree", flush=True)

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter_ns()
            runs[name]()
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    rewrite_times = []
    for _ in range(max(3, args.reps)):
        start = time.perf_counter_ns()
        rewrite_only(model, args.layers, args.positions)
        rewrite_times.append((time.perf_counter_ns() - start) / 1e6)

    loop_median = statistics.median(times["loop"])
    print(f"\n{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| method | forward passes | median ms | p25-p75 ms | x loop |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        low, mid, high = quartiles(times[name])
        print(
            f"| {name} | {forwards[name]} | {mid:.1f} | {low:.1f}-{high:.1f} | "
            f"{mid / loop_median:.3f} |"
        )
    low, mid, high = quartiles(rewrite_times)
    print(
        f"\nrewrite ms ({sites} Patch edits as {args.layers} tables, no forward): {mid:.1f} "
        f"({low:.1f}-{high:.1f})"
    )
    print(
        f"speed-up of batched over loop: {loop_median / statistics.median(times['batched']):.2f}x"
    )


if __name__ == "__main__":
    main()
