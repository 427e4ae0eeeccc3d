"""Tensor parallel on 2 gloo ranks: every layer, at every kind of site, equals the unsharded model.

A Llama (MLP 9472 wide, so the seed experiment's neurons exist: 2519 on rank 0, 7171 on
rank 1 as its local neuron 2435) is sharded with its own ``base_model_tp_plan`` (q/k/v and
gate/up column-wise, o and down row-wise), a GPT-2 with its MLP's ``Conv1D`` projections
column-/row-wise. Plans are made in this process against the *unsharded* models, sent to
the ranks as bytes and replayed there with ``ts.distributed.apply``; logits, saved tensors
and saved gradients must equal the unsharded model's under the same plan (max abs diff
<= 1e-5), and every edit must change the logits (an edit that does nothing proves nothing).
The seed experiment is also checked against a hand-written ``register_forward_pre_hook`` on
the plain model.

One launch runs the whole battery (both models, all cases, the refusals, the selector
paths); the launcher's failure and timeout paths have launches of their own. All
multi-process tests are ``slow`` (they run in CI) and bounded by the launcher's timeout.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hook_reference import hooks, max_diff, replace_input
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, parallelize_module
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import torchsurgeon as ts
import torchsurgeon.distributed as tsd
import torchsurgeon.distributed.sharded as sharded_module
from torchsurgeon.distributed.launch import _build, _loopback_store
from torchsurgeon.distributed.parallelize import tensor_parallel_of
from torchsurgeon.layers import (
    Add,
    Compute,
    ComputeGrad,
    InterventionLayer,
    LowRankAdapter,
    MeanAblate,
    Noise,
    Patch,
    Save,
    SaveGrad,
    Scale,
    SetValues,
    Stop,
    StopGradient,
    Zero,
)

WORLD = 2
WIDTH = 9472
TOLERANCE = 1e-5
MLP = "model.layers.1.mlp"
GPT2_PLAN = {"transformer.h.*.mlp.c_fc": "colwise", "transformer.h.*.mlp.c_proj": "rowwise"}
SEED_INDEX = ts.idx[3:, -1, [7171, 2519]]


def make_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=WIDTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(n_inner: int | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_inner=n_inner,
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def token_ids() -> torch.Tensor:
    return torch.randint(2, 64, (5, 6), generator=torch.Generator().manual_seed(7))


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Normalize(InterventionLayer):
    """Not local to a shard (a norm over the sharded dimension): gathered, edited, scattered."""

    type_name = "TestNormalize"
    takes_index = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True) * 3.0


Probe = Callable[[nn.Module], nn.Module]


def at(model: nn.Module, path: str) -> ts.Selection:
    return ts.select(model).at(path)


def chain(*steps: Callable[[nn.Module], nn.Module]) -> Probe:
    def probe(model: nn.Module) -> nn.Module:
        for step in steps:
            model = step(model)
        return model

    return probe


def before(path: str, layer: nn.Module) -> Probe:
    return lambda m: at(m, path).insert_before(layer)


def after(path: str, layer: nn.Module) -> Probe:
    return lambda m: at(m, path).insert_after(layer)


DOWN, GATE, UP = f"{MLP}.down_proj", f"{MLP}.gate_proj", f"{MLP}.up_proj"
ATTN = "model.layers.0.self_attn"

LLAMA_CASES: dict[str, Probe] = {
    "seed experiment": chain(before(DOWN, SetValues(SEED_INDEX, 5.0)), before(DOWN, Save("h"))),
    "save hidden, every layer": lambda m: (
        ts.select(m)
        .at_instances_of("LlamaMLP")
        .at("down_proj")
        .insert_before(Save("hidden{layer}"))
    ),
    "add to hidden": before(DOWN, Add(rand(WIDTH, seed=1), 0.5)),
    "scale neurons (strided slice)": before(
        DOWN, Scale(rand(334, seed=2), index=ts.idx[..., 4000:5000:3])
    ),
    "zero across the shard boundary": before(DOWN, Zero(ts.idx[:, 1:4, 4700:4800])),
    "mean-ablate last position": before(DOWN, MeanAblate(rand(WIDTH, seed=3), index=ts.idx[:, -1])),
    "noise": before(DOWN, Noise(0.3, seed=7, index=ts.idx[1:3])),
    "patch neurons": chain(
        before(DOWN, Patch(0, [2, 4], ts.idx[-1, [7171, 100, 4736]])), before(DOWN, Save("h"))
    ),
    "gate output (column-wise shard)": chain(
        after(GATE, SetValues(ts.idx[..., [5000, 10]], -3.0)), after(GATE, Save("gate"))
    ),
    "LoRA after column-wise up": after(
        UP, LowRankAdapter(rand(4, 32, seed=4), rand(WIDTH, 4, seed=5) * 0.1, 0.7)
    ),
    "LoRA after row-wise down": after(
        DOWN, LowRankAdapter(rand(3, WIDTH, seed=6) * 0.05, rand(32, 3, seed=7), 1.5)
    ),
    "heads (o_proj input)": chain(
        before(f"{ATTN}.o_proj", Zero(ts.idx[..., 8:16])),
        before(f"{ATTN}.o_proj", Scale(2.0, index=ts.idx[..., 24:32])),
        before(f"{ATTN}.o_proj", Save("heads")),
    ),
    "q, k, v": chain(
        after(f"{ATTN}.q_proj", Save("q")),
        after(f"{ATTN}.k_proj", Scale(0.5, index=ts.idx[..., 0:8])),
        after(f"{ATTN}.k_proj", Save("k")),
        after(f"{ATTN}.v_proj", SetValues(ts.idx[:, 2, 12], 4.0)),
        after(f"{ATTN}.v_proj", Save("v")),
    ),
    "gate input (replicated DTensor)": chain(
        before(GATE, Add(rand(32, seed=8), 1.0)), before(GATE, Save("gate_in"))
    ),
    "down output (replicated, all-reduced)": chain(
        after(DOWN, Save("down_out")), after(DOWN, Scale(rand(32, seed=9)))
    ),
    "inside the MLP (act_fn: laid out by its DTensor twin)": chain(
        before(f"{MLP}.act_fn", Save("act_in")),
        after(f"{MLP}.act_fn", SetValues(ts.idx[:, 2:, [7171, 10, 4736]], 2.0)),
        after(f"{MLP}.act_fn", Scale(0.5, index=ts.idx[..., 4700:4800])),
        after(f"{MLP}.act_fn", Save("act")),
    ),
    "compute (centred: gathered)": chain(
        before(DOWN, Compute(ts.here - ts.here.mean(-1, keepdim=True))), before(DOWN, Save("h"))
    ),
    "compute from a saved shard": chain(
        after(GATE, Save("gate")), before(DOWN, Compute(ts.here * 0.5 + ts.saved("gate") * 0.1))
    ),
    "residual stream": chain(
        after("model.layers.0", Add(rand(32, seed=10), 2.0)),
        after("model.layers.0", Save("resid")),
        after(MLP, Save("mlp_out")),
        before(MLP, SetValues(ts.idx[0, -1], 1.0)),
    ),
}
GRAD_CASE: Probe = chain(
    before(DOWN, SetValues(SEED_INDEX, 5.0)),
    before(DOWN, SaveGrad("g_hidden")),
    after(GATE, SaveGrad("g_gate")),
    after("model.layers.0.mlp.up_proj", StopGradient()),
    after("model.layers.0", SaveGrad("g_resid")),
)
GATHERED_CASE: Probe = chain(
    before("model.layers.0.mlp.down_proj", Normalize()),
    after("model.layers.0.mlp.gate_proj", SaveGrad("g_gate0")),
    before("model.layers.0.mlp.down_proj", Save("normalized")),
    after(f"{MLP}.act_fn", Normalize()),  # inside a region: gathered by the layout found there
    after(f"{MLP}.act_fn", SaveGrad("g_act")),
)

EDITED_GRAD_CASE: Probe = chain(  # gradients edited at sharded sites, read upstream
    before(DOWN, ComputeGrad(ts.here + 0.01)),  # maps zero elsewhere: a per-rank edit would not
    after(f"{MLP}.act_fn", ComputeGrad(ts.here / ts.here.norm())),  # the norm of the whole
    after("model.layers.0", SaveGrad("g_resid0")),
    after(UP, SaveGrad("g_up")),
)
UPSTREAM_GRAD_CASE: Probe = chain(  # for backward=: autograd is asked for these tensors only
    after("model.layers.0.mlp.gate_proj", SaveGrad("g_gate0")),  # sharded, upstream of ...
    after("model.layers.0", SaveGrad("g_resid0")),  # ... a replicated site
    after(GATE, SaveGrad("g_gate1")),
    after(DOWN, LowRankAdapter(rand(3, WIDTH, seed=6) * 0.1, rand(32, 3, seed=7), 1.5)),
    before(DOWN, SaveGrad("g_down_in")),  # through the adapter's sum over the ranks too
)
BACKWARD = ts.out("logits")[:, -1, :8].mean()  # gradients of order one, as the activations
FROM_SAVED_CASE: Probe = chain(  # a loss read from a gathered shard, gradients upstream of it
    before(DOWN, Save("down_in")),
    after("model.layers.0", SaveGrad("g_resid0")),
    before(f"{MLP}.up_proj", SaveGrad("g_up_in")),
)
FROM_SAVED = ts.saved("down_in").square().mean() + BACKWARD
TRAIN_CASE: Probe = chain(  # a layer of each kind of site, every one of them trained
    after(UP, LowRankAdapter(rand(4, 32, seed=20), rand(WIDTH, 4, seed=21) * 0.1, 0.7)),
    after(DOWN, LowRankAdapter(rand(3, WIDTH, seed=22) * 0.1, rand(32, 3, seed=23), 1.5)),
    after("model.layers.0", Add(rand(32, seed=24), 0.5)),
    before(DOWN, SetValues(ts.idx[:, -1, 4730:4742], rand(12, seed=25))),  # both shards
    after(f"{MLP}.act_fn", Add(rand(WIDTH, seed=26), 0.5)),  # inside the sharded region
)
TRAINING = {  # SGD: equal gradients give equal steps (Adam's scaling magnifies rounding)
    "loss": ts.out("logits")[:, -1].logsumexp(-1).mean(),
    "optimizer": ts.optim.SGD(lr=0.5),
    "steps": 3,
}


TRAINED = [  # the layers TRAIN_CASE inserted, as the plan names them (on either model)
    f"{UP}.ts_after.0",
    f"{DOWN}.ts_after.0",
    "model.layers.0.ts_after.0",
    f"{DOWN}.ts_before.0",
    f"{MLP}.act_fn.ts_after.0",
]


def trained(
    model: nn.Module,
    ids: torch.Tensor,
    place: Callable[[nn.Module], nn.Module] = lambda m: m,
    gpt2: bool = False,
) -> dict[str, Any]:
    """``ts.train`` of every layer ``TRAIN_CASE`` (GPT-2: the two adapters of ``"LoRA on
    both projections"``) put in ``model``: losses and tensors."""
    probe = GPT2_CASES["LoRA on both projections"] if gpt2 else TRAIN_CASE
    params = GPT2_TRAINED if gpt2 else TRAINED
    done = ts.train(place(probe(model)), [ids], params=params, **TRAINING)
    return {"losses": done.losses, "tensors": done.tensors}


C_FC, C_PROJ = "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"
GPT2_TRAINED = [f"{C_FC}.ts_after.0", f"{C_PROJ}.ts_after.0"]  # sharded Conv1D projections
GPT2_CASES: dict[str, Probe] = {
    "save hidden, every block": lambda m: (
        ts.select(m).at_instances_of("GPT2MLP").at("c_proj").insert_before(Save("hidden{layer}"))
    ),
    "neurons": chain(
        before(C_PROJ, SetValues(ts.idx[3:, -1, [70, 5]], 5.0)), before(C_PROJ, Save("h"))
    ),
    "c_fc output": chain(
        after(C_FC, Add(rand(128, seed=11), index=ts.idx[:, -1])), after(C_FC, Save("fc"))
    ),
    "LoRA on both projections": chain(
        after(C_FC, LowRankAdapter(rand(2, 32, seed=12), rand(128, 2, seed=13), 0.5)),
        after(C_PROJ, LowRankAdapter(rand(2, 128, seed=14), rand(32, 2, seed=15), 0.5)),
    ),
    "inside the MLP (act: split; dropout: replicated)": chain(
        after("transformer.h.1.mlp.act", Add(rand(128, seed=16), index=ts.idx[:, -1])),
        after("transformer.h.1.mlp.act", Save("act")),
        before("transformer.h.1.mlp.dropout", Scale(rand(32, seed=17))),
        before("transformer.h.1.mlp.dropout", Save("dropout_in")),
    ),
    "mlp output and attention (replicated)": chain(
        after("transformer.h.1.mlp", Scale(1.5)),
        after("transformer.h.1.mlp", Save("mlp")),
        after("transformer.h.0.attn.c_attn", Save("qkv")),
    ),
}


# A converted model (ts.convert) has its attention's steps as modules: q/k/v are
# HeadProjections split by heads, everything between them and attn.out sits inside the region.
BLOCK1 = "blocks.1"
CONVERTED_CASES: dict[str, Probe] = {
    "heads: pattern and head_out": chain(
        after(f"{BLOCK1}.attn.pattern", Save("pattern")),
        after(f"{BLOCK1}.attn.head_out", Zero(ts.idx[:, :, 1])),  # head 1: rank 0's second
        after(f"{BLOCK1}.attn.head_out", Scale(3.0, index=ts.idx[:, -1, [0, 3]])),  # both
        after(f"{BLOCK1}.attn.head_out", Save("z")),
    ),
    "q, k, v heads": chain(
        after("blocks.0.attn.q", Save("q")),
        after("blocks.0.attn.k", SetValues(ts.idx[:, 2, 1], 3.0)),  # key head 1: rank 1's
        after("blocks.0.attn.v", Save("v")),
    ),
    "rotary, scores, mask": chain(
        after(f"{BLOCK1}.attn.q_rot", Save("q_rot")),
        after(f"{BLOCK1}.attn.scores", Scale(0.5, index=ts.idx[:, 2:])),
        after(f"{BLOCK1}.attn.mask", Save("masked")),
    ),
    "mlp hidden": chain(
        after(f"{BLOCK1}.mlp.hidden", SetValues(ts.idx[3:, -1, [7171, 2519]], 5.0)),
        after(f"{BLOCK1}.mlp.hidden", Save("hidden")),
    ),
    "attention output's input (heads flattened)": chain(
        before(f"{BLOCK1}.attn.out", Zero(ts.idx[..., 8:16])),
        before(f"{BLOCK1}.attn.out", Save("heads")),
    ),
    "residual stream": chain(
        after("blocks.0", Add(rand(32, seed=40), 1.0)), after("blocks.0", Save("resid"))
    ),
}
CONVERTED_GRAD_CASE: Probe = chain(
    after(f"{BLOCK1}.attn.pattern", SaveGrad("g_pattern")),
    after(f"{BLOCK1}.mlp.hidden", SaveGrad("g_hidden")),
    after("blocks.0.attn.v", SaveGrad("g_v")),
)
CONVERTED_GPT2_CASES: dict[str, Probe] = {
    "heads and MLP hidden": chain(
        after(f"{BLOCK1}.attn.pattern", Save("pattern")),
        after(f"{BLOCK1}.attn.head_out", Zero(ts.idx[:, :, 2])),
        after(f"{BLOCK1}.mlp.hidden", Add(rand(128, seed=41), index=ts.idx[:, -1])),
        after(f"{BLOCK1}.mlp.hidden", Save("hidden")),
    ),
}


def entries(result: ts.Result) -> dict[str, torch.Tensor]:
    output = result.output  # a transformers model's output, or a converted model's logits
    out = {"logits": output if isinstance(output, torch.Tensor) else output.logits}
    out.update({key: values[0] for key, values in result.records.items() if values})
    return {key: value.detach().clone() for key, value in out.items()}


def weights(vocab: int) -> torch.Tensor:
    """The loss's weights: a weighted mean over the 30 positions, so the gradients are of order
    one, like the activations, and the absolute tolerance means the same for both."""
    return rand(5, 6, vocab, seed=99) / 30


def with_backward(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    result = ts.run(model, ids)
    logits = entries(result)["logits"]
    output = result.output if isinstance(result.output, torch.Tensor) else result.output.logits
    (output * weights(logits.shape[-1])).sum().backward()
    return entries(result)


def with_backward_expression(
    model: nn.Module, ids: torch.Tensor, loss: ts.Expr = BACKWARD
) -> dict[str, torch.Tensor]:
    return entries(ts.run(model, ids, backward=loss))


def errors_of(tree: nn.Module, ids: torch.Tensor) -> dict[str, str]:
    """What the sharded model refuses, and how it says so."""
    found: dict[str, str] = {}

    def attempt(name: str, make: Callable[[], Any]) -> None:
        try:
            make()
        except tsd.TensorParallelError as error:
            found[name] = str(error)
        else:
            found[name] = "(nothing raised)"

    unplaced = before(DOWN, SetValues(SEED_INDEX, 5.0))(tree)
    attempt("unplaced", lambda: unplaced(ids))
    attempt("replaced", lambda: tsd.localize(at(tree, f"{MLP}.act_fn").replace(Scale(2.0))))
    placed = tsd.localize(before(DOWN, Save("h"))(tree))
    attempt("inserted after localize", lambda: before(UP, Zero())(placed)(ids))
    return found


def counting_gathers() -> list[int]:
    """Count the activation gathers of placed layers (on this rank, from now on)."""
    calls: list[int] = []

    def counting(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(1)
            return original(*args, **kwargs)

        return counted

    sharded_module.gather = counting(sharded_module.gather)  # gather-edit-scatter
    sharded_module.gather_whole = counting(sharded_module.gather_whole)  # recordings
    return calls


def placed(view: nn.Module) -> nn.Module:
    """A rewrite localized if its base is sharded (the same helper runs on both sides)."""
    return tsd.localize(view) if tensor_parallel_of(view) is not None else view


def stopped_at_down(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """A run ended by ``Stop`` at a sharded site: its output (None) and what it saved."""
    stopped = placed(chain(before(DOWN, Save("h")), before(DOWN, Stop()))(model))
    with torch.no_grad():
        result = ts.run(stopped, ids)
    return result.output, result.saved["h"]


def llama_rank(plans: dict[str, bytes], ids: torch.Tensor, mesh: Any) -> dict[str, Any]:
    tree = tsd.parallelize(make_llama(), mesh, "auto")
    out: dict[str, Any] = {"cases": {}, "gathers": {}}
    gathers = counting_gathers()
    for name, data in plans.items():
        gathers.clear()
        plan = ts.Plan.from_bytes(data)
        view = tsd.apply(plan, tree)
        if name == "grads":
            out["cases"][name] = with_backward(view, ids)
        else:
            with torch.no_grad():
                out["cases"][name] = entries(ts.run(view, ids))
        out["gathers"][name] = len(gathers)
        if name == "seed experiment":
            out["plan round trip"] = tsd.plan(view) == plan
            generated = ts.run(view.generate, ids, max_new_tokens=3, do_sample=False)
            out["generate"] = (generated.output, generated.records["h"])
    gathers.clear()
    out["cases"]["gathered"] = with_backward(tsd.localize(GATHERED_CASE(tree)), ids)
    out["gathers"]["gathered"] = len(gathers)
    out["cases"]["edited gradients"] = with_backward(tsd.localize(EDITED_GRAD_CASE(tree)), ids)
    out["stop"] = stopped_at_down(tree, ids)
    upstream = tsd.localize(UPSTREAM_GRAD_CASE(tree))
    out["cases"]["backward= upstream"] = with_backward_expression(upstream, ids)
    out["trained"] = trained(tree, ids, tsd.localize)
    from_saved = tsd.localize(FROM_SAVED_CASE(tree))
    out["cases"]["backward= from a saved shard"] = with_backward_expression(
        from_saved, ids, FROM_SAVED
    )
    rank0 = tsd.apply(
        ts.Plan.from_bytes(plans["save hidden, every layer"]), tree, record_on="rank0"
    )
    with torch.no_grad():
        keys = sorted(ts.run(rank0, ids).saved)
    everyone: list[Any] = [None] * WORLD
    dist.all_gather_object(everyone, keys)
    out["rank0 keys"] = everyone
    out["errors"] = errors_of(tree, ids)
    out["paths"] = list(ts.select(tree).at("**").paths)
    out["mlp paths"] = list(ts.select(tree).at_instances_of("LlamaMLP").paths)
    out["layouts"] = {p: layout.describe() for p, layout in tsd.site_layouts(tree).items()}
    return out


def gpt2_rank(plans: dict[str, bytes], ids: torch.Tensor, mesh: Any) -> dict[str, Any]:
    tree = tsd.parallelize(make_gpt2(), mesh, GPT2_PLAN)
    out: dict[str, Any] = {"cases": {}}
    for name, data in plans.items():
        view = tsd.apply(ts.Plan.from_bytes(data), tree)
        if name == "grads":
            out["cases"][name] = with_backward(view, ids)
            continue
        with torch.no_grad():
            out["cases"][name] = entries(ts.run(view, ids))
    out["trained"] = trained(tree, ids, tsd.localize, gpt2=True)
    out["conv1d paths"] = list(ts.select(tree).at_instances_of("Conv1D").paths)
    try:
        tsd.parallelize(make_gpt2(n_inner=127), mesh, GPT2_PLAN)
    except tsd.TensorParallelError as error:
        out["odd width"] = str(error)
    return out


class Opaque:
    """An argument no meta copy can be made of (as a key-value cache is)."""


class Block(nn.Module):
    """A region whose code makes tensors no layer may treat as a part of the full one."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.act, self.total, self.flat = nn.ReLU(), nn.Identity(), nn.Identity()
        self.twice, self.head = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor, extra: Any = None) -> torch.Tensor:
        h = self.act(self.up(x))
        total = self.total(h.sum(-1, keepdim=True))  # a partial sum on each rank
        flat = self.flat(h.reshape(h.shape[0], -1))  # features folded into positions
        self.twice(h)
        self.twice(x)  # called on a split and on a replicated tensor
        self.head(h[..., :4])  # the first 4 features of the full tensor? of each shard here
        return self.down(h) + 0 * total + 0 * flat.sum()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor, extra: Any = None) -> torch.Tensor:
        return self.block(x, extra=extra)


def refusals_inside(mesh: Any) -> dict[str, str]:
    """What the sites inside a region refuse, and how they say so; and what they allow."""
    torch.manual_seed(0)
    tree = tsd.parallelize(Outer(), mesh, {"block.up": "colwise", "block.down": "rowwise"})
    x = rand(2, 3, 8, seed=30)
    found: dict[str, str] = {}
    for name, probe, kwargs in (
        ("partial sum", after("block.total", Save("t")), {}),
        ("folded", after("block.flat", Save("f")), {}),
        ("twice", after("block.twice", Save("w")), {}),
        ("sliced", after("block.head", Save("s")), {}),
        ("opaque argument", after("block.act", Save("a")), {"extra": Opaque()}),
        ("split", after("block.act", Save("a")), {}),
    ):
        try:
            result = ts.run(tsd.localize(probe(tree)), x, **kwargs)
        except tsd.TensorParallelError as error:
            found[name] = str(error)
        else:
            found[name] = f"ran: {[tuple(v[0].shape) for v in result.records.values()]}"
    return found


def cached_runs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer inside the MLP region (which is called with ``x`` alone) in a generation and
    in a forward pass filling a KV cache: the tokens, and what the layer saved."""
    hidden = placed(CONVERTED_CASES["mlp hidden"](model))
    tokens = ts.models.generate(hidden, ids, 3)
    saved = ts.run(hidden, ids, cache=hidden.new_cache()).saved["hidden"]
    return tokens, saved


def cached_heads(model: nn.Module, ids: torch.Tensor) -> Any:
    """A layer inside block 1's attention, which is called with the KV cache (holding, on a
    sharded model, block 0's keys for this rank's heads): what it saved, or the refusal."""
    heads = placed(CONVERTED_CASES["heads: pattern and head_out"](model))
    try:
        return ts.run(heads, ids, cache=heads.new_cache()).saved["pattern"]
    except tsd.TensorParallelError as error:
        return str(error)


def converted_rank(plans: dict[str, dict[str, bytes]], ids: torch.Tensor, mesh: Any) -> dict:
    """Converted Llama and GPT-2, sharded with their config's plan ("auto")."""
    out: dict[str, Any] = {}
    trees = {}
    for family, make in (("converted llama", make_llama), ("converted gpt2", make_gpt2)):
        tree = trees[family] = tsd.parallelize(ts.convert(make()), mesh, "auto")
        cases = {}
        for name, data in plans[family].items():
            view = tsd.apply(ts.Plan.from_bytes(data), tree)
            if name == "grads":
                cases[name] = with_backward(view, ids)
                continue
            with torch.no_grad():
                cases[name] = entries(ts.run(view, ids))
        out[family] = {"cases": cases}
    llama = trees["converted llama"]
    out["converted llama"]["generate"] = cached_runs(llama, ids)
    out["converted llama"]["cached heads"] = cached_heads(llama, ids)
    return out


def make_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        attn_implementation="eager",
    )
    return Qwen3ForCausalLM(config).eval()


def qwen3_norms(model: nn.Module) -> nn.Module:
    """Qwen3's per-head query/key norms: modules inside the attention region (its plan leaves
    them whole: 'replicated_with_grad_allreduce')."""
    attn = "model.layers.1.self_attn"
    model = after(f"{attn}.q_norm", Save("q_norm"))(model)
    return after(f"{attn}.k_norm", Scale(2.0, index=ts.idx[:, :, 1]))(model)  # rank 1's head


def qwen3_rank(ids: torch.Tensor, mesh: Any) -> dict[str, Any]:
    view = tsd.localize(qwen3_norms(tsd.parallelize(make_qwen3(), mesh, "auto")))
    with torch.no_grad():
        result = ts.run(view, ids, use_cache=False)
    out: dict[str, Any] = {"uncached": entries(result)}
    try:  # transformers' DynamicCache goes into the attention: no meta copy of it is made
        ts.run(view, ids, use_cache=True)
    except tsd.TensorParallelError as error:
        out["cached"] = str(error)
    return out


def battery(
    llama: dict[str, bytes], gpt2: dict[str, bytes], converted: dict, ids: torch.Tensor
) -> dict:
    mesh = init_device_mesh("cpu", (WORLD,))
    return {
        "llama": llama_rank(llama, ids, mesh),
        "gpt2": gpt2_rank(gpt2, ids, mesh),
        "inside": refusals_inside(mesh),
        "qwen3": qwen3_rank(ids, mesh),
        **converted_rank(converted, ids, mesh),
    }


def plans_of(base: nn.Module, cases: dict[str, Probe]) -> dict[str, bytes]:
    return {name: ts.plan(probe(base)).to_bytes() for name, probe in cases.items()}


def unsharded(base: nn.Module, cases: dict[str, Probe], ids: torch.Tensor) -> dict[str, dict]:
    out = {}
    for name, probe in cases.items():
        view = probe(base)
        if name in ("grads", "gathered", "edited gradients"):
            out[name] = with_backward(view, ids)
        else:
            with torch.no_grad():
                out[name] = entries(ts.run(view, ids))
    return out


@pytest.fixture(scope="module")
def ranks() -> dict[str, Any]:
    ids = token_ids()
    llama, gpt2 = ts.wrap(make_llama()), ts.wrap(make_gpt2())
    llama_plans = plans_of(llama, {**LLAMA_CASES, "grads": GRAD_CASE})
    gpt2_plans = plans_of(gpt2, {**GPT2_CASES, "grads": after(C_PROJ, SaveGrad("g"))})
    converted = {
        "converted llama": ts.wrap(ts.convert(make_llama())),
        "converted gpt2": ts.wrap(ts.convert(make_gpt2())),
    }
    converted_cases = {
        "converted llama": {**CONVERTED_CASES, "grads": CONVERTED_GRAD_CASE},
        "converted gpt2": CONVERTED_GPT2_CASES,
    }
    converted_plans = {
        family: plans_of(converted[family], cases) for family, cases in converted_cases.items()
    }
    start = time.monotonic()
    out = tsd.launch(
        battery, llama_plans, gpt2_plans, converted_plans, ids, world_size=WORLD, timeout=300
    )
    out["seconds"] = time.monotonic() - start
    llama_cases = {
        **LLAMA_CASES,
        "grads": GRAD_CASE,
        "gathered": GATHERED_CASE,
        "edited gradients": EDITED_GRAD_CASE,
    }
    out["llama"]["reference"] = unsharded(llama, llama_cases, ids)
    upstream = with_backward_expression(UPSTREAM_GRAD_CASE(llama), ids)
    out["llama"]["reference"]["backward= upstream"] = upstream
    from_saved = with_backward_expression(FROM_SAVED_CASE(llama), ids, FROM_SAVED)
    out["llama"]["reference"]["backward= from a saved shard"] = from_saved
    gpt2_cases = {**GPT2_CASES, "grads": after(C_PROJ, SaveGrad("g"))}
    out["gpt2"]["reference"] = unsharded(gpt2, gpt2_cases, ids)
    base = {}
    with torch.no_grad():
        base["llama"] = llama(ids).logits
        base["gpt2"] = gpt2(ids).logits
    out["base logits"] = base
    out["llama"]["stop reference"] = stopped_at_down(llama, ids)
    unedited = with_backward(after("model.layers.0", SaveGrad("g_resid0"))(llama), ids)
    out["llama"]["unedited g_resid0"] = unedited["g_resid0"]
    out["llama"]["trained reference"] = trained(llama, ids)
    out["gpt2"]["trained reference"] = trained(gpt2, ids, gpt2=True)
    for family, cases in converted_cases.items():
        out[family]["reference"] = unsharded(converted[family], cases, ids)
        with torch.no_grad():
            base[family] = converted[family](ids)
    llama_converted = converted["converted llama"]
    out["converted llama"]["generate reference"] = cached_runs(llama_converted, ids)
    out["converted llama"]["cached heads reference"] = cached_heads(llama_converted, ids)
    return out


def compare(family: str, ranks: dict[str, Any]) -> dict[str, float]:
    got, want = ranks[family]["cases"], ranks[family]["reference"]
    assert sorted(got) == sorted(want)
    diffs = {}
    for case, values in want.items():
        assert sorted(got[case]) == sorted(values), case
        for key, value in values.items():
            diffs[f"{case} / {key}"] = max_diff(got[case][key], value)
    print(f"\n{family}: max abs diff per case/entry (sharded over {WORLD} ranks vs unsharded)")
    for name, diff in diffs.items():
        print(f"  {diff:.2e}  {name}")
    return diffs


@pytest.mark.slow
def test_every_llama_layer_at_every_site_equals_the_unsharded_model(ranks: dict) -> None:
    diffs = compare("llama", ranks)
    assert max(diffs.values()) <= TOLERANCE, {k: v for k, v in diffs.items() if v > TOLERANCE}
    base = ranks["base logits"]["llama"]
    for case, values in ranks["llama"]["reference"].items():
        if case not in (
            "save hidden, every layer",
            "grads",
            "gathered",
            "backward= upstream",
            "backward= from a saved shard",
            "edited gradients",
        ):
            assert max_diff(values["logits"], base) > 1e-4, f"{case} changes nothing"
    output, saved = ranks["llama"]["stop"]  # ends the run at a sharded site, as unsharded
    want_output, want_saved = ranks["llama"]["stop reference"]
    assert output is None and want_output is None and max_diff(saved, want_saved) <= TOLERANCE
    edited = ranks["llama"]["reference"]["edited gradients"]["g_resid0"]
    assert max_diff(edited, ranks["llama"]["unedited g_resid0"]) > 1e-3  # the edits edit
    print(f"  (battery launch: {ranks['seconds']:.1f} s)")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_the_layers_of_a_sharded_model_equals_training_the_unsharded_one(
    ranks: dict, family: str
) -> None:
    got, want = ranks[family]["trained"], ranks[family]["trained reference"]
    fields = {layer: ("a", "b") for layer in (*TRAINED[:2], *GPT2_TRAINED)}
    fields.update({TRAINED[2]: ("vector",), TRAINED[3]: ("value",), TRAINED[4]: ("vector",)})
    layers = GPT2_TRAINED if family == "gpt2" else TRAINED
    expected = sorted(f"{layer}.{field}" for layer in layers for field in fields[layer])
    assert sorted(got["tensors"]) == sorted(want["tensors"]) == expected
    print("\nlosses on 2 ranks:", got["losses"], "unsharded:", want["losses"])
    for g, w in zip(got["losses"], want["losses"], strict=True):  # a logsumexp of ~10
        assert abs(g - w) <= TOLERANCE * abs(w)
    assert want["losses"][-1] < want["losses"][0]  # it trained
    diffs = {k: max_diff(got["tensors"][k], t) for k, t in want["tensors"].items()}
    print("\ntrained on 2 ranks vs unsharded, max abs diff:", diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs
    start = (
        GPT2_CASES["LoRA on both projections"](ts.wrap(make_gpt2()))
        if family == "gpt2"
        else TRAIN_CASE(ts.wrap(make_llama()))
    )

    def initial(name: str) -> torch.Tensor:
        layer, _, field = name.rpartition(".")
        return ts.select(start).at(layer).get().tensors()[field]

    # every tensor was trained (a step of its own gradient, not zero)
    moved = {k: max_diff(t, initial(k)) for k, t in want["tensors"].items()}
    assert min(moved.values()) > 1e-4, moved


@pytest.mark.slow
def test_every_gpt2_layer_at_every_site_equals_the_unsharded_model(ranks: dict) -> None:
    diffs = compare("gpt2", ranks)
    assert max(diffs.values()) <= TOLERANCE, {k: v for k, v in diffs.items() if v > TOLERANCE}
    base = ranks["base logits"]["gpt2"]
    for case in ("neurons", "c_fc output", "LoRA on both projections"):
        assert max_diff(ranks["gpt2"]["reference"][case]["logits"], base) > 1e-4, case


@pytest.mark.slow
@pytest.mark.parametrize("family", ["converted llama", "converted gpt2"])
def test_every_layer_of_a_converted_model_equals_the_unsharded_conversion(
    ranks: dict, family: str
) -> None:
    diffs = compare(family, ranks)
    assert max(diffs.values()) <= TOLERANCE, {k: v for k, v in diffs.items() if v > TOLERANCE}
    base = ranks["base logits"][family]
    for case, values in ranks[family]["reference"].items():
        if case != "grads":
            assert max_diff(values["logits"], base) > 1e-4, f"{case} changes nothing"


@pytest.mark.slow
def test_generating_from_a_sharded_conversion_equals_the_unsharded_one(ranks: dict) -> None:
    got, want = ranks["converted llama"]["generate"], ranks["converted llama"]["generate reference"]
    assert torch.equal(got[0], want[0]) and got[0].shape == (5, 9)
    assert max_diff(got[1], want[1]) <= TOLERANCE
    refused = ranks["converted llama"]["cached heads"]
    assert ranks["converted llama"]["cached heads reference"].shape == (5, 4, 6, 6)
    assert "argument 1.cache.keys[0] holding different values on different ranks" in refused
    assert "without a KV cache" in refused


@pytest.mark.slow
def test_the_seed_experiment_equals_a_hand_written_hook(ranks: dict) -> None:
    plain, ids = make_llama(), token_ids()

    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[3:, -1, [7171, 2519]] = 5.0
        return x

    with torch.no_grad(), hooks(plain, pre={DOWN: replace_input(edit)}):
        want = plain(ids).logits
    got = ranks["llama"]["cases"]["seed experiment"]
    assert max_diff(got["logits"], want) <= TOLERANCE
    assert (got["h"][3:, -1, [7171, 2519]] == 5.0).all()
    assert (got["h"][:3, -1, [7171, 2519]] != 5.0).all()
    assert ranks["llama"]["plan round trip"]


@pytest.mark.slow
def test_generation_on_the_sharded_model_equals_the_unsharded_one(ranks: dict) -> None:
    probe = LLAMA_CASES["seed experiment"](ts.wrap(make_llama()))
    want = ts.run(probe.generate, token_ids(), max_new_tokens=3, do_sample=False)
    tokens, records = ranks["llama"]["generate"]
    assert torch.equal(tokens, want.output)
    assert len(records) == len(want.records["h"]) == 3  # one per step, with the KV cache
    for got, expected in zip(records, want.records["h"], strict=True):
        assert max_diff(got, expected) <= TOLERANCE


# How many activations each case gathers on a rank: one per recording layer at a sharded
# site (a saved gradient is gathered in the backward pass); none for an edit of a shard.
GATHERS = {
    "seed experiment": 1,
    "save hidden, every layer": 2,
    "add to hidden": 0,
    "scale neurons (strided slice)": 0,
    "zero across the shard boundary": 0,
    "mean-ablate last position": 0,
    "noise": 0,
    "patch neurons": 1,
    "gate output (column-wise shard)": 1,
    "LoRA after column-wise up": 0,
    "LoRA after row-wise down": 0,
    "heads (o_proj input)": 1,
    "q, k, v": 3,
    "gate input (replicated DTensor)": 0,
    "down output (replicated, all-reduced)": 0,
    "inside the MLP (act_fn: laid out by its DTensor twin)": 2,
    "compute (centred: gathered)": 2,
    "compute from a saved shard": 2,
    "residual stream": 0,
    "grads": 2,
    "gathered": 5,  # Normalize needs the whole tensor: gather-edit-scatter (and its backward)
}


@pytest.mark.slow
def test_edits_of_a_shard_communicate_nothing_and_recordings_gather_once(ranks: dict) -> None:
    assert ranks["llama"]["gathers"] == GATHERS


@pytest.mark.slow
def test_recording_on_rank_0_only_leaves_the_other_ranks_empty(ranks: dict) -> None:
    assert ranks["llama"]["rank0 keys"] == [["hidden0", "hidden1"], []]


@pytest.mark.slow
def test_layers_that_cannot_be_placed_are_refused_with_the_way_out(ranks: dict) -> None:
    errors = ranks["llama"]["errors"]
    assert "was not placed for tensor parallelism" in errors["unplaced"]
    assert "ts.distributed.localize" in errors["unplaced"]
    assert "rank 0 holds 0..4735" in errors["unplaced"]  # (the battery's rank 0 reports)
    assert "was replaced" in errors["replaced"]
    assert "was not placed" in errors["inserted after localize"]
    assert "127 features do not split evenly over 2 ranks" in ranks["gpt2"]["odd width"]


@pytest.mark.slow
def test_qwen3s_query_and_key_norms_inside_the_attention_equal_the_unsharded_model(
    ranks: dict,
) -> None:
    with torch.no_grad():
        want = entries(ts.run(qwen3_norms(ts.wrap(make_qwen3())), token_ids(), use_cache=False))
    got = ranks["qwen3"]["uncached"]
    diffs = {key: max_diff(got[key], value) for key, value in want.items()}
    print("\nqwen3 q_norm / k_norm on 2 ranks vs unsharded:", diffs)
    assert sorted(got) == ["logits", "q_norm"] and max(diffs.values()) <= TOLERANCE, diffs
    with torch.no_grad():
        plain = make_qwen3()(token_ids(), use_cache=False).logits
    assert max_diff(want["logits"], plain) > 1e-4  # the scaled key head changes the logits
    assert "of type DynamicCache" in ranks["qwen3"]["cached"]


@pytest.mark.slow
def test_a_site_inside_a_region_whose_layout_is_unknown_is_refused(ranks: dict) -> None:
    found = ranks["inside"]
    print("\n".join(f"{k}: {v}" for k, v in found.items()))
    assert found["split"] == "ran: [(2, 3, 16)]"  # the whole ReLU output, gathered
    assert "'block.total' is a partial sum (Partial)" in found["partial sum"]
    assert "_StridedShard" in found["folded"] and "interleaves" in found["folded"]
    assert "this rank's tensor differs from another rank's" in found["sliced"]
    assert "called 2 times in one call of its region" in found["twice"]
    assert "argument 'extra' of type Opaque" in found["opaque argument"]


@pytest.mark.slow
def test_selectors_see_the_unsharded_paths(ranks: dict) -> None:
    llama, gpt2 = ts.wrap(make_llama()), ts.wrap(make_gpt2())
    assert ranks["llama"]["paths"] == list(ts.select(llama).at("**").paths)
    assert ranks["llama"]["mlp paths"] == list(ts.select(llama).at_instances_of("LlamaMLP").paths)
    assert ranks["gpt2"]["conv1d paths"] == list(ts.select(gpt2).at_instances_of("Conv1D").paths)
    layouts = ranks["llama"]["layouts"]
    assert layouts[DOWN].startswith("rowwise (input: dimension -1 of 9472 split over 2 ranks")
    assert layouts[f"{MLP}.act_fn"] == "inside the sharded region 'model.layers.1.mlp'"
    assert layouts[MLP].startswith("a module holding sharded projections")


# --------------------------------------------------------------------- the launcher


def fails_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    time.sleep(600)  # rank 0 would wait for ever: the launcher must stop it


def sleeps() -> None:
    time.sleep(600)


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_and_names_itself() -> None:
    start = time.monotonic()
    with pytest.raises(tsd.RankFailed, match="rank one says no") as caught:
        tsd.launch(fails_on_rank_1, world_size=2, timeout=240)
    assert caught.value.rank == 1
    assert time.monotonic() - start < 200
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_a_launch_past_its_timeout_is_stopped() -> None:
    start = time.monotonic()
    with pytest.raises(tsd.LaunchTimeout, match="timeout of 3 s"):
        tsd.launch(sleeps, world_size=1, timeout=3)
    assert time.monotonic() - start < 3 + 10
    assert multiprocessing.active_children() == []


def test_the_launcher_checks_its_arguments_before_starting_anything() -> None:
    with pytest.raises(ValueError, match="world_size"):
        tsd.launch(sleeps, world_size=0)
    with pytest.raises(ValueError, match="'cpu' \\(gloo\\) or 'cuda' \\(NCCL\\)"):
        tsd.launch(sleeps, device="tpu")
    with pytest.raises(ValueError, match="timeout"):
        tsd.launch(sleeps, timeout=0)
    with pytest.raises(TypeError, match=r"list of ts\.Plan"):
        tsd.run_plans([], make_llama)
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_run_plan_sends_the_plan_as_bytes_and_returns_rank_0s_result() -> None:
    ids, mask = token_ids(), torch.ones(5, 6, dtype=torch.long)
    probe = LLAMA_CASES["seed experiment"](ts.wrap(make_llama()))
    plan = ts.plan(probe).returning("logits", topk=3).returning("h", mean=[1])
    got = tsd.run_plan(plan, make_llama, ids, world_size=WORLD, timeout=300, attention_mask=mask)
    want = ts.plans.execute(plan, ts.wrap(make_llama()), ids, attention_mask=mask)
    assert torch.equal(got.output.logits.indices, want.output.logits.indices)
    assert max_diff(got.output.logits.values, want.output.logits.values) <= TOLERANCE
    assert max_diff(got.saved["h"], want.saved["h"]) <= TOLERANCE
    assert got.saved["h"].shape == (5, WIDTH)  # the full hidden width, from rank 0


# --------------------------------------------------------------------- one process


@pytest.fixture(scope="module")
def mesh1() -> Any:
    """A one-rank process group in this process (no spawn): plans, refusals, the fast paths."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in the test process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_one_rank_runs_a_plan_as_the_unsharded_model_does(mesh1: Any) -> None:
    ids = token_ids()
    probe = LLAMA_CASES["seed experiment"](ts.wrap(make_llama()))
    tree = tsd.parallelize(make_llama(), mesh1, "auto")
    view = tsd.apply(ts.plan(probe), tree)
    with torch.no_grad():
        got, want = ts.run(view, ids), ts.run(probe, ids)
    assert max_diff(got.output.logits, want.output.logits) <= TOLERANCE
    assert max_diff(got.saved["h"], want.saved["h"]) <= TOLERANCE
    assert tsd.plan(view) == ts.plan(probe)
    placed = view.get_submodule(f"{DOWN}.ts_before.0")
    assert isinstance(placed, tsd.Sharded) and isinstance(placed.layer, SetValues)
    assert tsd.localize(view) is view  # placed layers stay placed: nothing is wrapped twice
    with pytest.raises(ValueError, match="record_on must be one of"):
        tsd.localize(tree, record_on="rank1")


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"model.layers.*.mlp.gate_proj": "colwise"}, "no RowwiseParallel module under"),
        ({"model.layers.*.mlp.down_proj": "rowwise"}, "no ColwiseParallel module under"),
        ({"model.layers.*.mlp.gate": "colwise"}, "matches no module \\(nearest: "),
        ({"model.layers.*.mlp.gate_proj": "colwise_rep"}, "style 'colwise_rep' is not supported"),
        ({"model.layers.*.input_layernorm": SequenceParallel()}, "SequenceParallel"),
        ({"model.layers.*.mlp.act_fn": "colwise"}, "the styles shard nn.Linear"),
        (
            {"lm_head": ColwiseParallel(use_local_output=False)},
            "use_local_output=False is not supported",
        ),
        ({}, "non-empty dict"),
    ],
)
def test_plans_torchsurgeon_cannot_follow_are_refused(mesh1: Any, plan: dict, message: str) -> None:
    model = make_llama()
    with pytest.raises(tsd.TensorParallelError, match=message):
        tsd.parallelize(model, mesh1, plan)
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # refused before sharding


class Shrink(InterventionLayer):
    """A layer that changes its tensor's shape: no shard of its output can be cut."""

    type_name = "TestShrink"
    takes_index = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1]


def test_a_layer_changing_the_shape_of_a_sharded_tensor_is_refused(mesh1: Any) -> None:
    tree = tsd.parallelize(make_llama(), mesh1, "auto")
    for probe, who in (
        (before(DOWN, Shrink()), "the layer"),
        (before(DOWN, ComputeGrad(ts.here[..., :-1])), "the expression, given the gradient"),
    ):
        view = tsd.localize(probe(tree))
        with pytest.raises(tsd.TensorParallelError, match="at a sharded site it must keep") as no:
            ts.run(view, token_ids(), backward=ts.out("logits").sum())
        assert f"{who} turned the full tensor (5, 6, 9472) into (5, 6, 9471)" in str(no.value)


def test_a_converted_models_head_projection_is_split_by_heads_only(mesh1: Any) -> None:
    model = ts.convert(make_llama())
    with pytest.raises(tsd.TensorParallelError, match="split by heads, column-wise"):
        tsd.parallelize(
            model, mesh1, {"blocks.*.attn.q": "rowwise", "blocks.*.attn.out": "colwise"}
        )
    assert not any(isinstance(p, DTensor) for p in model.parameters())  # refused before sharding
    layouts = tsd.site_layouts(tsd.parallelize(model, mesh1, "auto"))
    assert layouts["blocks.0.attn.k"].describe() == (
        "colwise (input: replicated; output: dimension -2 of 2 split over 1 ranks (rank 0 "
        "holds 0..1))"
    )
    assert layouts["blocks.0.attn.pattern"].role == "inside"


def test_models_torchsurgeon_cannot_follow_are_refused(mesh1: Any) -> None:
    with pytest.raises(tsd.TensorParallelError, match=r"before ts\.wrap"):
        tsd.parallelize(ts.wrap(make_llama()), mesh1, "auto")
    with pytest.raises(tsd.TensorParallelError, match=r"no config\.base_model_tp_plan"):
        tsd.parallelize(make_gpt2(), mesh1, "auto")
    bare = make_llama()
    parallelize_module(bare, mesh1, {"model.layers.0.mlp.gate_proj": ColwiseParallel()})
    with pytest.raises(tsd.TensorParallelError, match="already parallelized"):
        tsd.parallelize(bare, mesh1, "auto")
    with pytest.raises(
        tsd.TensorParallelError, match=r"not sharded by ts\.distributed\.parallelize"
    ):
        tsd.localize(ts.wrap(bare))
    with pytest.raises(tsd.TensorParallelError, match=r"for an unsharded model use ts\.apply"):
        tsd.apply(ts.plan(before(DOWN, Save())(ts.wrap(make_llama()))), ts.wrap(make_llama()))


def test_a_checkpoint_directory_is_loaded_from_disk_only(tmp_path: Any) -> None:
    make_llama().save_pretrained(tmp_path)
    loaded = _build(str(tmp_path))
    assert not loaded.training
    with torch.no_grad():
        assert max_diff(loaded(token_ids()).logits, make_llama()(token_ids()).logits) == 0
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        tsd.run_plan(ts.plan(ts.wrap(make_llama())), tmp_path / "missing")


def test_the_rendezvous_listens_on_loopback_only() -> None:
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("reads Linux's /proc/net/tcp")
    store = _loopback_store(2, 10.0)
    port = f":{store.port:04X}"
    listening = [
        line.split()[1]
        for table in tables
        if table.exists()
        for line in table.read_text().splitlines()[1:]
        if line.split()[3] == "0A" and line.split()[1].endswith(port)
    ]
    assert listening == ["0100007F" + port]  # 127.0.0.1, and no other address


COMPILED_CASES = (
    "seed experiment",
    "LoRA after row-wise down",
    "heads (o_proj input)",
    "noise",
    "inside the MLP (act_fn: laid out by its DTensor twin)",
)


def compiled_rank(ids: torch.Tensor) -> dict[str, Any]:
    """``torch.compile`` of a localized rewrite against the same rewrite run eagerly."""
    mesh = init_device_mesh("cpu", (WORLD,))
    tree = tsd.parallelize(make_llama(), mesh, "auto")
    view = tsd.localize(chain(*(LLAMA_CASES[c] for c in COMPILED_CASES))(tree))
    with torch.no_grad():
        eager = entries(ts.run(view, ids))
        compiled = entries(ts.run(torch.compile(view), ids))
    return {"eager": eager, "compiled": compiled}


@pytest.mark.slow  # two ranks, each compiling the sharded model (~20 s)
def test_a_compiled_sharded_rewrite_equals_the_eager_one() -> None:
    ids = token_ids()
    out = tsd.launch(compiled_rank, ids, world_size=WORLD, timeout=600)
    eager, compiled = out["eager"], out["compiled"]
    assert sorted(compiled) == sorted(eager) == ["act", "act_in", "h", "heads", "logits"]
    diffs = {k: max_diff(compiled[k], eager[k]) for k in eager}
    print("\ncompiled vs eager on 2 ranks, max abs diff:", diffs)
    assert max(diffs.values()) <= TOLERANCE, diffs
    probe = chain(*(LLAMA_CASES[c] for c in COMPILED_CASES))(ts.wrap(make_llama()))
    with torch.no_grad():
        want = entries(ts.run(probe, ids))
    assert max(max_diff(eager[k], want[k]) for k in want) <= TOLERANCE  # the unsharded model
