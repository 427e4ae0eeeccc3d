"""CUDA checks: what a GPU changes, checked against plain PyTorch on the same device.

CI never runs this (it has no GPU); run it by hand on a machine with one and record what it
prints in ``docs/benchmarks.md``. Every check builds seeded random tiny models from
``transformers`` configs (nothing downloaded) and compares torchsurgeon with an independent
reference on the *same device and dtype*:

``dtypes``
    GPT-2 and Llama in fp32, bf16 and fp16 on ``cuda:0``: ``ts.run`` of a rewrite
    (``SetValues`` on four MLP neurons at the last position, ``Save`` of the block outputs)
    against the ``transformers`` model with hand-written ``register_forward_hook`` code,
    and an empty rewrite against the bare model. Same kernels on both sides, so the max
    abs difference must be 0.
``device_map``
    a Llama checkpoint loaded with ``from_pretrained(..., device_map="auto")`` and with a
    ``max_memory`` that puts some layers on the GPU and the rest on the CPU (accelerate's
    dispatch hooks): the same rewrite against the same hooks on the same dispatched model,
    and the edit must change the logits (no silent bypass).
``compile``
    ``torch.compile`` of a rewritten model on CUDA (default mode, then
    ``fullgraph=True``): equal to eager within 1e-4 (fp32) and the saves equal.
``host``
    a host (``create_app`` + ``serve_in_thread`` on 127.0.0.1) serving a model on the GPU:
    a request through ``Client.run`` equals the local run, and the peak CUDA memory one
    request adds (``torch.cuda.max_memory_allocated`` around it) is printed.

Each check prints ``PASS`` / ``FAIL`` with its figures; the exit status is 1 if any failed,
2 without a CUDA device.

    python benchmarks/gpu_check.py              # every check (about a minute on one GPU)
    python benchmarks/gpu_check.py --only dtypes,compile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import torchsurgeon as ts

CHECKS = ("dtypes", "device_map", "compile", "host")
NEURONS = [3, 17, 40, 61]
VALUE = 4.0


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4,
        n_embd=128,
        n_head=4,
        vocab_size=512,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def sites(model: nn.Module) -> tuple[str, str]:
    """(the blocks' ``ModuleList`` path, the MLP output projection under a block)."""
    if hasattr(model, "transformer"):
        return "transformer.h", "mlp.c_proj"
    return "model.layers", "mlp.down_proj"


def probe(model: nn.Module) -> nn.Module:
    blocks, down = sites(model)
    tree = ts.select(ts.wrap(model)).at(f"{blocks}.*").insert_after(ts.layers.Save("b{layer}"))
    forced = ts.layers.SetValues(ts.idx[:, -1, NEURONS], VALUE)
    return ts.select(tree).at(f"{blocks}.1.{down}").insert_before(forced)


def hooked(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same experiment with plain forward hooks on the ``transformers`` model."""
    blocks, down = sites(model)
    layers = model.get_submodule(blocks)
    saved: dict[int, torch.Tensor] = {}
    handles = []

    def force(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[:, -1, NEURONS] = VALUE
        return (x, *args[1:])

    def saver(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            saved[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles.append(layers[1].get_submodule(down).register_forward_pre_hook(force))
    handles += [block.register_forward_hook(saver(i)) for i, block in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, [saved[i] for i in sorted(saved)]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------ checks


def check_dtypes(device: torch.device) -> list[str]:
    failures = []
    for build in (gpt2, llama):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model = build().to(device, dtype)
            ids = torch.randint(0, 512, (3, 12), device=device, generator=_gen(device))
            want_logits, want_saved = hooked(model, ids)
            with torch.no_grad():
                got = ts.run(probe(model), ids)
                empty = ts.run(ts.wrap(model), ids).output.logits
                bare = model(ids).logits
            saved = [got.saved[f"b{i}"] for i in range(len(want_saved))]
            worst = max(
                diff(got.output.logits, want_logits),
                *(diff(s, w) for s, w in zip(saved, want_saved, strict=True)),
            )
            name = f"{type(model).__name__} {str(dtype).removeprefix('torch.')}"
            moved = diff(got.output.logits, bare)
            ok = worst == 0.0 and diff(empty, bare) == 0.0 and moved > 0
            report(ok, "dtypes", f"{name}: rewrite vs hooks {worst:.3g}, empty vs bare "
                   f"{diff(empty, bare):.3g}, the edit moved logits {moved:.3g}")  # fmt: skip
            if not ok:
                failures.append(name)
    return failures


def check_device_map(device: torch.device) -> list[str]:
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama"
        llama().save_pretrained(path)
        maps = {"auto": {"device_map": "auto"}}
        maps["gpu+cpu"] = {"device_map": "auto", "max_memory": {0: "600KiB", "cpu": "4GiB"}}
        for name, options in maps.items():
            model = AutoModelForCausalLM.from_pretrained(path, **options).eval()
            placed = sorted({str(p.device) for p in model.parameters()})
            ids = torch.randint(0, 512, (2, 10), device=device, generator=_gen(device))
            want_logits, _ = hooked(model, ids)
            with torch.no_grad():
                got = ts.run(probe(model), ids).output.logits
                plain = model(ids).logits
            worst, changed = diff(got.to(want_logits.device), want_logits), diff(plain, want_logits)
            ok = worst <= 1e-5 and changed > 0
            report(ok, "device_map", f"{name} (parameters on {placed}): rewrite vs hooks "
                   f"{worst:.3g}, the edit moved the logits by {changed:.3g}")  # fmt: skip
            if not ok:
                failures.append(name)
    return failures


def check_compile(device: torch.device) -> list[str]:
    failures = []
    model = llama().to(device)
    tree = probe(model)
    ids = torch.randint(0, 512, (2, 16), device=device, generator=_gen(device))
    with torch.no_grad():
        eager = ts.run(tree, ids)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(tree, fullgraph=fullgraph)
        start = time.perf_counter()
        with torch.no_grad():
            got = ts.run(compiled, ids)
        took = time.perf_counter() - start
        worst = max(
            diff(got.output.logits, eager.output.logits),
            *(diff(got.saved[k], eager.saved[k]) for k in eager.saved),
        )
        ok = worst <= 1e-4 and set(got.saved) == set(eager.saved)
        report(ok, "compile", f"fullgraph={fullgraph}: vs eager {worst:.3g} (compiled and ran "
               f"in {took:.1f} s)")  # fmt: skip
        if not ok:
            failures.append(f"fullgraph={fullgraph}")
    return failures


def check_host(device: torch.device) -> list[str]:
    from torchsurgeon.remote import Client, create_app, serve_in_thread

    model = gpt2().to(device)
    tree = probe(model)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ts.run(tree, ids.to(device))
    app = create_app({"gpt2": model})
    with serve_in_thread(app) as server, Client(server.url, progress=False) as client:
        client.run(tree, ids)  # warm-up: the cost estimate, CUDA kernels
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        got = client.run(tree, ids)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    worst = max(
        diff(got.output["logits"], want.output.logits.cpu()),
        *(diff(got.saved[k], want.saved[k].cpu()) for k in want.saved),
    )
    ok = worst <= 1e-6
    report(ok, "host", f"Client.run vs local on {device}: {worst:.3g}; peak CUDA memory one "
           f"request added: {peak / 2**20:.1f} MiB")  # fmt: skip
    return [] if ok else ["host"]


# ------------------------------------------------------------------------------ harness


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def report(ok: bool, check: str, line: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {check:<10} {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"a subset of {CHECKS}")
    args = parser.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {CHECKS}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (this script is for a machine with a GPU)")
        return 2
    device = torch.device("cuda", 0)
    print(f"torchsurgeon {ts.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device)}", flush=True)  # fmt: skip
    checks = {
        "dtypes": check_dtypes,
        "device_map": check_device_map,
        "compile": check_compile,
        "host": check_host,
    }
    failed = []
    for name in chosen:
        try:
            failed += [f"{name}: {f}" for f in checks[name](device)]
        except Exception:  # a check that crashes is a failure with its traceback
            traceback.print_exc()
            report(False, name, "raised (traceback above)")
            failed.append(f"{name}: raised")
    print(f"\n{len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
