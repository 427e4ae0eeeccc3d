"""A cache of every module's output.

nnsight: ``tracer.cache()``. torchsurgeon: a ``Save`` after every module a selector
matches, keyed by its path: every module but the root and the ``ModuleList``s (which are
never called). A module returning a tuple is cached whole by nnsight and by its first
element (the primary tensor) here, so both sides compare the first element.
"""

from __future__ import annotations

from typing import Any

import torch

import torchsurgeon as ts


def nnsight_version(lm: Any, ids: torch.Tensor, f: Any) -> dict[str, torch.Tensor]:
    with lm.trace(ids) as tracer:
        cache = tracer.cache()
    outputs = {p.removeprefix("model."): cache[p].output for p in cache.keys() if p != "model"}  # noqa: SIM118
    return {path: out if torch.is_tensor(out) else out[0] for path, out in outputs.items()}


def ts_version(model: Any, ids: torch.Tensor, f: Any, run: Any) -> dict[str, torch.Tensor]:
    modules = ts.select(model).at("**").where((ts.path != "") & ~ts.instance_of("ModuleList"))
    return dict(run(modules.insert_after(ts.layers.Save("{path}")), ids).saved)
