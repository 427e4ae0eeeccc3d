"""Shared material of the host hardening and fuzz tests: a tokenizer, raw files, RSS.

A hostile request is often not one ``encode_request`` can make — a number JSON cannot
hold, a header that lies — so these helpers build plan and request files from raw JSON
text, and measure this process's resident memory (the hosts under test run in it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from torchsurgeon.plans import Plan
from torchsurgeon.plans.wire import METADATA_KEY
from torchsurgeon.remote.transfer import REQUEST_KEY

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "plans"]
"""The tokenizer's words: ids 2, 3, ... ([PAD] is 0, [UNK] is 1)."""


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over ``WORDS`` that pads on the right (as many do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", padding_side="right"
    ).save_pretrained(directory)


def raw_plan(recorded: Plan, edit: Callable[[str], str] | None = None) -> bytes:
    """The plan's file with its manifest JSON text passed through ``edit`` (raw text)."""
    manifest, tensors = recorded.manifest()
    text = json.dumps(manifest)
    if edit is not None:
        text = edit(text)
    return raw_file(tensors, METADATA_KEY, text)


def raw_request(
    plan_bytes: bytes, description: str, tensors: dict[str, torch.Tensor] | None = None
) -> bytes:
    """A request file whose description JSON is the raw text ``description``."""
    all_tensors = {"plan": torch.frombuffer(bytearray(plan_bytes), dtype=torch.uint8)}
    all_tensors.update(tensors or {})
    return raw_file(all_tensors, REQUEST_KEY, description)


def raw_file(tensors: dict[str, torch.Tensor], key: str, text: str) -> bytes:
    """A safetensors file holding ``tensors`` and the raw text ``text`` in ``metadata[key]``."""
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={key: text})


def describe(args: str = '[{"tensor": "a0"}]', kwargs: str = "{}", version: str = "1") -> str:
    """A request description's raw JSON text."""
    return f'{{"version": {version}, "args": {args}, "kwargs": {kwargs}, "text": null}}'


def rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The most resident memory this process held while the block ran (sampled every ms)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start
