"""A host serving converted models: the explicit-dataflow layers, selectable from afar.

``LocalCheckpoint(path, convert=True)`` (``torchsurgeon serve --convert``) serves
``ts.load(path)`` instead of the ``transformers`` model, so the attention pattern, queries,
keys, values and per-head outputs are nodes a remote plan can select. A host on a
loopback port serves a small random GPT-2 and Llama, each converted (with the tokenizer of
its checkpoint) and as ``transformers`` models loaded with a chosen attention
implementation. Each remote result is compared with the same plan run here on
``ts.load(path)`` of the same checkpoint, and the converted logits with the
``transformers`` model's. The call schema of converted models and the command's flags are
checked in-process, without a server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from plan_cases import HIDDEN, TEXTS, VOCAB, make_gpt2, make_llama, save_tokenizer, token_ids
from requirements import require
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

import torchsurgeon as ts
from torchsurgeon import cli
from torchsurgeon.plans import Plan, apply, plan
from torchsurgeon.plans.errors import PlanFormatError
from torchsurgeon.remote import Client, Limits, RemoteError, create_app, serve_in_thread
from torchsurgeon.remote.checkpoints import LocalCheckpoint
from torchsurgeon.remote.errors import ApiError
from torchsurgeon.remote.executor import single
from torchsurgeon.remote.hosted import HostedModel
from torchsurgeon.remote.result_wire import decode_result
from torchsurgeon.remote.transfer import Inputs, decode_request, encode_request

FAMILIES = ("gpt2", "llama")
HEAD = 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    for name, make in (("gpt2", make_gpt2), ("llama", make_llama)):
        make().save_pretrained(root / name)
        save_tokenizer(root / name)
    return {"gpt2": root / "gpt2", "llama": root / "llama"}


@pytest.fixture(scope="module")
def client(checkpoints: dict[str, Path]) -> Iterator[Client]:
    """A loopback host: both models converted, and as ``transformers`` models."""
    models = {
        **{name: LocalCheckpoint(path, convert=True) for name, path in checkpoints.items()},
        "gpt2-eager": LocalCheckpoint(checkpoints["gpt2"], attn_implementation="eager"),
        "llama-sdpa": LocalCheckpoint(checkpoints["llama"], attn_implementation="sdpa"),
        "llama-default": checkpoints["llama"],
    }
    app = create_app(models)
    with serve_in_thread(app) as server, Client(server.url, progress=False) as connected:
        yield connected


def left_padded(path: Path) -> dict[str, torch.Tensor]:
    """The texts as the host tokenizes them: left-padded, positions counted per row."""
    encoded = AutoTokenizer.from_pretrained(path)(
        TEXTS, return_tensors="pt", padding=True, padding_side="left"
    )
    mask = encoded["attention_mask"]
    assert not bool(mask.all())  # the rows really are padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": positions}


def knock_out_head(model: torch.nn.Module) -> torch.nn.Module:
    """Save block 1's pattern, zero head ``HEAD``'s output there, and save that output."""
    probe = ts.select(model).at("blocks.1.attn.pattern").insert_after(ts.layers.Save("pattern"))
    head_out = ts.select(probe).at("blocks.1.attn.head_out")
    probe = head_out.insert_after(ts.layers.Zero(ts.idx[:, :, HEAD]))  # [b, p, h, dh]
    return ts.select(probe).at("blocks.1.attn.head_out").insert_after(ts.layers.Save("head_out"))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.dtype == b.dtype and a.shape == b.shape
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- the host


@pytest.mark.slow  # starts a host on a loopback port
def test_the_description_says_how_each_model_is_served(client: Client) -> None:
    served = {m["name"]: m for m in client.models()}
    for name in FAMILIES:
        assert served[name]["converted"] is True
        assert served[name]["architecture"] == "Transformer"
        assert served[name]["attn_implementation"] is None  # its own layers
        assert served[name]["tokenizer"] is True
    assert served["gpt2-eager"]["converted"] is False
    assert served["gpt2-eager"]["architecture"] == "GPT2LMHeadModel"
    assert served["gpt2-eager"]["attn_implementation"] == "eager"
    assert served["llama-sdpa"]["attn_implementation"] == "sdpa"
    assert served["llama-default"]["attn_implementation"] == "sdpa"  # transformers' choice


@pytest.mark.slow
def test_a_structure_only_copy_has_the_served_attention(
    client: Client, checkpoints: dict[str, Path]
) -> None:
    """The masks a layer receives depend on the attention implementation (eager attention is
    given a 4-D mask, SDPA none when it can use ``is_causal``): a stand-in that estimates a
    plan reading ``attention_mask`` (a Ray or tensor-parallel host's) must use the host's."""
    structure = client.structure("gpt2-eager")
    reads_mask = ts.layers.Save("mask", on="attention_mask")
    ids = token_ids()
    for attention, mask in (("eager", (1, 1, 7, 7)), ("sdpa", None)):
        standin = HostedModel.from_structure(
            "m", structure, str(checkpoints["gpt2"]), False, attn_implementation=attention
        )
        probe = ts.select(standin.base).at("transformer.h.0.attn").insert_before(reads_mask)
        request = plan(probe)
        if mask is None:  # the same refusal the served sdpa model would give when it runs
            with pytest.raises(ApiError, match="no input tensor for on='attention_mask'"):
                standin.prepare(request, Limits(), Inputs((ids,)))
        else:
            _, cost = standin.prepare(request, Limits(), Inputs((ids,)))
            assert cost is not None
    with pytest.raises(PlanFormatError, match="attn_implementation must be 'eager' or 'sdpa'"):
        structure.build("flash_attention_2")  # a host cannot make a client load kernels


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_head_knocked_out_remotely_equals_the_local_conversion(
    client: Client, checkpoints: dict[str, Path], family: str
) -> None:
    structure_only = client.meta(family)  # the converted model's nodes, no weights
    paths = {p for p, _ in structure_only.named_modules()}
    assert {"blocks.1.attn.q", "blocks.1.attn.pattern", "blocks.1.attn.head_out"} <= paths
    recorded = plan(knock_out_head(structure_only))
    local = ts.load(checkpoints[family])
    probe = apply(Plan.from_bytes(recorded.to_bytes()), local)  # exact: same weights
    clean = ts.run(local, **left_padded(checkpoints[family])).output
    for inputs, kwargs in (([TEXTS], {}), ([], left_padded(checkpoints[family]))):
        got = client.run(recorded, *inputs, model_name=family, **kwargs)
        want = ts.run(probe, **left_padded(checkpoints[family]))
        assert max_diff(got.output, want.output) <= 1e-6
        assert got.saved.keys() == want.saved.keys() == {"pattern", "head_out"}
        for key in want.saved:
            assert max_diff(got.saved[key], want.saved[key]) <= 1e-6, key
        pattern = got.saved["pattern"]
        assert pattern.shape == (len(TEXTS), 4, pattern.shape[2], pattern.shape[2])
        assert torch.allclose(pattern.sum(-1), torch.ones(()))  # softmax over keys
        assert bool((got.saved["head_out"][:, :, HEAD] == 0).all())
        assert max_diff(got.output, clean) > 1e-4  # the knock-out changed the logits


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_equal_the_transformers_model(
    client: Client, checkpoints: dict[str, Path], family: str
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(
        checkpoints[family], attn_implementation="eager"
    )
    reference.eval()
    ids = token_ids(seed=4)
    with torch.no_grad():
        want = reference(ids).logits
    got = client.run(plan(client.meta(family)), ids, model_name=family).output
    assert max_diff(got, want) <= 1e-4
    padded = left_padded(checkpoints[family])
    with torch.no_grad():
        want = reference(**padded).logits
    got = client.run(plan(client.meta(family)), TEXTS, model_name=family).output
    real = padded["attention_mask"].bool()  # padded query rows are meaningless in both
    assert max_diff(got[real], want[real]) <= 1e-4


@pytest.mark.slow
def test_the_chosen_attention_is_the_one_that_runs(
    client: Client, checkpoints: dict[str, Path]
) -> None:
    ids = token_ids(seed=6)
    for name, implementation in (("gpt2-eager", "eager"), ("llama-sdpa", "sdpa")):
        family = name.partition("-")[0]
        reference = AutoModelForCausalLM.from_pretrained(
            checkpoints[family], attn_implementation=implementation
        ).eval()
        assert reference.config._attn_implementation == implementation
        with torch.no_grad():
            want = reference(ids).logits
        got = client.run(plan(client.meta(name)), ids, model_name=name)
        assert max_diff(got.output.logits, want) == 0


@pytest.mark.slow
def test_bad_inputs_to_a_converted_model_are_refused_by_the_host(client: Client) -> None:
    recorded = plan(client.meta("gpt2"))
    with pytest.raises(RemoteError) as refused:  # GPT-2's conversion has no token types
        client.run(recorded, token_ids(), model_name="gpt2", token_type_ids=token_ids())
    assert (refused.value.status, refused.value.code) == (422, "bad_input")
    assert "'token_type_ids' is not one of them" in refused.value.message
    assert refused.value.field == "inputs.token_type_ids"


# --------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path]) -> dict[str, HostedModel]:
    return {
        name: HostedModel.load(name, LocalCheckpoint(path, convert=True))
        for name, path in checkpoints.items()
    }


@pytest.mark.parametrize(
    ("family", "args", "kwargs", "words"),
    [
        ("gpt2", [token_ids()], {"cache": token_ids()}, "'cache' is not one of them"),
        ("gpt2", [token_ids()], {"token_type_ids": token_ids()}, "'token_type_ids' is not"),
        ("gpt2", [token_ids()], {"inputs_embeds": torch.ones(3, 7, HIDDEN)}, "'inputs_embeds'"),
        ("gpt2", [], {"attention_mask": torch.ones(3, 7).long()}, "give input_ids"),
        ("gpt2", [torch.full((3, 7), VOCAB)], {}, "the model's vocab_size=96"),
        ("gpt2", [token_ids(length=33)], {}, "over the model's max_positions=32"),
        ("gpt2", [token_ids()], {"position_ids": 32 + token_ids()}, "max_positions=32"),
        ("llama", [token_ids()], {"attention_mask": 2 * torch.ones(3, 7).long()}, "0 and 1"),
        ("llama", [token_ids()], {"position_ids": -token_ids() - 1}, "values must be in >= 0"),
        ("llama", [token_ids().float()], {}, "input_ids has dtype torch.float32"),
        ("llama", [token_ids(), torch.ones(3, 7).long(), token_ids()], {}, "'cache' is not"),
    ],
)
def test_the_converted_call_schema(
    converted: dict[str, HostedModel], family: str, args: list, kwargs: dict, words: str
) -> None:
    with pytest.raises(ApiError) as refused:
        converted[family].call_arguments(Inputs(tuple(args), kwargs))
    assert refused.value.status == 422 and refused.value.code == "bad_input"
    assert words in refused.value.message


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_for_a_converted_model_are_left_padded_with_positions(
    converted: dict[str, HostedModel], checkpoints: dict[str, Path], family: str
) -> None:
    hosted = converted[family]
    assert hosted.converted and hosted.takes_text and hosted.attn_implementation is None
    args, kwargs = hosted.call_arguments(Inputs(text=tuple(TEXTS)))
    want = left_padded(checkpoints[family])
    assert args == () and kwargs.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(kwargs[name], tensor), name
    rows = hosted.call_arguments(Inputs((token_ids(),), {"position_ids": torch.arange(7)[None]}))
    assert rows[1]["position_ids"].shape == (1, 7)  # one row of positions for every row


def test_local_checkpoint_refuses_what_it_cannot_do(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"'eager' or 'sdpa'.*got 'flash_attention_2'"):
        LocalCheckpoint(checkpoints["gpt2"], attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="computes attention in its own layers"):
        LocalCheckpoint(checkpoints["gpt2"], convert=True, attn_implementation="eager")
    with pytest.raises(TypeError, match="convert must be True or False"):
        LocalCheckpoint(checkpoints["gpt2"], convert="yes")  # type: ignore[arg-type]
    spec = LocalCheckpoint(checkpoints["gpt2"], attn_implementation="sdpa")
    assert LocalCheckpoint.from_json(spec.to_json()) == LocalCheckpoint(
        str(checkpoints["gpt2"]), attn_implementation="sdpa"
    )


# --------------------------------------------------------------------------- the command


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_serve_flags_are_checked_before_anything_loads(
    capsys: pytest.CaptureFixture[str], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    require("uvicorn", "serve needs the remote extra")
    model = f"m={checkpoints['gpt2']}"
    err = one_line_error(capsys, "serve", "--model", model, "--attn-implementation", "flash")
    assert "argument --attn-implementation: invalid choice: 'flash'" in err
    assert "eager" in err and "sdpa" in err
    both = ("--convert", "--attn-implementation", "eager")
    err = one_line_error(capsys, "serve", "--model", model, "--port", "0", *both)
    assert err.startswith("torchsurgeon serve: --attn-implementation picks the attention")
    gone = f"m={tmp_path / 'nowhere'}"
    err = one_line_error(capsys, "serve", "--model", gone, "--port", "0", "--convert")
    assert "has no config.json" in err
    OPTForCausalLM(
        OPTConfig(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=16,
            word_embed_proj_dim=16,
        )
    ).save_pretrained(tmp_path / "opt")
    capsys.readouterr()  # the saving's progress bar
    opt = f"m={tmp_path / 'opt'}"
    err = one_line_error(capsys, "serve", "--model", opt, "--port", "0", "--convert")
    assert "cannot be served converted; leave convert out (no --convert)" in err
    assert "cannot convert model_type 'opt'" in err and "llama (LlamaForCausalLM" in err


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow  # starts a private Ray cluster
def test_ray_replicas_load_the_conversion(checkpoints: dict[str, Path]) -> None:
    require("ray", "the Ray variant needs `pip install ray`")
    from torchsurgeon.remote.ray_pool import RayPool

    limits = Limits()
    sources = {"gpt2": LocalCheckpoint(checkpoints["gpt2"], convert=True)}
    pool = RayPool(sources, 1, limits, threads=1)
    try:
        hosted = pool.hosted()["gpt2"]
        assert hosted.converted and hosted.takes_text
        assert hosted.describe()["architecture"] == "Transformer"
        probe = knock_out_head(hosted.base)  # the stand-in: a real conversion on meta
        body = encode_request(plan(probe).to_bytes(), [TEXTS], {})
        plan_bytes, inputs = decode_request(body, limits)
        hosted.prepare(Plan.from_bytes(plan_bytes), limits, inputs)  # checked, estimated
        got = decode_result(single(pool.run("gpt2", [body], time.monotonic() + 600)))
    finally:
        pool.close()
    local = apply(plan(probe), ts.load(checkpoints["gpt2"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replica: CPU sums in the same order
    try:
        want = ts.run(local, **left_padded(checkpoints["gpt2"]))
    finally:
        torch.set_num_threads(threads)
    assert max_diff(got.output, want.output) <= 1e-6
    for key in ("pattern", "head_out"):
        assert max_diff(got.saved[key], want.saved[key]) <= 1e-6, key
    assert bool((got.saved["head_out"][:, :, HEAD] == 0).all())
