"""Loading a checkpoint: peak memory and time to first forward, torchsurgeon vs transformers.

The question a researcher with a large checkpoint asks: how much memory does loading take,
and how long until the first logits? The experiment writes a random-weight Llama checkpoint
(``LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
num_attention_heads=12, vocab_size=32000)``, untied, about 134M parameters, fp32, about
540 MB of safetensors) to a temporary directory, then loads it two ways, each in a fresh
Python process so that nothing is shared or cached in-process between runs:

``torchsurgeon``
    ``torchsurgeon.models.load(path)``: memory-maps the safetensors and builds the explicit
    model around the mapped tensors.
``transformers``
    ``AutoModelForCausalLM.from_pretrained(path)`` (default dtype: as stored).

Each child process first imports torch, torchsurgeon and transformers' Llama config and
modeling modules (both methods need transformers' config classes; importing them is a
fixed cost of about a second that the header reports apart) and records its resident
memory (``VmRSS``) as the baseline; then it loads, runs one forward pass on 1 x 16 token
ids, and reports the load time, the first-forward time and the peak resident memory
(``VmHWM``). The table's ``peak - baseline`` is what loading and one forward added;
``x ckpt`` divides it by the checkpoint's size on disk (the target is below 1.3). Memory-
mapped pages count in the resident set once touched, so a zero-copy load that has run a
forward pass costs about 1.0 x the checkpoint. Before timing, the parent checks that the
two loaded models give the same logits.

The checkpoint is read through the page cache. By default it is warm (just written);
``--cold`` evicts the file's pages before every run (``posix_fadvise(DONTNEED)``, no root
needed), so each load pays the disk read. Runs alternate methods; the table reports
medians over ``--repeats`` (and the largest peak).

    python benchmarks/load.py                  # the full run (about 2 minutes on 2 cores)
    python benchmarks/load.py --cold           # each run reads the file from disk
    python benchmarks/load.py --repeats 1      # one run each
    python benchmarks/load.py --small          # a smoke run on a tiny checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("torchsurgeon", "transformers")
FULL = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
SMALL = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_checkpoint(path: Path, sizes: dict[str, int]) -> int:
    """Save a seeded random Llama with ``sizes`` to ``path``; return its size in bytes."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**sizes, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def child(method: str, path: str, out: str | None) -> dict[str, Any]:
    """Run in a fresh process: load with ``method``, run one forward pass, report."""
    before_imports = _status_kib("VmRSS")
    start = time.perf_counter()
    import torch
    import transformers
    import transformers.models.llama.configuration_llama
    import transformers.models.llama.modeling_llama

    import torchsurgeon.models

    imports_s = time.perf_counter() - start
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    if method == "torchsurgeon":
        model = torchsurgeon.models.load(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    loaded = time.perf_counter()
    peak_load = _status_kib("VmHWM")
    with torch.inference_mode():
        logits = model(ids)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    done = time.perf_counter()
    if out is not None:
        torch.save(logits, out)
    return {
        "method": method,
        "imports_s": imports_s,
        "imports_kib": baseline - before_imports,
        "load_s": loaded - start,
        "forward_s": done - loaded,
        "baseline_kib": baseline,
        "peak_load_kib": peak_load,
        "peak_kib": _status_kib("VmHWM"),
    }


def evict_from_page_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s cached pages (a cold read next time); True if it could."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for file in path.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _spawn(
    method: str, path: Path, out: Path | None = None, *, cold: bool = False
) -> dict[str, Any]:
    if cold:
        evict_from_page_cache(path)
    command = [sys.executable, __file__, "--child", method, str(path)]
    if out is not None:
        command += ["--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{method} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_same_logits(path: Path, scratch: Path) -> float:
    import torch

    outs = {m: scratch / f"{m}.pt" for m in METHODS}
    for method in METHODS:
        _spawn(method, path, outs[method])
    a, b = (torch.load(outs[m]) for m in METHODS)
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"the two loads disagree: max abs logit difference {diff:.3g}")
    return diff


def _table(runs: list[dict[str, Any]], checkpoint_bytes: int) -> str:
    mib = 1024
    lines = [
        "| method | load s | first forward s | load + forward s | baseline MiB | "
        "peak MiB | peak - baseline MiB | x ckpt |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        load = statistics.median(r["load_s"] for r in mine)
        forward = statistics.median(r["forward_s"] for r in mine)
        total = statistics.median(r["load_s"] + r["forward_s"] for r in mine)
        baseline = statistics.median(r["baseline_kib"] for r in mine) / mib
        peak = max(r["peak_kib"] for r in mine) / mib
        added = max(r["peak_kib"] - r["baseline_kib"] for r in mine) / mib
        ratio = added * mib * 1024 / checkpoint_bytes
        lines.append(
            f"| {method} | {load:.2f} | {forward:.2f} | {total:.2f} | {baseline:.0f} | "
            f"{peak:.0f} | {added:.0f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoint, run every method ``--repeats`` times, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny checkpoint (smoke run)")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the checkpoint from the page cache before every run (posix_fadvise)",
    )
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.out)))
        return

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="ts_load_bench_") as scratch:
        path = Path(scratch) / "llama"
        size = write_checkpoint(path, SMALL if args.small else FULL)
        diff = _check_same_logits(path, Path(scratch))
        runs = [
            _spawn(method, path, cold=args.cold)
            for i in range(args.repeats)
            for method in (METHODS if i % 2 == 0 else METHODS[::-1])
        ]
    shards = "sharded" if (path / "model.safetensors.index.json").exists() else "one file"
    print(
        f"checkpoint: {size / 2**20:.0f} MiB of safetensors ({shards}), "
        f"{'small' if args.small else 'Llama ~134M params'}, fp32, "
        f"{'cold (evicted from the page cache before each run)' if args.cold else 'warm'} "
        "page cache; "
        f"logits of the two loads agree to {diff:.1e}"
    )
    imports = statistics.median(r["imports_s"] for r in runs)
    imports_mib = statistics.median(r["imports_kib"] for r in runs) / 1024
    print(
        f"imports before the baseline (torch, transformers' Llama modules, torchsurgeon): "
        f"{imports:.2f} s, {imports_mib:.0f} MiB"
    )
    print(
        f"machine: {platform.machine()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} torch threads; {args.repeats} runs per method (medians; "
        "peaks are the maximum)"
    )
    print()
    print(_table(runs, size))


if __name__ == "__main__":
    main()
