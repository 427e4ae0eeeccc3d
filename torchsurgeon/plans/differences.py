"""Where two bases differ: a compact summary of a base, and the first difference of two.

A :class:`~torchsurgeon.plans.identity.BaseIdentity` holds hashes, which say *that* two
models differ. To say *where*, an identity also carries a :data:`Summary` — plain JSON that
travels in plan files and host listings, so a plan read from disk or sent to a host still
names the first module path whose class differs or that only one has, the first config
key with both values, or the first parameter or buffer whose name, shape, dtype or
sampled values differ:

- ``config``: each config key and a short text of its value (values longer than
  :data:`SHOWN` characters are cut and end with a digest of the whole, so two texts are
  equal only if the values are);
- ``modules``: ``"path|Class"`` for every node, in walk order;
- ``tensors``: ``"name|d0,d1|dtype|sample"`` for every parameter and buffer, ``sample``
  a short digest of the elements the fingerprint samples (``-`` on the meta device).

A list over :data:`MAX_ENTRIES` entries is left out (``None``), so a plan's size stays
bounded (a 70B Llama's summary is about 100 kB); a summary without a part just names less.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_CONFIG_KEYS",
    "MAX_ENTRIES",
    "MAX_ENTRY",
    "MAX_KEY",
    "SHOWN",
    "Summary",
    "describe",
    "first_config_difference",
    "first_structure_difference",
    "first_weight_difference",
    "summarize",
]

Summary = dict[str, Any]
"""``{"config": {key: text} | None, "modules": [...] | None, "tensors": [...] | None}``."""

SHOWN = 80  # characters of a config value shown in a message
MAX_ENTRIES = 8192  # modules or tensors listed in one summary
MAX_CONFIG_KEYS = 512
MAX_KEY = 256  # characters of a config key
MAX_ENTRY = 1024  # characters of one module or tensor entry
_SIZE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "n_layer",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "intermediate_size",
    "vocab_size",
)


def summarize(
    config: dict[str, Any] | None,
    modules: Iterable[tuple[str, str]],
    tensors: Iterable[tuple[str, list[int], str, bytes | None]],
) -> Summary:
    """The summary of a base from its config, ``(path, class)`` and tensor descriptions.

    Args:
        config: the config as the config hash sees it, or ``None``.
        modules: ``(path, class name)`` of every node, in walk order.
        tensors: ``(name, shape, dtype name, sampled bytes or None)`` of every tensor.
    """
    shown = None
    if config is not None and len(config) <= MAX_CONFIG_KEYS:
        shown = {str(k): _short(v) for k, v in sorted(config.items())}
        if not all(0 < len(k) <= MAX_KEY for k in shown):
            shown = None
    nodes = [f"{path}|{cls}" for path, cls in modules]
    described = [
        f"{name}|{','.join(map(str, shape))}|{dtype}|"
        + ("-" if sample is None else hashlib.sha256(sample).hexdigest()[:12])
        for name, shape, dtype, sample in tensors
    ]
    return {"config": shown, "modules": _bounded(nodes), "tensors": _bounded(described)}


def _bounded(entries: list[str]) -> list[str] | None:
    """``entries``, or ``None`` when there are too many or one is too long to travel."""
    fits = len(entries) <= MAX_ENTRIES and all(len(e) <= MAX_ENTRY for e in entries)
    return entries if fits else None


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) <= SHOWN:
        return text
    return text[: SHOWN - 16] + "...#" + hashlib.sha256(text.encode()).hexdigest()[:12]


def describe(architecture: str, summary: Summary | None, fingerprint: str | None) -> str:
    """One line naming a base: its class, its size keys and its fingerprint's short form."""
    config = summary.get("config") if isinstance(summary, dict) else None
    config = config if isinstance(config, dict) else {}
    sizes = ", ".join(f"{k}={config[k]}" for k in _SIZE_KEYS if k in config)
    weights = "no weights (structure only)" if fingerprint is None else fingerprint[:12]
    return f"a {architecture} ({sizes + '; ' if sizes else ''}fingerprint {weights})"


def _modules(summary: Summary) -> dict[str, str] | None:
    listed = summary.get("modules")
    return None if listed is None else dict(m.rsplit("|", 1) for m in listed)


def _tensors(summary: Summary) -> dict[str, list[str]] | None:
    listed = summary.get("tensors")
    if listed is None:
        return None
    parts = [t.rsplit("|", 3) for t in listed]
    return {p[0]: [p[1].replace(",", ", "), *p[2:]] for p in parts}


def _where(path: str) -> str:
    return repr(path) if path else "the root"


def first_structure_difference(plans: Summary, this: Summary) -> str | None:
    """The first module path (missing, extra, another class) or tensor shape that differs."""
    mine, theirs = _modules(plans), _modules(this)
    if mine is not None and theirs is not None:
        for path, cls in mine.items():
            other = theirs.get(path)
            if other is None:
                return f"{_where(path)} ({cls}) is missing from this base"
            if other != cls:
                return f"at {_where(path)} the plan's base has a {cls}, this base a {other}"
        extra = next((p for p in theirs if p not in mine), None)
        if extra is not None:
            return f"this base has an extra module {extra!r} ({theirs[extra]})"
    a, b = _tensors(plans), _tensors(this)
    if a is None or b is None:
        return None
    for name, (shape, _, _) in a.items():
        if name not in b:
            return f"tensor {name!r} is missing from this base"
        if shape != b[name][0]:
            return (
                f"tensor {name!r} has shape [{shape}] in the plan's base, [{b[name][0]}] in "
                "this base"
            )
    extra = next((n for n in b if n not in a), None)
    return None if extra is None else f"this base has an extra tensor {extra!r}"


def first_config_difference(plans: Summary, this: Summary) -> str | None:
    """The first config key (sorted) whose values differ, with both values."""
    a, b = plans.get("config"), this.get("config")
    if a is None or b is None:
        return None
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            shown = [v if v is not None else "(absent)" for v in (a.get(key), b.get(key))]
            return f"config key {key!r}: {shown[0]} in the plan's base, {shown[1]} in this base"
    return None


def first_weight_difference(plans: Summary, this: Summary) -> str | None:
    """The first parameter or buffer whose name, shape, dtype or sampled values differ."""
    a, b = _tensors(plans), _tensors(this)
    if a is None or b is None:
        return None
    for name, (shape, dtype, sample) in a.items():
        other = b.get(name)
        if other is None:
            return f"tensor {name!r} is missing from this base"
        if (shape, dtype) != tuple(other[:2]):
            return (
                f"tensor {name!r} is torch.{dtype} [{shape}] in the plan's base, "
                f"torch.{other[1]} [{other[0]}] in this base"
            )
        if "-" in (sample, other[2]):
            return None  # a structure-only side has no values to compare
        if sample != other[2]:
            return f"tensor {name!r}: values differ (a different checkpoint, or edited weights)"
    extra = next((n for n in b if n not in a), None)
    return None if extra is None else f"this base has an extra tensor {extra!r}"
