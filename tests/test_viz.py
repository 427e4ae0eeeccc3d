"""torchsurgeon.viz: pictures of models, selections and rewrites render, and say the right things.

The HTML checks look for what a reader sees (class names, layer types, config values) and
for the markers each highlight style writes into its inline CSS (``--ts-mark: ts-selected``
and so on; see :mod:`torchsurgeon.viz.styles`), which stand for the colours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import treescope
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import torchsurgeon as ts
from torchsurgeon import viz
from torchsurgeon.viz import styles
from torchsurgeon.viz.diff import Change, diff_trees

SELECTED = styles.SELECTED.marker
INSERTED = styles.INSERTED.marker
ADDED = styles.ADDED.marker
CHANGED = styles.CHANGED.marker
REMOVED = styles.REMOVED.marker
DIMMED = styles.DIMMED.marker


@pytest.fixture(scope="module")
def model(gpt2_hf: GPT2LMHeadModel) -> nn.Module:
    return ts.wrap(gpt2_hf)


@pytest.fixture(scope="module")
def probe(model: nn.Module) -> nn.Module:
    return ts.select(model).at("transformer.h.1.mlp").insert_after(ts.layers.Save("x"))


def _meta_gpt2(n_layer: int = 4) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------- tensors


def test_importing_torchsurgeon_leaves_treescope_registries_alone() -> None:
    # A fresh interpreter: registries are process-wide, and this test must see them untouched.
    code = (
        "import torch, treescope\n"
        "from treescope import type_registries as r\n"
        "r.update_registries_for_imports()\n"
        "before = (dict(r.TREESCOPE_HANDLER_REGISTRY), dict(r.NDARRAY_ADAPTER_REGISTRY))\n"
        "import torchsurgeon as ts\n"
        "after = (dict(r.TREESCOPE_HANDLER_REGISTRY), dict(r.NDARRAY_ADAPTER_REGISTRY))\n"
        "assert before == after, 'import torchsurgeon changed treescope registries'\n"
        "m = ts.wrap(torch.nn.Linear(3, 2))\n"
        "text = treescope.render_to_text(ts.select(m).at('').insert_after(ts.layers.Scale(2.0)))\n"
        "assert 'Scale' in text and 'Param float32[2, 3]' in text, text\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_opt_in_tensor_support_renders_plain_torch_tensors() -> None:
    # treescope 0.1.10's own torch handler reads Tensor.names, gone in torch 2.13.
    assert not hasattr(torch.ones(1), "names")
    viz.install_tensor_support()
    html = treescope.render_to_html(nn.Linear(3, 2), compressed=False)
    assert "Param float32[2, 3]" in html
    text = treescope.render_to_text({"t": torch.arange(6).reshape(2, 3)})
    assert "Tensor int64[2, 3] cpu [0, 5]" in text
    assert treescope.render_array(torch.randn(4, 5)) is not None  # the NDArray adapter


def test_tensor_summary_reads_data_only_when_small() -> None:
    big = torch.zeros(viz.tensors.STATS_MAX_NUMEL + 1)
    assert viz.describe_tensor(big) == "Tensor float32[100001] cpu"
    small = torch.tensor([1.0, float("nan"), float("inf"), 3.0], requires_grad=True)
    summary = viz.describe_tensor(small)
    assert "requires_grad=True" in summary and "nan:1" in summary and "inf:1" in summary
    frozen = nn.Parameter(torch.ones(2, dtype=torch.bfloat16), requires_grad=False)
    assert viz.describe_tensor(frozen).startswith("Param bfloat16[2] cpu requires_grad=False ≈1")
    assert viz.describe_tensor(torch.empty(3, 4, device="meta")) == "Tensor float32[3, 4] meta"
    assert viz.describe_tensor(torch.tensor(5.0)) == "Tensor float32[] cpu = 5"


# ------------------------------------------------------------------------------- models


def test_rewritten_gpt2_to_html(probe: nn.Module, tmp_path: Path) -> None:
    path = viz.save_html(probe, tmp_path / "pictures" / "probe.html")
    assert path == tmp_path / "pictures" / "probe.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    for name in ("GPT2LMHeadModel", "GPT2Block", "GPT2MLP", "Conv1D", "LayerNorm"):
        assert name in page
    assert "Save(" in page and "&#x27;x&#x27;" in page  # the layer's type and its name
    assert "transformer.h.1.mlp" in page  # its site
    assert INSERTED in page
    assert "Param float32[64, 256]" in page  # c_fc's weight: shape and dtype
    assert "http://" not in page and "https://" not in page  # opens offline


def test_inserted_layer_shows_its_spec(model: nn.Module) -> None:
    steer = (
        ts.select(model)
        .at("transformer.h.0.attn")
        .insert_before(ts.layers.SetValues(ts.idx[:, -1, [1, 2]], 5.0))
    )
    text = viz.to_text(steer)
    assert "ts_before=ModuleList(" in text and "run on the module's input" in text
    assert "SetValues(" in text
    assert "site='transformer.h.0.attn'" in text
    assert "index=ts.idx[:, -1, [1, 2]]" in text and "on=None" in text
    assert "value=<Tensor float32[] cpu = 5>" in text


def test_selection_is_outlined_and_the_rest_faded(model: nn.Module, tmp_path: Path) -> None:
    selection = ts.select(model).at_instances_of("GPT2MLP")
    page = viz.save_html(selection, tmp_path / "selection.html").read_text(encoding="utf-8")
    assert page.count(styles.SELECTED.box_css()) == 3 + 1  # three boxes and the legend's swatch
    assert DIMMED in page
    text = viz.to_text(selection)
    assert "3 selected" in text and "at_instances_of('GPT2MLP')" in text
    assert all(f"◆{n} mlp=GPT2MLP(" in text for n in range(3))
    # Selection.show() and treescope itself draw the same picture.
    assert SELECTED in treescope.render_to_html(selection, compressed=False)


def test_empty_selection_and_root_selection_render(model: nn.Module) -> None:
    root = ts.select(model)
    assert styles.SELECTED.box_css() in viz.to_html(root)
    nothing = ts.select(model).at("**.c_fc").where(ts.layer_index.isin([99]))
    assert "0 selected" in viz.to_text(nothing)


def test_repeated_blocks_fold_after_the_first(model: nn.Module) -> None:
    text = viz.to_text(model)
    assert "(0): GPT2Block(\n" in text
    assert "(1): GPT2Block(<4 submodules>)" in text
    assert "(2): GPT2Block(<4 submodules>)" in text
    unfolded = viz.to_text(model, fold_repeats=False)
    assert "(2): GPT2Block(\n" in unfolded
    # A highlight inside a later block unfolds it.
    assert "(1): GPT2Block(\n" in viz.to_text(ts.select(model).at("transformer.h.1.attn"))


# ------------------------------------------------------------------------------- diffs


def test_diff_marks_added_layers(model: nn.Module, probe: nn.Module, tmp_path: Path) -> None:
    diff = diff_trees(model, probe)
    assert diff.changes["transformer.h.1.mlp.ts_after"] is Change.ADDED
    assert diff.changes["transformer.h.1.mlp"] is Change.COPIED
    assert diff.changes["transformer.h.0"] is Change.SHARED
    assert diff.counts() == {"added": 1, "changed": 0, "removed": 0}
    page = viz.save_html(probe, tmp_path / "diff.html", diff=True).read_text(encoding="utf-8")
    assert ADDED in page and INSERTED in page and DIMMED in page
    text = viz.to_text((model, probe))
    assert "+ ts_after=ModuleList(" in text and "+1 added" in text
    assert "(0): GPT2Block(<4 submodules>),  # shared with base" in text
    assert text == viz.to_text(probe, diff=True)  # the lineage's base is `model`


def test_diff_marks_changed_and_removed(model: nn.Module) -> None:
    replaced = ts.select(model).at("transformer.h.0.mlp.act").replace(nn.ReLU())
    shorter = ts.select(replaced).at("transformer.h.2").remove_from_parent()
    diff = diff_trees(model, shorter)
    assert diff.changes["transformer.h.0.mlp.act"] is Change.CHANGED
    assert diff.removed["transformer.h"] == (("2", "GPT2Block"),)
    page = viz.to_html(shorter, diff=True)
    assert CHANGED in page and REMOVED in page
    text = viz.to_text(shorter, diff=True)
    assert "~ act=ReLU()" in text and "- (2): GPT2Block(...)" in text
    assert "no changes from the base" in viz.to_text((model, model))


def test_diff_against_the_plain_model_wrap_copied(
    gpt2_hf: GPT2LMHeadModel, probe: nn.Module
) -> None:
    diff = diff_trees(gpt2_hf, probe)  # wrap made new module objects sharing every tensor
    assert diff.counts() == {"added": 1, "changed": 0, "removed": 0}


# ------------------------------------------------------------------------------- robustness


def test_meta_bf16_and_plain_models_render(model: nn.Module) -> None:
    meta = ts.wrap(_meta_gpt2())
    assert "Param float32[64, 192] meta" in viz.to_html(meta)
    meta_probe = ts.select(meta).at("**.c_fc").insert_before(ts.layers.Scale(2.0))
    assert INSERTED in viz.to_html(ts.select(meta_probe).at("**.c_fc"), diff=True)

    bf16 = model.to(torch.bfloat16)
    assert "Param bfloat16[64, 256]" in viz.to_text(bf16)

    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert "Sequential" in viz.to_html(plain)
    assert "Param float32[2, 4]" in treescope.render_to_text(ts.wrap(plain))


def test_show_prints_text_outside_a_notebook(
    probe: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    viz.show(probe)
    assert "Save(" in capsys.readouterr().out
    viz.show_diff(probe)
    assert "+ ts_after" in capsys.readouterr().out


def test_views_reject_what_they_cannot_draw() -> None:
    with pytest.raises(TypeError, match=r"draws an nn\.Module, a Selection"):
        viz.as_view(42)
