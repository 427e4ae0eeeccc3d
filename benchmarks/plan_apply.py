"""``ts.plan`` and ``ts.apply`` before and after the base's identity is cached.

Both calls need the identity of the base (``ts.plan`` records it, ``ts.apply`` checks it);
fingerprinting samples a few elements of every tensor, tens of microseconds a tensor. A
frozen tree now remembers its identity while its nodes and tensors are unchanged (see
``torchsurgeon.plans.identity``), so only the first call on a base pays for it.

The model: a 4-block GPT-2 as the tests build it (``GPT2Config(n_layer=4, n_embd=W,
n_head=4, vocab_size=96, n_positions=256)``, random seeded weights, eval mode, fp32, CPU),
for W = 64 and 256. The plan: one step, ``ts.select(base).at("transformer.h.*")
.insert_after(Save("block{n}"))`` (four inserted layers). Timed, per width:

``plan``
    ``ts.plan(probe)``. *first*: the probe was made from a fresh tree (``ts.wrap(model)``,
    made before the clock starts), so its identity is computed; *cached*: the same probe
    again.
``apply``
    ``ts.apply(plan, base)``. *first*: ``base`` a fresh tree; *cached*: the same tree again.
``identity``
    ``identity_of(base)`` alone, fresh tree vs the same tree again.

A plain (unwrapped) model is never cached: ``ts.apply(plan, model)`` also wraps it, every
call; its row (``apply plain``) has no cached column.

Before timing, the script checks that a first and a cached identity, plan and applied model
agree, and prints ``first and cached calls agree``. Timing is interleaved: each repetition
calls every method once, in an order rotated by one per repetition, after a warm-up round;
each call is timed with ``time.perf_counter_ns`` with the garbage collector off (it runs
between calls, over what was made since the timing began: ``gc.freeze``).
The table gives medians, interquartile ranges and the ratio of medians.

    python benchmarks/plan_apply.py            # 400 repetitions per width (about 1 minute)
    python benchmarks/plan_apply.py --quick    # a smoke run: 64 wide, 5 repetitions
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from functools import partial

import torch
from _timing import cpu_name, quartiles
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts
from torchsurgeon.plans import identity_of

SEED = 0
Setup = Callable[[], Callable[[], object]]
"""Untimed preparation that returns the call to time."""


def make_model(width: int) -> nn.Module:
    torch.manual_seed(SEED)
    config = GPT2Config(
        n_layer=4, n_embd=width, n_head=4, vocab_size=96, n_positions=256, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def probe_of(base: nn.Module) -> nn.Module:
    return ts.select(base).at("transformer.h.*").insert_after(ts.layers.Save("block{n}"))


def methods(model: nn.Module) -> dict[str, Setup]:
    base = ts.wrap(model)
    probe = probe_of(base)
    plan = ts.plan(probe)
    # Each setup runs before the clock starts and hands back the call (a partial) to time.
    return {
        "plan first": lambda: partial(ts.plan, probe_of(ts.wrap(model))),
        "plan cached": lambda: partial(ts.plan, probe),
        "apply first": lambda: partial(ts.apply, plan, ts.wrap(model)),
        "apply cached": lambda: partial(ts.apply, plan, base),
        "identity first": lambda: partial(identity_of, ts.wrap(model)),
        "identity cached": lambda: partial(identity_of, base),
        "apply plain": lambda: partial(ts.apply, plan, model),
    }


def check(model: nn.Module) -> None:
    """First and cached calls give the same identity, plan and applied model."""
    base = ts.wrap(model)
    fresh = identity_of(base, cache=False)
    assert identity_of(base) == identity_of(base) == fresh == identity_of(model)
    probe = probe_of(base)
    plan = ts.plan(probe)
    assert ts.plan(probe) == plan == ts.plan(probe_of(ts.wrap(model)))
    assert plan.base == fresh
    for applied in (ts.apply(plan, base), ts.apply(plan, base), ts.apply(plan, ts.wrap(model))):
        assert ts.plan(applied) == plan


def measure(setups: dict[str, Setup], reps: int) -> dict[str, list[float]]:
    names = list(setups)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()  # what exists now (torch, transformers, the model) is never collected again
    try:
        for rep in range(-1, reps):  # rep -1 warms up
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                call = setups[name]()
                gc.collect()  # the trees dropped since: cheap, and never inside a timing
                gc.disable()
                start = time.perf_counter_ns()
                call()
                elapsed = (time.perf_counter_ns() - start) / 1e6
                gc.enable()
                if rep >= 0:
                    times[name].append(elapsed)
    finally:
        gc.enable()
        gc.unfreeze()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,256")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="64 wide, 5 repetitions")
    args = parser.parse_args()
    widths = [64] if args.quick else [int(w) for w in args.widths.split(",")]
    reps = 5 if args.quick else args.reps

    results: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        model = make_model(width)
        check(model)
        results[width] = measure(methods(model), reps)
        del model
    print("first and cached calls agree", flush=True)

    print(f"\n{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{reps} repetitions per width\n")
    print("| width | call | first ms | p25-p75 | cached ms | p25-p75 | first / cached |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for width, times in results.items():
        for call in ("plan", "apply", "identity"):
            q1, first, q3 = quartiles(times[f"{call} first"])
            c1, cached, c3 = quartiles(times[f"{call} cached"])
            print(
                f"| {width} | {call} | {first:.3f} | {q1:.3f}-{q3:.3f} | {cached:.3f} | "
                f"{c1:.3f}-{c3:.3f} | {first / cached:.1f}x |"
            )
        q1, plain, q3 = quartiles(times["apply plain"])
        print(f"| {width} | apply plain | {plain:.3f} | {q1:.3f}-{q3:.3f} | - | - | - |")


if __name__ == "__main__":
    main()
