"""Errors a researcher meets on a local run name the site or the argument at fault.

A wrong-width vector, a value of another dtype, text without a tokenizer and float token ids
each raise a ``ts.SurgeryError`` (also the builtin it refines, so ``except ValueError`` /
``TypeError`` / ``IndexError`` code keeps working) whose message says where and what to do,
on a wrapped ``transformers`` model and on its converted twin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from plan_cases import HIDDEN, make_gpt2, token_ids
from torch import nn

import torchsurgeon as ts

MLP = {"wrap": "transformer.h.0.mlp", "convert": "blocks.0.mlp"}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    hf = make_gpt2()
    return {"wrap": ts.wrap(hf), "convert": ts.convert(hf)}


@pytest.mark.parametrize("kind", ["wrap", "convert"])
def test_wrong_width_add_names_the_site_and_both_widths(models: dict[str, nn.Module], kind: str):
    probe = ts.select(models[kind]).at(MLP[kind]).insert_after(ts.layers.Add(torch.ones(7)))
    with pytest.raises(ts.SiteError) as caught:
        ts.run(probe, token_ids())
    message = str(caught.value)
    assert f"Add at '{MLP[kind]}'" in message
    assert "width 7" in message and f"width {HIDDEN}" in message
    assert "must match the size" not in message  # not torch's broadcasting message
    assert isinstance(caught.value, RuntimeError)  # what torch raised before


@pytest.mark.parametrize("kind", ["wrap", "convert"])
def test_wrong_width_indexed_set_values_names_the_site(models: dict[str, nn.Module], kind: str):
    layer = ts.layers.SetValues(ts.idx[:, -1], torch.ones(5))
    probe = ts.select(models[kind]).at(MLP[kind]).insert_before(layer)
    with pytest.raises(ts.SiteError, match=rf"SetValues at '{MLP[kind]}'.*width 5.*width {HIDDEN}"):
        ts.run(probe, token_ids())


@pytest.mark.parametrize(
    ("kind", "path", "width"),
    [("wrap", "transformer.h.0.mlp.c_fc", 4 * HIDDEN), ("convert", "blocks.0.mlp.up", 4 * HIDDEN)],
)
def test_wrong_width_at_a_site_of_known_width_is_refused_at_insertion(
    models: dict[str, nn.Module], kind: str, path: str, width: int
):
    selection = ts.select(models[kind]).at(path)
    with pytest.raises(ts.SiteError) as caught:
        selection.insert_after(ts.layers.Add(torch.ones(HIDDEN)))
    assert f"insert_after at '{path}'" in str(caught.value)
    assert f"output width {width}" in str(caught.value)
    assert f"vector has width {HIDDEN}" in str(caught.value)
    with pytest.raises(ts.SiteError, match=f"input width {HIDDEN}.*mean has width {width}"):
        selection.insert_before(ts.layers.MeanAblate(torch.zeros(width)))
    fits = selection.insert_after(ts.layers.Add(torch.ones(width)))  # the right width is kept
    assert ts.run(fits, token_ids()).output is not None


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize("kind", ["wrap", "convert"])
def test_dtype_rule_floats_act_in_the_models_dtype_lossy_casts_are_refused(
    models: dict[str, nn.Module], kind: str
):
    model, ids = models[kind], token_ids()
    for dtype in (torch.float64, torch.bfloat16):
        vector = torch.linspace(-1, 1, HIDDEN, dtype=dtype)
        cast = ts.select(model).at(MLP[kind]).insert_after(ts.layers.Add(vector.float()))
        probe = ts.select(model).at(MLP[kind]).insert_after(ts.layers.Add(vector))
        probe = ts.select(probe).at(MLP[kind]).insert_after(ts.layers.Save("mlp"))
        out = ts.run(probe, ids)
        assert out.saved["mlp"].dtype == torch.float32
        torch.testing.assert_close(_logits(out.output), _logits(ts.run(cast, ids).output))
    complex_vector = ts.layers.Add(torch.ones(HIDDEN, dtype=torch.complex64))
    probe = ts.select(model).at(MLP[kind]).insert_after(complex_vector)
    with pytest.raises(ts.SiteError, match=rf"Add at '{MLP[kind]}'.*complex64.*imaginary"):
        ts.run(probe, ids)


def test_fractional_values_on_token_ids_are_refused_naming_the_site(
    models: dict[str, nn.Module],
):
    model, ids = models["wrap"], token_ids()
    fraction = ts.layers.SetValues(ts.idx[:, 0], 2.5)  # token ids are integers: 2.5 is not one
    probe = ts.select(model).at("transformer.wte").insert_before(fraction)
    with pytest.raises(ts.SiteError, match=r"SetValues at 'transformer.wte'.*torch.int64.*whole"):
        ts.run(probe, ids)
    whole = ts.select(model).at("transformer.wte").insert_before(ts.layers.SetValues(None, 2.0))
    assert torch.equal(ts.run(whole, ids).output.logits, model(torch.full_like(ids, 2)).logits)


@pytest.mark.parametrize("kind", ["wrap", "convert"])
def test_text_without_a_tokenizer_names_the_input_and_how_to_give_one(
    models: dict[str, nn.Module], kind: str
):
    with pytest.raises(ts.ArgumentTypeError) as caught:
        ts.run(models[kind], "hello world")
    assert isinstance(caught.value, ts.SurgeryError) and isinstance(caught.value, TypeError)
    assert "'hello world'" in str(caught.value)
    assert "ts.wrap(model, tokenizer=" in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "by"),
    [(k, b) for k in ("wrap", "convert") for b in ("position", "keyword")] + [("wrap", "generate")],
)
def test_float_token_ids_name_input_ids_and_the_dtype(
    models: dict[str, nn.Module], kind: str, by: str
):
    model, ids = models[kind], torch.tensor([[1.0, 2.0]])
    calls: dict[str, Callable[[], Any]] = {
        "position": lambda: ts.run(model, ids),
        "keyword": lambda: ts.run(model, input_ids=ids),
        "generate": lambda: ts.run(model.generate, ids, max_new_tokens=1),
    }
    with pytest.raises(ts.ArgumentTypeError, match=r"input_ids: .*torch\.long.*torch\.float32"):
        calls[by]()
    assert ts.run(model, ids.long()).output is not None  # integer ids run
    mlp = ts.wrap(nn.Sequential(nn.Linear(4, 3)))  # a model whose input is a float tensor
    assert ts.run(mlp, torch.ones(2, 4)).output.shape == (2, 3)


def _cases(model: nn.Module) -> dict[str, tuple[Callable[[], Any], type[Exception], str]]:
    from torchsurgeon.layers.index import Index
    from torchsurgeon.selectors.expression import steps_from_json

    mlps = ts.select(model).at_instances_of("GPT2MLP")
    out_of_range = mlps.at("c_fc").insert_after(ts.layers.SetValues(ts.idx[:, 99], 0.0))
    return {
        "index out of range": (
            lambda: ts.run(out_of_range, token_ids()),
            IndexError,
            "SetValues at 'transformer.h.0.mlp.c_fc'.*99 is out of range",
        ),
        "pick_nth_selected": (lambda: mlps.pick_nth_selected(5), IndexError, "valid positions"),
        "selector step": (lambda: steps_from_json([["nope", None]]), ValueError, "known: at"),
        "index json": (lambda: Index.from_json({"a": 1}), ValueError, "a JSON list"),
        "idx entry": (lambda: ts.idx["x"], TypeError, "ts.idx"),
        "isin": (lambda: ts.layer_index.isin(3), TypeError, "isin"),
        "noise std": (lambda: ts.layers.Noise(-1.0), ValueError, "std must be"),
        "add vector": (lambda: ts.layers.Add([1.0]), TypeError, "vector must be a tensor"),
        "session name": (
            lambda: ts.session().then("a", model, token_ids()).then("a", model, token_ids()),
            ValueError,
            "already has a run named 'a'",
        ),
        "knockout mode": (
            lambda: ts.methods.knockout_heads(model, [(0, 0)], mode="max"),  # type: ignore[arg-type]
            ValueError,
            "'zero' or 'mean'",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "index out of range",
        "pick_nth_selected",
        "selector step",
        "index json",
        "idx entry",
        "isin",
        "noise std",
        "add vector",
        "session name",
        "knockout mode",
    ],
)
def test_public_entry_points_raise_surgery_errors(models: dict[str, nn.Module], case: str):
    call, builtin, words = _cases(models["wrap"])[case]
    with pytest.raises(ts.SurgeryError, match=words) as caught:
        call()
    assert isinstance(caught.value, builtin)  # code catching the builtin keeps working


# --- Entry points a researcher meets before a run: ts.generate, ts.load, returning(),
# ts.train and a Transformer config. Each error is a ts.SurgeryError naming the argument.


@pytest.mark.parametrize("kind", ["wrap", "convert"])
def test_generate_with_float_ids_names_input_ids(models: dict[str, nn.Module], kind: str):
    with pytest.raises(
        ts.ArgumentTypeError, match=r"input_ids: .*torch\.long.*torch\.float32"
    ) as c:
        ts.generate(models[kind], torch.tensor([[1.0, 2.0]]), 2)
    assert isinstance(c.value, ValueError)  # what generate raised before
    with pytest.raises(ts.ArgumentError, match=r"input_ids must be \[batch, pos\].*ids\[None\]"):
        ts.generate(models[kind], torch.tensor([1, 2]), 2)
    with pytest.raises(ts.ArgumentError, match="max_new_tokens must be an int >= 0"):
        ts.generate(models[kind], token_ids(), -1)
    assert ts.generate(models[kind], token_ids(), 1).shape[1] == token_ids().shape[1] + 1


def test_load_names_a_bad_dtype_string_and_the_nearest_name(tmp_path: Any):
    with pytest.raises(
        ts.ArgumentError, match=r"dtype='bfloat'.*did you mean 'bfloat16'"
    ) as caught:
        ts.load(tmp_path, dtype="bfloat")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ts.ArgumentTypeError, match=r"ts\.load\(dtype=\)"):
        ts.load(tmp_path, dtype=16)  # type: ignore[arg-type]


def test_load_names_a_bad_path_and_the_nearest_directory(tmp_path: Any):
    (tmp_path / "gpt2-small").mkdir()
    with pytest.raises(ts.SurgeryError, match=r"does not exist; did you mean '.*gpt2-small'"):
        ts.load(tmp_path / "gtp2-small")
    with pytest.raises(ts.ArgumentTypeError, match=r"ts\.load\(path=\).*got NoneType"):
        ts.load(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reduction", "argument"),
    [({"topk": 0}, "topk"), ({"mean": []}, "mean"), ({"positions": slice(0, 4, -1)}, "positions")],
)
def test_returning_with_a_bad_reduction_names_the_argument(
    reduction: dict[str, Any], argument: str
):
    plan = ts.plan(
        ts.select(make_gpt2()).at("transformer.h.0.mlp").insert_after(ts.layers.Save("m"))
    )
    with pytest.raises(ts.ArgumentError, match=rf"returning\({argument}=\)") as caught:
        plan.returning("logits", **reduction)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"steps": 0}, ts.ArgumentError, r"steps must be an int from 1"),
        ({"optimizer": "adam"}, ts.ArgumentTypeError, r"optimizer= is ts\.optim\.AdamW.*got str"),
        ({"batches": []}, ts.ArgumentError, r"batches: train needs at least one batch"),
    ],
)
def test_train_with_bad_options_names_the_option(
    models: dict[str, nn.Module], options: dict[str, Any], error: type[Exception], words: str
):
    probe = (
        ts.select(models["wrap"]).at(MLP["wrap"]).insert_after(ts.layers.Add(torch.zeros(HIDDEN)))
    )
    arguments: dict[str, Any] = {
        "batches": [token_ids()],
        "loss": ts.out("logits")[0, -1, 0],
        "params": ts.select(probe).at_instances_of(ts.layers.Add),
        "optimizer": ts.optim.SGD(lr=0.1),
        "steps": 1,
    }
    arguments.update(options)
    with pytest.raises(error, match=words):
        ts.train(probe, arguments.pop("batches"), **arguments)
    with pytest.raises(ts.ArgumentError, match=r"optimizer: betas must be two numbers"):
        ts.optim.AdamW(betas=(0.9,))


def test_transformer_config_errors_name_the_field_and_the_nearest_choice(
    models: dict[str, nn.Module],
):
    import dataclasses

    config = models["convert"].config
    with pytest.raises(ts.ArgumentError, match=r"TransformerConfig\.norm .*did you mean 'rmsnorm'"):
        dataclasses.replace(config, norm="rms_norm")
    with pytest.raises(ts.ArgumentError, match=r"TransformerConfig\.attn_scales needs one entry"):
        dataclasses.replace(config, attn_scales=())
    with pytest.raises(ts.ArgumentError, match=r"activation: unknown name 'gelu_neww'.*'gelu_new'"):
        ts.layers.transformer.Activation("gelu_neww")
    with pytest.raises(ts.OutOfRangeError, match=r"input_ids: token ids must lie in \[0, "):
        models["convert"](torch.tensor([[10**6]]))


# --- The last plain builtins: ts.run given a plan, a key nothing saved, steps=, Save name
# templates, ts.wrap / ts.convert / ts.apply given the wrong kind of argument, gradient
# layers where no gradient flows. Each is a ts.SurgeryError and still the builtin it was.


def _saving(model: nn.Module) -> nn.Module:
    return ts.select(model).at(MLP["wrap"]).insert_after(ts.layers.Save("mlp0"))


def test_run_given_a_plan_names_ts_apply(models: dict[str, nn.Module]):
    plan = ts.plan(_saving(models["wrap"]))
    with pytest.raises(ts.ArgumentTypeError, match=r"ts\.apply\(plan, model\)") as caught:
        ts.run(plan, token_ids())  # type: ignore[arg-type]
    assert isinstance(caught.value, TypeError)
    with pytest.raises(ts.ArgumentTypeError, match=r"other way round.*ts\.apply\(plan, model\)"):
        ts.apply(models["wrap"], plan)  # type: ignore[arg-type]
    assert "mlp0" in ts.run(ts.apply(plan, models["wrap"]), token_ids()).saved  # the fix runs


def test_missing_saved_key_names_the_nearest_saved_key(models: dict[str, nn.Module]):
    saved = ts.run(_saving(models["wrap"]), token_ids()).saved
    with pytest.raises(ts.KeyNotFoundError) as caught:
        saved["mlp"]
    assert isinstance(caught.value, KeyError)  # `except KeyError` keeps working
    assert str(caught.value) == "nothing was saved under 'mlp'; nearest: 'mlp0'"
    assert saved.get("mlp") is None and "mlp" not in saved  # the Mapping protocol holds
    empty = ts.run(models["wrap"], token_ids()).saved
    with pytest.raises(ts.KeyNotFoundError, match="nothing was saved in this run"):
        empty["mlp"]


@pytest.mark.parametrize(
    ("steps", "error", "builtin", "words"),
    [
        (-1, ts.ArgumentError, ValueError, r"Save: steps=-1: steps count from 0"),
        (slice(0, 4, 0), ts.ArgumentError, ValueError, r"steps=slice\(0, 4, 0\): a slice"),
        ([], ts.ArgumentError, ValueError, r"steps= lists 1 to"),
        (True, ts.ArgumentTypeError, TypeError, r"steps= is an int, a slice or a list"),
        ([1.5], ts.ArgumentTypeError, TypeError, r"steps= lists ints >= 0, got \[1\.5\]"),
        ("0", ts.ArgumentTypeError, TypeError, r"steps= is an int, a slice or a list"),
    ],
)
def test_bad_steps_names_the_argument(
    steps: Any, error: type[Exception], builtin: type[Exception], words: str
):
    with pytest.raises(error, match=words) as caught:
        ts.layers.Save("x", steps=steps)
    assert isinstance(caught.value, builtin)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("resid{lyer}", r"uses \{lyer\}.*did you mean \{layer\}\?"),
        ("resid}", r"has a single '\}'; write '\}\}'"),
        ("x" * 300, r"name is 300 characters, over 256"),
    ],
)
def test_bad_save_name_template_names_the_field(name: str, words: str):
    with pytest.raises(ts.ArgumentError, match=words) as caught:
        ts.layers.Save(name)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ts.ArgumentTypeError, match="Save: name must be a str") as typed:
        ts.layers.Save(3)  # type: ignore[arg-type]
    assert isinstance(typed.value, TypeError)


def test_layer_template_at_a_path_without_a_layer_index_names_the_site(
    models: dict[str, nn.Module],
):
    with pytest.raises(ts.SiteError, match=r"Save\('x\{layer\}'\) at 'transformer\.ln_f'") as c:
        ts.select(models["wrap"]).at("transformer.ln_f").insert_after(ts.layers.Save("x{layer}"))
    assert isinstance(c.value, ValueError)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: ts.wrap(42), r"ts\.wrap\(module\): expects an nn\.Module, got int"),
        (lambda: ts.convert(42), r"ts\.convert\(hf_model\): expects a transformers model"),
        (lambda: ts.apply(42, nn.Linear(2, 2)), r"ts\.apply\(plan, base\): plan must be a Plan"),
    ],
)
def test_entry_points_given_the_wrong_kind_name_the_argument(call: Callable[[], Any], words: str):
    with pytest.raises(ts.ArgumentTypeError, match=words) as caught:
        call()
    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize(
    "layer", [lambda: ts.layers.SaveGrad("g"), lambda: ts.layers.ComputeGrad(ts.here * 2)]
)
def test_gradient_layer_where_no_gradient_flows_names_the_site(
    models: dict[str, nn.Module], layer: Callable[[], nn.Module]
):
    probe = ts.select(models["wrap"]).at(MLP["wrap"]).insert_after(layer())
    with torch.no_grad(), pytest.raises(ts.SiteError, match=rf"at '{MLP['wrap']}'.*grad") as c:
        ts.run(probe, token_ids())
    assert isinstance(c.value, RuntimeError)  # what it raised before


def test_steps_outside_a_run_and_unknown_layer_types_are_surgery_errors(
    models: dict[str, nn.Module],
):
    from torchsurgeon.layers.base import layer_class
    from torchsurgeon.surgery.rewrite import rewrite, setting

    probe = (
        ts.select(models["wrap"])
        .at(MLP["wrap"])
        .insert_after(ts.layers.Add(torch.zeros(HIDDEN), steps=0))
    )
    with pytest.raises(ts.SiteError, match=rf"Add at '{MLP['wrap']}': steps=0 .*ts\.run") as c:
        probe(token_ids())
    assert isinstance(c.value, RuntimeError)
    with pytest.raises(ts.ArgumentError, match=r"type 'Sve'; registered: .*did you mean 'Save'"):
        layer_class("Sve")
    edit = {"transformer.h.0.mlp.c_fc": setting({"wieght": torch.zeros(1)})}
    with pytest.raises(ts.KeyNotFoundError, match=r"no parameter or buffer 'wieght'.*'weight'"):
        rewrite(models["wrap"], edit)
