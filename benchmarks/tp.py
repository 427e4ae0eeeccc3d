"""Tensor parallel: what gathering costs at recording sites, against an unsharded run.

The experiment: a Llama-shaped model (``LlamaConfig(num_hidden_layers=4, hidden_size=256,
intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4)``, vocabulary 1024,
random seeded weights, eval mode, fp32, CPU) on a batch of 4 x 64 tokens, sharded with
``ts.distributed.parallelize(model, mesh, "auto")`` (q/k/v, gate/up column-wise; o, down
row-wise) over 1 and over 2 ranks (gloo, one torch thread per rank). Every call is
``ts.run(model, ids)`` under ``torch.no_grad()``:

``unsharded``
    the plain model on each rank, no recording layer (the baseline of every ratio);
``unsharded+save``
    the plain model with ``Save`` at every MLP hidden activation (``down_proj``'s input);
``tp``
    the sharded model, no recording layer;
``tp+save-sharded``
    the sharded model with the same ``Save`` at every ``down_proj`` input — a sharded site,
    so each call all-gathers the hidden activation of every layer (4 x 64 x 2048 fp32 =
    2 MiB per layer) and records it on every rank;
``tp+save-replicated``
    the sharded model with ``Save`` at every MLP *output* — a replicated site, nothing
    gathered;
``tp+save-inside``
    the sharded model with ``Save`` at every ``mlp.act_fn`` output — a site inside the MLP
    region, laid out by the region's ``DTensor`` twin (found on the first call of a shape,
    then looked up) and gathered as at ``down_proj``'s input;
``tp+save-inside-first``
    the same, with the layouts forgotten before each call: every region's twin runs on meta
    tensors again, what the first call at a new input shape pays.

Before anything is timed, the recorded activations of ``tp+save-sharded`` must equal
``unsharded+save``'s, those of ``tp+save-inside`` the unsharded model's at ``act_fn``
(max abs diff <= 1e-5), and the logits of every variant the unsharded model's. Timing is
interleaved: each repetition calls every variant once, in an order rotated by one per
repetition, after one warm-up round; every rank starts each call together (a barrier, not
timed) and rank 0's wall time (``time.perf_counter_ns``) is recorded. The table gives
medians, interquartile ranges and the ratio of medians to ``unsharded`` at the same world
size. With 2 ranks on a 2-core machine each rank has one
core; ``unsharded`` then runs on both ranks at once, so the machine is as loaded as in
``tp``.

    python benchmarks/tp.py              # 1 and 2 ranks (about 2 minutes on 2 cores)
    python benchmarks/tp.py --quick      # a smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from _timing import cpu_name, quartiles
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

import torchsurgeon as ts
import torchsurgeon.distributed as tsd
from torchsurgeon.distributed.parallelize import tensor_parallel_of

TOLERANCE = 1e-5
VARIANTS = (
    "unsharded",
    "unsharded+save",
    "tp",
    "tp+save-sharded",
    "tp+save-replicated",
    "tp+save-inside",
    "tp+save-inside-first",
)


def make_model(size: dict[str, int]) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=size["layers"],
        hidden_size=size["width"],
        intermediate_size=size["hidden"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"] // 2,
        vocab_size=size["vocab"],
        max_position_embeddings=max(64, size["positions"]),
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_at(model: Any, site: str) -> Any:
    mlps = ts.select(model).at_instances_of("LlamaMLP")
    if site == "hidden":
        return mlps.at("down_proj").insert_before(ts.layers.Save("hidden{layer}"))
    if site == "inside":
        return mlps.at("act_fn").insert_after(ts.layers.Save("act{layer}"))
    return mlps.insert_after(ts.layers.Save("out{layer}"))


def rank_main(size: dict[str, int], reps: int) -> dict[str, Any]:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(
        2,
        size["vocab"],
        (size["batch"], size["positions"]),
        generator=torch.Generator().manual_seed(1),
    )
    plain = ts.wrap(make_model(size))
    sharded = tsd.parallelize(make_model(size), mesh, "auto")
    models = {
        "unsharded": plain,
        "unsharded+save": save_at(plain, "hidden"),
        "tp": sharded,
        "tp+save-sharded": tsd.localize(save_at(sharded, "hidden")),
        "tp+save-replicated": tsd.localize(save_at(sharded, "out")),
        "tp+save-inside": tsd.localize(save_at(sharded, "inside")),
    }
    models["tp+save-inside-first"] = models["tp+save-inside"]
    probes = tensor_parallel_of(sharded).probes.values()

    def call(name: str) -> ts.Result:
        if name == "tp+save-inside-first":
            for probe in probes:
                probe._known.clear()  # found afresh: the twin of every region runs again
        with torch.no_grad():
            return ts.run(models[name], ids)

    results = {name: call(name) for name in VARIANTS}  # also the warm-up round
    with torch.no_grad():
        inside = ts.run(save_at(plain, "inside"), ids).saved
    checks = {
        f"{name} logits": (results[name].output.logits - results["unsharded"].output.logits)
        .abs()
        .max()
        .item()
        for name in VARIANTS
    }
    for key in results["unsharded+save"].saved:
        diff = results["tp+save-sharded"].saved[key] - results["unsharded+save"].saved[key]
        checks[f"saved {key}"] = diff.abs().max().item()
    for key, want in inside.items():
        checks[f"saved {key}"] = (results["tp+save-inside"].saved[key] - want).abs().max().item()
    recorded = sum(t.numel() * t.element_size() for t in results["tp+save-sharded"].saved.values())
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(reps):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            dist.barrier()
            start = time.perf_counter_ns()
            call(name)
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    regions = len(probes)
    return {
        "times": times,
        "checks": checks,
        "recorded": recorded,
        "world": world,
        "regions": regions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 reps")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.hidden, args.heads = 2, 32, 64, 4
        args.vocab, args.batch, args.positions, args.reps = 64, 2, 8, 2
    size = {
        k: getattr(args, k)
        for k in ("layers", "width", "hidden", "heads", "vocab", "batch", "positions")
    }
    print(
        f"model: Llama {args.layers} layers x {args.width} wide, MLP {args.hidden}, "
        f"{args.heads} heads, vocab {args.vocab}; batch {args.batch} x {args.positions}; "
        f"{args.reps} reps; ranks {args.worlds}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for world in args.worlds:
        out = tsd.launch(rank_main, size, args.reps, world_size=world, timeout=1800)
        worst = max(out["checks"].values())
        if worst > TOLERANCE:
            raise AssertionError(f"{world} rank(s): results differ: {out['checks']}")
        print(f"{world} rank(s): every variant agrees with the unsharded model (max {worst:.2g})")
        runs.append(out)

    print(f"\n{cpu_name()}, 1 torch thread per rank, torch {torch.__version__}, gloo\n")
    print("| ranks | variant | median ms | p25-p75 ms | x unsharded |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for out in runs:
        base = statistics.median(out["times"]["unsharded"])
        for name in VARIANTS:
            low, mid, high = quartiles(out["times"][name])
            print(
                f"| {out['world']} | {name} | {mid:.2f} | {low:.2f}-{high:.2f} | {mid / base:.3f} |"
            )
    print()
    for out in runs:
        times, world = out["times"], out["world"]
        sharded, plain = statistics.median(times["tp+save-sharded"]), statistics.median(times["tp"])
        received = out["recorded"] * (world - 1) / world / 2**20
        print(
            f"{world} rank(s): recording {out['recorded'] / 2**20:.1f} MiB per call at sharded "
            f"sites (each rank receives {received:.1f} MiB) adds {sharded - plain:.2f} ms to "
            f"the sharded run's median ({sharded / plain:.3f}x tp)"
        )
        found = statistics.median(times["tp+save-inside-first"])
        looked_up = statistics.median(times["tp+save-inside"])
        print(
            f"{world} rank(s): inside the MLP region (act_fn), the same recording adds "
            f"{looked_up - plain:.2f} ms once the layouts are known; finding them (the twin "
            f"of each of the {out['regions']} regions on meta tensors, once "
            f"per input shape) adds {found - looked_up:.2f} ms"
        )


if __name__ == "__main__":
    main()
