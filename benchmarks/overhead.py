"""Intervention overhead: what it costs to save and steer a GPT-2 with each tool.

The experiment is the everyday interpretability one: run a GPT-2-small-shaped model
(``GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12))``, random seeded weights,
eval mode, fp32, CPU) on a batch of token ids, keep the output of every transformer block,
and add a steering vector to the output of the middle block (``transformer.h.6``). Block 6
is saved as it was *before* the steering; the logits come out steered. The same experiment
is written five ways and timed against the model doing nothing extra:

``bare``
    ``model(ids)``: no intervention at all. Every ratio in the table is against this.
``hooks``
    What one writes by hand: ``register_forward_hook`` on each block storing its output
    in a dict, and one more hook on block 6 returning ``output + vector``.
``nnsight``
    nnsight 0.8.1: ``with lm.trace(ids)`` saving ``block.output`` of each block and
    replacing block 6's output (the body is in ``benchmarks/_nnsight_experiment.py``,
    because nnsight reads the source of the trace).
``ts``
    torchsurgeon, eager: ``Save("block{n}")`` inserted after every block, ``Add(vector)``
    after block 6, timed call ``ts.run(probe, ids)``.
``ts-compile`` / ``ts-compile-fullgraph``
    The same probe under ``torch.compile(probe)`` (default mode), and with
    ``fullgraph=True``; timed call ``ts.run(compiled, ids)``. Compilation happens before
    timing, once per batch size (dynamo is reset between sizes, so each size gets a graph
    specialised to its shape rather than a dynamic-shape recompile).

Before anything is timed, every method is checked against the others: the steered logits
and the twelve saved block outputs must match (``allclose``), the steering must change the
logits, and with the vector zeroed every method's logits must equal the bare model's.

Timing is interleaved in one process: each repetition calls every method once, in an order
rotated by one per repetition, so drift in the machine (frequency, other processes, the
allocator) lands on all methods alike. After a warm-up, each call is timed with
``time.perf_counter_ns``. All calls run under ``torch.inference_mode()``.

How to read the table: ``median ms`` is the typical wall time of one call;
``p25-p75`` its interquartile range (how noisy it is); ``x bare`` the ratio of medians to
the bare model (1.00 = free); ``x hooks`` the same against the hand-written hooks, which is
the floor any hook-based tool can reach. On CPU a GPT-2-small forward pass is tens to
hundreds of milliseconds, so a per-call overhead of tens of microseconds shows as 1.00;
run with ``--width 64 --heads 4`` to shrink the model until the fixed per-call cost of each
tool is what the table shows.

    python benchmarks/overhead.py             # the full run (< 10 minutes on 2 cores)
    python benchmarks/overhead.py --quick     # a smoke run: few repetitions
    python benchmarks/overhead.py --layers 2 --width 64 --heads 4 --quick
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _timing import cpu_name
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts

Outcome = tuple[torch.Tensor, list[torch.Tensor]]  # logits, saved block outputs

METHODS = ("bare", "hooks", "nnsight", "ts", "ts-compile", "ts-compile-fullgraph")
DEFAULT_REPS = {(1, 8): 200, (4, 64): 80}
SEED = 0


@dataclass
class Method:
    """One way of running the experiment.

    ``call`` is exactly what is timed; ``outcome`` turns its result into the logits and
    saved block outputs for the equivalence check (not timed). ``prepare`` runs once per
    batch size before the check and the timing (``torch.compile`` compiles there).
    """

    name: str
    call: Callable[[torch.Tensor], Any]
    outcome: Callable[[Any], Outcome]
    prepare: Callable[[torch.Tensor], None] = lambda ids: None
    times_ns: dict[tuple[int, int], list[int]] = field(default_factory=dict)


# ------------------------------------------------------------------------- the methods


def bare_method(model: nn.Module) -> Method:
    return Method("bare", lambda ids: model(ids), lambda out: (out.logits, []))


def module_copy(model: nn.Module) -> nn.Module:
    """A new module tree holding the very same parameter and buffer tensors as ``model``.

    Every method runs on the same weights in memory: on a CPU whose last-level cache holds
    a good part of the model, a method with a copy of its own would pay cache misses that
    the others do not, and the table would show memory placement, not intervention cost.
    """
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def hooks_method(model: nn.Module, vector: torch.Tensor, steer_at: int) -> Method:
    """Plain forward hooks on a copy of the module tree (so ``bare`` stays bare)."""
    model = module_copy(model)
    saved: dict[int, torch.Tensor] = {}

    def saver(i: int) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            saved[i] = output

        return hook

    def steer(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + vector

    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(saver(i))
    model.transformer.h[steer_at].register_forward_hook(steer)  # after block 6's saver

    def call(ids: torch.Tensor) -> tuple[Any, dict[int, torch.Tensor]]:
        saved.clear()
        output = model(ids)
        return output, dict(saved)

    return Method("hooks", call, lambda r: (r[0].logits, [r[1][i] for i in sorted(r[1])]))


def nnsight_method(model: nn.Module, vector: torch.Tensor, steer_at: int) -> Method:
    """nnsight on a copy of the module tree (it instruments the modules it wraps)."""
    from nnsight import NNsight

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _nnsight_experiment import run_nnsight

    lm = NNsight(module_copy(model))
    return Method("nnsight", lambda ids: run_nnsight(lm, ids, vector, steer_at), lambda r: r)


def build_probe(model: nn.Module, vector: torch.Tensor, steer_at: int) -> nn.Module:
    probe = ts.select(ts.wrap(model)).at("transformer.h.*").insert_after(ts.layers.Save("block{n}"))
    return ts.select(probe).at(f"transformer.h.{steer_at}").insert_after(ts.layers.Add(vector))


def ts_outcome(result: ts.Result) -> Outcome:
    saved = result.saved
    return result.output.logits, [saved[f"block{i}"] for i in range(len(saved))]


def ts_method(probe: nn.Module) -> Method:
    return Method("ts", lambda ids: ts.run(probe, ids), ts_outcome)


def ts_compiled_method(probe: nn.Module, fullgraph: bool) -> Method:
    """``torch.compile(probe)``; compiled afresh (and warmed) for each batch size."""
    name = "ts-compile-fullgraph" if fullgraph else "ts-compile"
    holder: dict[str, Any] = {}

    def prepare(ids: torch.Tensor) -> None:
        holder["compiled"] = torch.compile(probe, fullgraph=fullgraph)
        start = time.perf_counter()
        ts.run(holder["compiled"], ids)
        print(f"  {name}: compiled in {time.perf_counter() - start:.1f} s", flush=True)

    return Method(name, lambda ids: ts.run(holder["compiled"], ids), ts_outcome, prepare)


# ------------------------------------------------------------------------- the harness


def check_equivalent(methods: Sequence[Method], ids: torch.Tensor, vector: torch.Tensor) -> None:
    """Raise unless every method computes the same experiment (see the module docstring)."""
    outcomes = {m.name: m.outcome(m.call(ids)) for m in methods}
    bare = outcomes.pop("bare", None)
    if not outcomes:
        return
    ref_name, (ref_logits, ref_saved) = next(iter(outcomes.items()))
    for name, (logits, saved) in outcomes.items():
        _assert_close(logits, ref_logits, f"{name} vs {ref_name}: logits")
        if len(saved) != len(ref_saved):
            raise AssertionError(f"{name} saved {len(saved)} blocks, {ref_name} {len(ref_saved)}")
        for i, (a, b) in enumerate(zip(saved, ref_saved, strict=True)):
            _assert_close(a, b, f"{name} vs {ref_name}: block {i} output")
    if bare is None:
        return
    if torch.allclose(bare[0], ref_logits, rtol=1e-4, atol=1e-4):
        raise AssertionError("the steering vector did not change the logits")
    kept = vector.clone()
    vector.zero_()  # every method holds this very tensor: with it zeroed, all must be bare
    try:
        for method in methods:
            logits = method.outcome(method.call(ids))[0]
            _assert_close(logits, bare[0], f"{method.name} with a zero vector vs bare: logits")
    finally:
        vector.copy_(kept)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Loose enough for inductor's fused kernels (observed differences are ~1e-6).
    if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"{what} differ (max abs difference {diff:.3g})")


def time_size(
    methods: Sequence[Method], ids: torch.Tensor, vector: torch.Tensor, reps: int, warmup: int
) -> None:
    """Prepare, check, warm up, then time every method ``reps`` times, interleaved."""
    size = (ids.shape[0], ids.shape[1])
    label = f"{size[0]}x{size[1]}"
    print(f"[{label}] preparing", flush=True)
    torch._dynamo.reset()
    # fullgraph first: it traces the model itself, so a graph break would fail here loudly;
    # the default-mode compile then finds the same graph in dynamo's cache.
    for method in sorted(methods, key=lambda m: m.name != "ts-compile-fullgraph"):
        method.prepare(ids)
    check_equivalent(methods, ids, vector)
    print(f"[{label}] all methods agree (logits and saved block outputs)", flush=True)
    for _ in range(warmup):
        for method in methods:
            method.call(ids)
    for method in methods:
        method.times_ns[size] = []
    gc.collect()
    start = time.perf_counter()
    step = max(1, reps // 10)
    for rep in range(reps):
        shift = rep % len(methods)
        for method in (*methods[shift:], *methods[:shift]):
            begin = time.perf_counter_ns()
            method.call(ids)
            method.times_ns[size].append(time.perf_counter_ns() - begin)
        if (rep + 1) % step == 0 or rep + 1 == reps:
            print(
                f"[{label}] {rep + 1}/{reps} repetitions, {time.perf_counter() - start:.0f} s",
                flush=True,
            )


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(methods: Sequence[Method], sizes: Sequence[tuple[int, int]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| method | size | median ms | p25-p75 ms | x bare | x hooks |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for size in sizes:
        medians = {
            m.name: statistics.median(m.times_ns[size]) / 1e6 for m in methods if size in m.times_ns
        }
        for method in methods:
            if size not in method.times_ns:
                continue
            ms = [t / 1e6 for t in method.times_ns[size]]
            median = medians[method.name]
            ratios = [
                f"{median / medians[base]:.3f}" if base in medians else "-"
                for base in ("bare", "hooks")
            ]
            lines.append(
                f"| {method.name} | {size[0]}x{size[1]} | {median:.2f} | "
                f"{quantile(ms, 0.25):.2f}-{quantile(ms, 0.75):.2f} | {' | '.join(ratios)} |"
            )
    return "\n".join(lines)


def versions() -> str:
    found = []
    for name in ("torch", "transformers", "nnsight"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def parse_size(text: str) -> tuple[int, int]:
    batch, _, tokens = text.partition("x")
    return int(batch), int(tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12)")
    parser.add_argument("--width", type=int, default=768, help="hidden size (768)")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (12)")
    parser.add_argument("--sizes", default="1x8,4x64", help="batch x tokens, comma-separated")
    parser.add_argument("--reps", type=int, help="repetitions per size (default: 200 / 80)")
    parser.add_argument("--warmup", type=int, help="untimed rounds before timing (default 5)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    args = parser.parse_args(argv)

    names = [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    if "nnsight" in names:
        try:
            import nnsight  # noqa: F401
        except ImportError:
            print("nnsight is not installed (pip install -e '.[bench]'): skipping it", flush=True)
            names.remove("nnsight")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    steer_at = args.layers // 2

    print(
        f"{cpu_name()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, {versions()}",
        flush=True,
    )
    print(f"model: GPT-2, {args.layers} layers, width {args.width}, {args.heads} heads", flush=True)
    torch.manual_seed(SEED)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads)
    model = GPT2LMHeadModel(config).eval()
    vector = torch.randn(args.width, generator=torch.Generator().manual_seed(SEED + 1))
    probe = build_probe(model, vector, steer_at)
    makers: dict[str, Callable[[], Method]] = {
        "bare": lambda: bare_method(model),
        "hooks": lambda: hooks_method(model, vector, steer_at),
        "nnsight": lambda: nnsight_method(model, vector, steer_at),
        "ts": lambda: ts_method(probe),
        "ts-compile": lambda: ts_compiled_method(probe, fullgraph=False),
        "ts-compile-fullgraph": lambda: ts_compiled_method(probe, fullgraph=True),
    }
    methods = [makers[name]() for name in METHODS if name in names]

    started = time.perf_counter()
    with torch.inference_mode():
        for size in sizes:
            ids = torch.randint(
                config.vocab_size, size, generator=torch.Generator().manual_seed(SEED + 2)
            )
            reps = args.reps or (3 if args.quick else DEFAULT_REPS.get(size, 50))
            warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
            time_size(methods, ids, vector, reps, warmup)
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n", flush=True)
    print(table(methods, sizes), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
