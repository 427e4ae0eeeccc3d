"""Every intervention layer equals the same edit written as plain PyTorch hooks.

Each test rewrites a wrapped transformers model with torchsurgeon, runs it with ``ts.run``,
and compares against a reference that uses nothing from torchsurgeon: the *unmodified*
Hugging Face model with ``register_forward_pre_hook`` / ``register_forward_hook`` doing the
edit by hand (plain indexing, a ``torch.Generator`` for noise, ``Tensor.register_hook`` for
gradients). fp32 throughout; the bound is ``max |a - b| <= 1e-6`` (most are exactly equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hook_reference import (
    HIDDEN,
    SEED_NEURONS,
    VOCAB,
    get_module,
    hooks,
    logits_of,
    make_gpt2,
    make_llama,
    max_diff,
    replace_input,
    replace_output,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchsurgeon as ts

TOL = 1e-6


class _Slicer:
    """``S[1:, -1, [0, 5]]`` is the plain Python index ``(slice(1, None), -1, [0, 5])``."""

    def __getitem__(self, key: Any) -> Any:
        return key


S = _Slicer()

# Per family: the block whose output "after" edits, the projection whose input "before"
# edits (width of that input), the embedding (upstream of everything) and a parameter that
# feeds the projection only through the MLP branch.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "block": "transformer.h.1",
        "proj": "transformer.h.1.mlp.c_proj",
        "proj_width": 4 * HIDDEN,
        "embedding": "transformer.wte.weight",
        "branch": "transformer.h.1.mlp.c_fc.weight",
    },
    "llama": {
        "block": "model.layers.1",
        "proj": "model.layers.1.mlp.down_proj",
        "proj_width": 128,
        "embedding": "model.embed_tokens.weight",
        "branch": "model.layers.1.mlp.up_proj.weight",
    },
    "bert": {
        "block": "bert.encoder.layer.1",
        "proj": "bert.encoder.layer.1.output.dense",
        "proj_width": 128,
        "embedding": "bert.embeddings.word_embeddings.weight",
        "branch": "bert.encoder.layer.1.intermediate.dense.weight",
    },
}
SIDES = ("before", "after")


def site_of(family: str, side: str) -> tuple[str, int]:
    """(path, width of the target's last dimension) of the test site for ``side``."""
    spec = FAMILIES[family]
    return (spec["proj"], spec["proj_width"]) if side == "before" else (spec["block"], HIDDEN)


def insert(model: nn.Module, path: str, side: str, layer: nn.Module) -> nn.Module:
    selection = ts.select(model).at(path)
    return selection.insert_before(layer) if side == "before" else selection.insert_after(layer)


def reference_hooks(path: str, side: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    if side == "before":
        return {"pre": {path: replace_input(fn)}}
    return {"post": {path: replace_output(fn)}}


# --------------------------------------------------------------------- reference edits


def ref_set(index: Any, value: float | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[index] = value
        return out

    return fn


def ref_add(index: Any, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[index] = x[index] + delta
        return out

    return fn


def ref_scale(index: Any, factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[index] = x[index] * factor
        return out

    return fn


def ref_noise(index: Any, std: float, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator()
        generator.manual_seed(seed)
        part = x[index]
        noise = torch.randn(part.shape, generator=generator, dtype=x.dtype)
        out = x.clone()
        out[index] = part + std * noise
        return out

    return fn


def ref_patch(sources: list[int], targets: list[int], index: Any) -> Callable:
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for source, target in zip(sources, targets, strict=True):
            out[(target, *index)] = x[(source, *index)]
        return out

    return fn


@dataclass(frozen=True)
class EditCase:
    """A torchsurgeon layer and the hand-written edit it must equal, for a given width."""

    name: str
    build: Callable[[int, torch.Generator], tuple[nn.Module, Callable]]


def _vec(width: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(width, generator=generator)


def _set_tensor_idx(w: int, g: torch.Generator) -> tuple[nn.Module, Callable]:
    v = _vec(w, g)
    return ts.layers.SetValues(ts.idx[:, 2], v), ref_set(S[:, 2], v)


def _add(w: int, g: torch.Generator) -> tuple[nn.Module, Callable]:
    v = _vec(w, g)
    return ts.layers.Add(v, 0.7), ref_add(..., 0.7 * v)


def _add_idx(w: int, g: torch.Generator) -> tuple[nn.Module, Callable]:
    v = _vec(w, g)
    return ts.layers.Add(v, 3.0, index=ts.idx[:, 2:4]), ref_add(S[:, 2:4], 3.0 * v)


def _mean(w: int, g: torch.Generator) -> tuple[nn.Module, Callable]:
    m = _vec(w, g)
    return ts.layers.MeanAblate(m), ref_set(..., m)


def _mean_idx(w: int, g: torch.Generator) -> tuple[nn.Module, Callable]:
    m = _vec(w, g)
    return ts.layers.MeanAblate(m, index=ts.idx[:, [1, 3]]), ref_set(S[:, [1, 3]], m)


EDIT_CASES = [
    EditCase("SetValues", lambda w, g: (ts.layers.SetValues(None, 5.0), ref_set(..., 5.0))),
    EditCase(
        "SetValues-idx",
        lambda w, g: (
            ts.layers.SetValues(ts.idx[1:, -1, [0, 5, 9]], 5.0),
            ref_set(S[1:, -1, [0, 5, 9]], 5.0),
        ),
    ),
    EditCase("SetValues-tensor-idx", _set_tensor_idx),
    EditCase("Add", _add),
    EditCase("Add-idx", _add_idx),
    EditCase("Scale", lambda w, g: (ts.layers.Scale(-1.5), ref_scale(..., -1.5))),
    EditCase(
        "Scale-idx",
        lambda w, g: (ts.layers.Scale(-2.0, index=ts.idx[..., 3:9]), ref_scale(S[..., 3:9], -2.0)),
    ),
    EditCase("Zero", lambda w, g: (ts.layers.Zero(), torch.zeros_like)),
    EditCase(
        "Zero-idx",
        lambda w, g: (ts.layers.Zero(ts.idx[0, :, [1, 2]]), ref_set(S[0, :, [1, 2]], 0.0)),
    ),
    EditCase("MeanAblate", _mean),
    EditCase("MeanAblate-idx", _mean_idx),
    EditCase("Noise", lambda w, g: (ts.layers.Noise(0.5, seed=7), ref_noise(..., 0.5, 7))),
    EditCase(
        "Noise-idx",
        lambda w, g: (
            ts.layers.Noise(2.0, seed=11, index=ts.idx[2:, -2:]),
            ref_noise(S[2:, -2:], 2.0, 11),
        ),
    ),
    EditCase("Patch", lambda w, g: (ts.layers.Patch(0, [2, 3]), ref_patch([0, 0], [2, 3], ()))),
    EditCase(
        "Patch-idx",
        lambda w, g: (
            ts.layers.Patch([0, 1], [3, 2], ts.idx[-1]),
            ref_patch([0, 1], [3, 2], (-1,)),
        ),
    ),
]


@pytest.mark.parametrize("case", EDIT_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_edit_layer_matches_plain_hooks(
    family: str, side: str, case: EditCase, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    path, width = site_of(family, side)
    layer, reference = case.build(width, torch.Generator().manual_seed(5))
    probe = insert(ts.wrap(hf), path, side, layer)

    with torch.no_grad():
        got = logits_of(ts.run(probe, token_ids).output)
        clean = logits_of(hf(token_ids))
        with hooks(hf, **reference_hooks(path, side, reference)):
            want = logits_of(hf(token_ids))

    assert max_diff(got, want) <= TOL
    assert max_diff(want, clean) > 1e-3  # the edit bites, so the comparison means something
    assert torch.equal(logits_of(hf(token_ids)), clean)  # the plain model is as it was


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_matches_plain_hooks(
    family: str, side: str, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    path, _ = site_of(family, side)
    probe = insert(ts.wrap(hf), path, side, ts.layers.Save("act"))
    captured: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        captured.append(x)
        return x

    with torch.no_grad():
        result = ts.run(probe, token_ids)
        with hooks(hf, **reference_hooks(path, side, capture)):
            want = logits_of(hf(token_ids))

    assert len(captured) == 1
    assert set(result.saved) == {"act"}
    assert max_diff(result.saved["act"], captured[0]) <= TOL
    assert torch.equal(logits_of(result.output), want)  # Save changes nothing
    with torch.no_grad():
        plain = probe(token_ids)  # a plain call (no recording) runs the same model
    assert torch.equal(logits_of(plain), want)
    with torch.enable_grad():  # Save keeps the activation itself, autograd graph and all
        live = ts.run(probe, token_ids).saved["act"]
    assert isinstance(live, torch.Tensor)  # one call, one tensor: the plain call kept nothing
    assert live.requires_grad and live.grad_fn is not None
    assert torch.equal(live, result.saved["act"])


def _loss(logits: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(99))
    return (logits * weights).sum()


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_savegrad_matches_plain_tensor_hooks(
    family: str, side: str, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    spec = FAMILIES[family]
    path, _ = site_of(family, side)
    probe = insert(ts.wrap(hf), path, side, ts.layers.SaveGrad("g"))

    result = ts.run(probe, token_ids)
    embedding = probe.get_parameter(spec["embedding"])
    (got_param_grad,) = torch.autograd.grad(_loss(logits_of(result.output)), [embedding])

    grads: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        x.register_hook(grads.append)
        return x

    with hooks(hf, **reference_hooks(path, side, capture)):
        out = logits_of(hf(token_ids))
    (want_param_grad,) = torch.autograd.grad(_loss(out), [hf.get_parameter(spec["embedding"])])

    assert len(grads) == 1
    assert max_diff(result.saved["g"], grads[0]) <= TOL
    assert result.saved["g"].abs().max() > 0
    assert max_diff(got_param_grad, want_param_grad) <= TOL
    assert all(p.grad is None for p in hf.parameters())  # autograd.grad left .grad alone


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_stop_gradient_matches_detach_hook(
    family: str, side: str, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    spec = FAMILIES[family]
    path, _ = site_of(family, side)
    names = [spec["embedding"], spec["branch"]]
    probe = insert(ts.wrap(hf), path, side, ts.layers.StopGradient())

    def grads(
        model: nn.Module, call: Callable[[], Any]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        out = logits_of(call())
        params = [model.get_parameter(n) for n in names]
        return out, torch.autograd.grad(_loss(out), params, allow_unused=True)

    got_out, got = grads(probe, lambda: ts.run(probe, token_ids).output)
    with hooks(hf, **reference_hooks(path, side, torch.Tensor.detach)):
        want_out, want = grads(hf, lambda: hf(token_ids))
    _, clean = grads(hf, lambda: hf(token_ids))

    assert torch.equal(got_out, want_out)
    for name, g, w, c in zip(names, got, want, clean, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            assert max_diff(g, w) <= TOL, name
        assert c is not None, name  # without the cut every one of them gets a gradient
    # the MLP branch feeds the site only through the cut tensor: nothing reaches it
    assert got[1] is None
    if side == "before":  # the residual stream still carries the embedding's gradient
        assert got[0] is not None and max_diff(got[0], clean[0]) > 1e-6


SHAPE = (3, 4, 5)


@st.composite
def plain_indices(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """A random index into ``shape``: ints, slices, at most one list, maybe one ``...``."""
    dims = draw(st.integers(1, len(shape)))
    entries: list[Any] = []
    kinds = ["int", "slice", "list"]
    for size in shape[:dims]:
        kind = draw(st.sampled_from(kinds))
        if kind == "int":
            entries.append(draw(st.integers(-size, size - 1)))
        elif kind == "slice":
            bound = st.none() | st.integers(-size, size)
            entries.append(slice(draw(bound), draw(bound), draw(st.none() | st.integers(1, 3))))
        else:
            kinds = ["int", "slice"]  # one list: several would have to broadcast together
            entries.append(draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=3)))
    if dims < len(shape) and draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), Ellipsis)
    return tuple(entries)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    index=plain_indices(SHAPE),
    row_index=plain_indices(SHAPE[1:]),
    value=st.floats(-4, 4, allow_nan=False),
)
def test_index_means_what_the_same_plain_index_means(
    index: tuple[Any, ...], row_index: tuple[Any, ...], value: float
) -> None:
    """``ts.idx[e]`` edits exactly the elements the plain PyTorch index ``e`` names."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ts_index = ts.idx[index]
    assert ts.Index.from_json(ts_index.to_json()) == ts_index
    cases = [
        (ts.layers.SetValues(ts_index, value), ref_set(index, value)),
        (ts.layers.Scale(value, index=ts_index), ref_scale(index, value)),
        (ts.layers.Zero(ts_index), ref_set(index, 0.0)),
        (ts.layers.Noise(1.0, seed=3, index=ts_index), ref_noise(index, 1.0, 3)),
        (ts.layers.Patch(0, [2, 1], ts.idx[row_index]), ref_patch([0, 0], [2, 1], row_index)),
    ]
    if x[index].dim() > 0:
        vector = torch.linspace(-1.0, 1.0, x[index].shape[-1])
        cases.append((ts.layers.Add(vector, value, index=ts_index), ref_add(index, value * vector)))
    for layer, reference in cases:
        assert torch.equal(layer(x), reference(x)), type(layer).__name__


# --------------------------------------------------------------------- on= targets


def test_on_second_positional_argument_by_position_and_name(
    bert_hf: nn.Module, token_ids: torch.Tensor
) -> None:
    """BertOutput.forward(hidden_states, input_tensor): edit the residual ``input_tensor``."""
    path = "bert.encoder.layer.0.output"
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    model = ts.wrap(bert_hf)
    by_position = ts.select(model).at(path).insert_before(ts.layers.Add(vec, 2.0, on=1))
    by_name = (
        ts.select(model)
        .at(path)
        .insert_before(ts.layers.Add(vec, 2.0, on="input_tensor", index=ts.idx[:, 1:]))
    )
    saved = ts.select(model).at(path).insert_before(ts.layers.Save("residual", on=1))

    captured: list[torch.Tensor] = []
    with torch.no_grad():
        with hooks(bert_hf, pre={path: replace_input(ref_add(..., 2.0 * vec), position=1)}):
            want = logits_of(bert_hf(token_ids))
        with hooks(bert_hf, pre={path: replace_input(ref_add(S[:, 1:], 2.0 * vec), position=1)}):
            want_named = logits_of(bert_hf(token_ids))
        with hooks(bert_hf, pre={path: lambda m, args: captured.append(args[1])}):
            bert_hf(token_ids)
        got = logits_of(ts.run(by_position, token_ids).output)
        got_named = logits_of(ts.run(by_name, token_ids).output)
        got_saved = ts.run(saved, token_ids).saved["residual"]

    assert max_diff(got, want) <= TOL
    assert max_diff(got_named, want_named) <= TOL
    assert max_diff(got_saved, captured[0]) <= TOL
    assert max_diff(want, want_named) > 1e-3


def test_on_keyword_argument(llama_hf: nn.Module, token_ids: torch.Tensor) -> None:
    """Llama's decoder layer calls ``self_attn(hidden_states=..., ...)`` with keywords only."""
    path = "model.layers.0.self_attn"
    probe = (
        ts.select(ts.wrap(llama_hf))
        .at(path)
        .insert_before(ts.layers.Scale(0.25, on="hidden_states", index=ts.idx[:, :3]))
    )

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert not args  # the reference really is a keyword argument
        return args, {**kwargs, "hidden_states": ref_scale(S[:, :3], 0.25)(kwargs["hidden_states"])}

    with torch.no_grad():
        with hooks(llama_hf, pre={path: pre}, with_kwargs=True):
            want = logits_of(llama_hf(token_ids))
        got = logits_of(ts.run(probe, token_ids).output)
        clean = logits_of(llama_hf(token_ids))
    assert max_diff(got, want) <= TOL
    assert max_diff(got, clean) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_on_output_element_attention_weights(family: str, token_ids: torch.Tensor) -> None:
    """With eager attention, element 1 of the attention output is the attention pattern."""
    hf = make_gpt2("eager") if family == "gpt2" else make_llama("eager")
    path = "transformer.h.0.attn" if family == "gpt2" else "model.layers.0.self_attn"
    probe = ts.select(ts.wrap(hf)).at(path).insert_after(ts.layers.Save("pattern", on=1))
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        with hooks(hf, post={path: lambda m, a, out: captured.append(out[1])}):
            want = logits_of(hf(token_ids))
        result = ts.run(probe, token_ids)
    pattern = result.saved["pattern"]
    assert pattern.shape == (token_ids.shape[0], 4, token_ids.shape[1], token_ids.shape[1])
    assert max_diff(pattern, captured[0]) <= TOL
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.equal(logits_of(result.output), want)


def test_on_output_field_of_a_model_output(gpt2_hf: nn.Module, token_ids: torch.Tensor) -> None:
    """``on="last_hidden_state"`` edits a field of the transformer's ``ModelOutput``."""
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(4))
    model = ts.wrap(gpt2_hf)
    probe = (
        ts.select(model)
        .at("transformer")
        .insert_after(ts.layers.Add(vec, 1.5, on="last_hidden_state", index=ts.idx[:, -1]))
    )
    root = ts.select(model).insert_after(ts.layers.Scale(3.0, on="logits"))

    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        output["last_hidden_state"] = ref_add(S[:, -1], 1.5 * vec)(output["last_hidden_state"])
        return output

    with torch.no_grad():
        with hooks(gpt2_hf, post={"transformer": post}):
            want = logits_of(gpt2_hf(token_ids))
        clean = logits_of(gpt2_hf(token_ids))
        got = ts.run(probe, token_ids).output.logits
        scaled = ts.run(root, token_ids).output.logits
    assert max_diff(got, want) <= TOL
    assert max_diff(got, clean) > 1e-3
    assert max_diff(scaled, 3.0 * clean) <= TOL


# --------------------------------------------------------------------- several sites


def test_several_sites_at_once(llama_hf: nn.Module, token_ids: torch.Tensor) -> None:
    vec = torch.randn(128, generator=torch.Generator().manual_seed(8))
    model = ts.wrap(llama_hf)
    probe = (
        ts.select(model)
        .at_instances_of("LlamaMLP")
        .at("down_proj")
        .insert_before(ts.layers.Add(vec, 0.5, index=ts.idx[:, -2:]))
    )
    blocks = ts.select(probe).at("model.layers.*")
    assert blocks.count() == 3
    probe = blocks.insert_after(ts.layers.Save("resid_{n}"))

    captured: dict[str, torch.Tensor] = {}

    def capture(key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[key] = output

        return hook

    pre = {
        f"model.layers.{i}.mlp.down_proj": replace_input(ref_add(S[:, -2:], 0.5 * vec))
        for i in range(3)
    }
    post = {f"model.layers.{i}": capture(f"resid_{i}") for i in range(3)}
    with torch.no_grad():
        with hooks(llama_hf, pre=pre, post=post):
            want = logits_of(llama_hf(token_ids))
        result = ts.run(probe, token_ids)

    assert max_diff(result.output.logits, want) <= TOL
    assert set(result.saved) == {"resid_0", "resid_1", "resid_2"}
    for key, value in captured.items():
        assert max_diff(result.saved[key], value) <= TOL, key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stacked_layers_at_one_site_run_in_documented_order(
    family: str, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    """Layers at one site run in insertion order, in the direction the data flows."""
    hf = tiny_model(family)
    spec = FAMILIES[family]
    vec = torch.randn(spec["proj_width"], generator=torch.Generator().manual_seed(9))
    model = ts.wrap(hf)
    probe = ts.select(model).at(spec["proj"]).insert_before(ts.layers.Scale(2.0))
    probe = ts.select(probe).at(spec["proj"]).insert_before(ts.layers.Add(vec, 1.0))
    probe = ts.select(probe).at(spec["block"]).insert_after(ts.layers.Scale(0.5))
    probe = ts.select(probe).at(spec["block"]).insert_after(ts.layers.SetValues(ts.idx[:, 0], 1.0))
    assert [type(m).__name__ for m in get_module(probe, spec["proj"] + ".ts_before")] == [
        "Scale",
        "Add",
    ]

    def before(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + vec

    def after(x: torch.Tensor) -> torch.Tensor:
        return ref_set(S[:, 0], 1.0)(x * 0.5)

    with torch.no_grad():
        with hooks(
            hf,
            pre={spec["proj"]: replace_input(before)},
            post={spec["block"]: replace_output(after)},
        ):
            want = logits_of(hf(token_ids))
        got = logits_of(ts.run(probe, token_ids).output)
    assert max_diff(got, want) <= TOL


# --------------------------------------------------------------------- the seed experiment


def test_seed_experiment(seed_llama_hf: nn.Module) -> None:
    """Force MLP neurons on in layers 12 and 13, clean rows 0-2 and intervened rows 3+."""
    prompts = torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(21))
    batch = torch.cat([prompts, prompts])  # rows 0-2 clean, rows 3-5 intervened
    model = ts.wrap(seed_llama_hf)
    probe = model
    for layer, neurons in SEED_NEURONS.items():
        down = (
            ts.select(probe)
            .at_instances_of("LlamaMLP")
            .where(ts.layer_index.isin([layer]))
            .at("down_proj")
        )
        assert down.paths == (f"model.layers.{layer}.mlp.down_proj",)
        # SetValues first, Save second: layers run in insertion order, so Save sees
        # the input down_proj actually receives.
        probe = down.insert_before(ts.layers.SetValues(ts.idx[3:, -1, neurons], 5.0))
        probe = ts.select(probe).at(down.paths[0]).insert_before(ts.layers.Save(f"down_in_{layer}"))

    def force(neurons: list[int]) -> Callable:
        def pre(module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[3:, -1, neurons] = 5.0
            return (x, *args[1:])

        return pre

    clean_inputs: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Callable:
        def pre(module: nn.Module, args: tuple) -> None:
            clean_inputs[layer] = args[0]

        return pre

    down_paths = {layer: f"model.layers.{layer}.mlp.down_proj" for layer in SEED_NEURONS}
    with torch.no_grad():
        result = ts.run(probe, batch)
        clean = seed_llama_hf(batch).logits
        clean_alone = seed_llama_hf(prompts).logits
        with hooks(seed_llama_hf, pre={p: force(SEED_NEURONS[k]) for k, p in down_paths.items()}):
            want = seed_llama_hf(batch).logits
        with hooks(seed_llama_hf, pre={p: keep(k) for k, p in down_paths.items()}):
            seed_llama_hf(batch)
    got = result.output.logits

    assert torch.equal(got[:3], clean[:3])  # clean rows: exactly the clean model
    assert max_diff(got[:3], clean_alone) <= TOL  # ... and the clean prompts run alone
    assert max_diff(got[3:], want[3:]) <= TOL  # intervened rows: the hooked reference
    assert torch.equal(got[3:], want[3:])
    assert max_diff(got[3:, -1], got[:3, -1]) > 1e-2  # forcing the neurons changes the logits
    assert torch.equal(got[3:, :-1], got[:3, :-1])  # ... at the last position only (causal)
    for layer, neurons in SEED_NEURONS.items():
        seen = result.saved[f"down_in_{layer}"]
        assert seen.shape == (6, 6, 9472)
        assert torch.all(seen[3:, -1, neurons] == 5.0)
        assert torch.equal(seen[:3], clean_inputs[layer][:3])


# --------------------------------------------------------------------- patching rows


def test_patch_clean_row_into_corrupted_row(gpt2_hf: nn.Module) -> None:
    """Activation patching in one batch: row 0 clean, row 1 corrupted, patch one position."""
    clean_prompt = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(31))
    corrupted_prompt = clean_prompt.clone()
    corrupted_prompt[0, 1] = (corrupted_prompt[0, 1] + 17) % VOCAB
    batch = torch.cat([clean_prompt, corrupted_prompt])
    block, position = "transformer.h.1", 3

    probe = (
        ts.select(ts.wrap(gpt2_hf))
        .at(block)
        .insert_after(ts.layers.Patch(source_rows=0, target_rows=1, index=ts.idx[position]))
    )

    # Reference 1: the same batch, a plain hook copying row 0 into row 1 at that position.
    def in_batch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[1, position] = output[0, position]
        return out

    # Reference 2: the classic two passes: keep the clean activation, patch it in later.
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        kept.append(output[0, position].clone())

    def patch_in(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[0, position] = kept[0]
        return out

    with torch.no_grad():
        got = ts.run(probe, batch).output.logits
        clean = gpt2_hf(batch).logits
        with hooks(gpt2_hf, post={block: in_batch}):
            want = gpt2_hf(batch).logits
        with hooks(gpt2_hf, post={block: keep}):
            gpt2_hf(clean_prompt)
        with hooks(gpt2_hf, post={block: patch_in}):
            two_pass = gpt2_hf(corrupted_prompt).logits

    assert torch.equal(got[0], clean[0])  # the source row is untouched
    assert max_diff(got, want) <= TOL
    assert max_diff(got[1], two_pass[0]) <= 1e-5
    assert torch.equal(got[1, :position], clean[1, :position])  # before the patch: corrupted
    assert max_diff(got[1, position:], clean[1, position:]) > 1e-3  # from it on: patched


# --------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_applies_the_intervention_at_every_step(
    family: str, tiny_model: Callable, token_ids: torch.Tensor
) -> None:
    hf = tiny_model(family)
    spec = FAMILIES[family]
    first_block = spec["block"].replace(".1", ".0")
    last_block = spec["block"].replace(".1", ".2")
    vec = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(12))
    probe = ts.select(ts.wrap(hf)).at(spec["block"]).insert_after(ts.layers.Add(vec, 4.0))
    probe = ts.select(probe).at(last_block).insert_after(ts.layers.Save("last"))
    probe = ts.select(probe).at(first_block).insert_after(ts.layers.Save("first"))
    ids = token_ids[:2]
    options = {
        "max_new_tokens": 4,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": True,
    }

    result = ts.run(probe.generate, ids, **options)

    steps: dict[str, list[torch.Tensor]] = {"first": [], "last": []}

    def capture(key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            steps[key].append(output)

        return hook

    post = {
        spec["block"]: replace_output(lambda x: x + 4.0 * vec),
        first_block: capture("first"),
        last_block: capture("last"),
    }
    with hooks(hf, post=post):
        want = hf.generate(ids, **options)
    clean = hf.generate(ids, **options)

    got = result.output
    assert torch.equal(got.sequences, want.sequences)
    assert not torch.equal(got.sequences, clean.sequences)
    assert len(got.logits) == len(want.logits) == 4
    for step, (g, w, c) in enumerate(zip(got.logits, want.logits, clean.logits, strict=True)):
        assert max_diff(g, w) <= TOL, step
        assert max_diff(g, c) > 1e-3, step  # the intervention is there at every step
    for key in ("first", "last"):
        saved = result.records[key]
        assert isinstance(saved, list) and len(saved) == 4  # one per forward pass, in order
        with pytest.raises(ts.SurgeryError, match=rf"records\['{key}'\]"):
            result.saved[key]  # several calls: no single tensor, and the error says where
        assert [tuple(t.shape) for t in saved] == [(2, 7, HIDDEN)] + [(2, 1, HIDDEN)] * 3
        for step, (s, w) in enumerate(zip(saved, steps[key], strict=True)):
            assert max_diff(s, w) <= TOL, (key, step)


def test_generate_matches_reference_with_seed_neurons(seed_llama_hf: nn.Module) -> None:
    """The seed experiment through ``generate``: forced neurons at every new last position."""
    ids = torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(41))
    probe = ts.wrap(seed_llama_hf)
    for layer, neurons in SEED_NEURONS.items():
        probe = (
            ts.select(probe)
            .at(f"model.layers.{layer}.mlp.down_proj")
            .insert_before(ts.layers.SetValues(ts.idx[2:, -1, neurons], 5.0))
        )

    def force(neurons: list[int]) -> Callable:
        def pre(module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            x[2:, -1, neurons] = 5.0
            return (x,)

        return pre

    got = ts.run(probe.generate, ids, max_new_tokens=4, do_sample=False).output
    pre = {f"model.layers.{k}.mlp.down_proj": force(v) for k, v in SEED_NEURONS.items()}
    with hooks(seed_llama_hf, pre=pre):
        want = seed_llama_hf.generate(ids, max_new_tokens=4, do_sample=False)
    clean = seed_llama_hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert torch.equal(got[:2], clean[:2])
