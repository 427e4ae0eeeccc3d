"""Progress bars on long local loops, ``ts.run_saving`` (every site saved) and the summary
line ``ts.show`` prints before the tree."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from hook_reference import HIDDEN, hooks
from torch import nn

import torchsurgeon as ts
import torchsurgeon.methods as M
from torchsurgeon.methods import toy
from torchsurgeon.surgery import progress as P


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(P.ENV, raising=False)


# ------------------------------------------------------------------------------- progress


def test_a_forced_bar_prints_and_false_prints_nothing(no_env: None) -> None:
    shown, hidden = io.StringIO(), Terminal()
    assert list(P.progress(range(3), desc="sweep", enabled=True, file=shown)) == [0, 1, 2]
    assert "sweep" in shown.getvalue() and "3/3" in shown.getvalue()
    assert list(P.progress(range(3), desc="sweep", enabled=False, file=hidden)) == [0, 1, 2]
    assert hidden.getvalue() == ""


def test_a_terminal_shows_a_bar_by_default_and_a_pipe_does_not(
    no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(P, "DELAY", 0.0)
    terminal, pipe = Terminal(), io.StringIO()
    list(P.progress(range(4), desc="steps", file=terminal))
    list(P.progress(range(4), desc="steps", file=pipe))
    assert "4/4" in terminal.getvalue()
    assert pipe.getvalue() == ""


def test_the_environment_variable_switches_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "DELAY", 0.0)
    monkeypatch.setenv(P.ENV, "0")
    terminal = Terminal()
    list(P.progress(range(2), file=terminal))
    assert terminal.getvalue() == ""
    assert P.progress(range(1), enabled=True, file=terminal) is not None  # an argument wins
    monkeypatch.setenv(P.ENV, "1")
    pipe = io.StringIO()
    list(P.progress(range(2), file=pipe))
    assert "2/2" in pipe.getvalue()


def test_under_pytest_stderr_is_no_terminal(no_env: None) -> None:
    assert not P.enabled()


def _patching(model: nn.Module, **kwargs: Any) -> M.EffectGrid:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    corrupted = torch.tensor([[5, 6, 10, 8, 9]])
    return M.activation_patching(model, ids, corrupted, M.LogitDiff(3, 4), **kwargs)


def test_methods_show_a_bar_only_when_asked(
    no_env: None, llama_hf: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    quiet = _patching(llama_hf)
    assert capsys.readouterr().err == ""  # not a terminal: nothing by default
    loud = _patching(llama_hf, progress=True)
    assert "activation_patching" in capsys.readouterr().err
    assert torch.equal(quiet.values, loud.values)
    _patching(llama_hf, progress=False)
    assert capsys.readouterr().err == ""

    M.train_lora(llama_hf, ids, steps=2, progress=True)
    err = capsys.readouterr().err
    assert "train_lora" in err and "2/2" in err and "loss=" in err
    M.train_lora(llama_hf, ids, steps=2, progress=False)
    M.train_lora(llama_hf, ids, steps=2)
    assert capsys.readouterr().err == ""

    M.residual_features(llama_hf, ids.repeat(2, 1), batch_size=1, progress=True)
    assert "residual_features" in capsys.readouterr().err


def test_ts_train_and_the_toy_trainer_show_a_bar(
    no_env: None, llama_hf: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = (
        ts.select(llama_hf).at("model.layers.0").insert_after(ts.layers.Add(torch.zeros(HIDDEN)))
    )
    settings: dict[str, Any] = {
        "loss": ts.out("logits").square().mean(),
        "params": ts.select(probe).at_instances_of("Add"),
        "optimizer": ts.optim.SGD(lr=0.1),
        "steps": 3,
    }
    batches = [torch.tensor([[5, 6, 7]])]
    loud = ts.train(probe, batches, progress=True, **settings)
    err = capsys.readouterr().err
    assert "train" in err and "3/3" in err
    quiet = ts.train(probe, batches, **settings)
    assert capsys.readouterr().err == ""
    assert loud.losses == quiet.losses

    recipe = toy.ToyRecipe(n_layer=1, n_embd=8, n_head=2, n_inner=16, steps=2, batch=2)
    toy._train(recipe, progress=True)
    assert "toy model" in capsys.readouterr().err
    toy._train(recipe, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- run_saving


def test_run_saving_is_the_hand_written_plan_and_the_hooks(
    llama_hf: nn.Module, token_ids: torch.Tensor
) -> None:
    result = ts.run_saving(llama_hf, token_ids)
    paths = [f"model.layers.{i}" for i in range(len(llama_hf.model.layers))]
    assert list(result.saved) == paths
    by_hand = ts.run(
        ts.select(llama_hf).at("model.layers.*").insert_after(ts.layers.Save()), token_ids
    )
    assert list(by_hand.saved) == paths
    for path in paths:
        assert torch.equal(result.saved[path], by_hand.saved[path])
    assert torch.equal(result.output.logits, by_hand.output.logits)

    seen: dict[str, torch.Tensor] = {}

    def keep(path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[path] = (output if isinstance(output, torch.Tensor) else output[0]).detach()

        return hook

    with hooks(llama_hf, post={path: keep(path) for path in paths}), torch.no_grad():
        plain = llama_hf(token_ids).logits
    for path in paths:
        assert torch.equal(result.saved[path].detach(), seen[path])
    assert torch.equal(result.output.logits.detach(), plain)


def test_run_saving_names_every_site_of_a_converted_model(
    llama_hf: nn.Module, token_ids: torch.Tensor
) -> None:
    model = ts.convert(llama_hf)
    everything = ts.run_saving(model, token_ids)
    for site in ("embed", "blocks.0.resid_pre", "blocks.1.attn.pattern", "final_norm", "unembed"):
        assert site in everything.saved
    assert "rotary" not in everything.saved  # a (cos, sin) pair, not an activation
    assert torch.equal(everything.saved["unembed"], everything.output)

    mlps = ts.run_saving(model, token_ids, names="*.mlp.out")
    by_hand = ts.run(
        ts.select(model).at("blocks.*.mlp.out").insert_after(ts.layers.Save()), token_ids
    )
    blocks = range(len(model.blocks))
    assert list(mlps.saved) == list(by_hand.saved) == [f"blocks.{i}.mlp.out" for i in blocks]
    for key in mlps.saved:
        assert torch.equal(mlps.saved[key], by_hand.saved[key])
        assert torch.equal(mlps.saved[key], everything.saved[key])

    resid = ts.run_saving(model, token_ids, names=lambda path: path.endswith("resid_post"))
    assert list(resid.saved) == [f"blocks.{i}.resid_post" for i in blocks]

    # a rewritten model: its own layers stay, and are not sites
    probe = ts.select(model).at("blocks.0.mlp.out").insert_after(ts.layers.Scale(2.0))
    again = ts.run_saving(probe, token_ids, names="blocks.0.mlp.out")
    assert torch.equal(again.saved["blocks.0.mlp.out"], 2.0 * mlps.saved["blocks.0.mlp.out"])
    with pytest.raises(ValueError, match="keeps none"):
        ts.run_saving(model, token_ids, names="nothing.*")


# --------------------------------------------------------------------------------- show


def test_show_prints_a_summary_line_first(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    probe = ts.select(model).at_instances_of(nn.Linear).insert_after(ts.layers.Save())
    ts.show(probe)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Sequential: 23 parameters (92 B), float32, cpu, 2 inserted layers"
    assert lines[1].startswith("Sequential(")
    half = ts.wrap(model).to(torch.float16)
    assert (
        ts.viz.summary(half) == "Sequential: 23 parameters (46 B), float16, cpu, 0 inserted layers"
    )
