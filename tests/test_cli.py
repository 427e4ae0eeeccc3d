"""The ``torchsurgeon`` command: every error is one line on stderr and exit status 2.

Most cases call :func:`torchsurgeon.cli.main` in-process and read what it printed; one slow
test runs the real console entry point in a subprocess, where a traceback would show.
Checkpoints are random-weight models with a narrow MLP, saved to a temporary directory.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from requirements import require
from test_demo import narrow_checkpoint

from torchsurgeon import cli


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing here may train into (or read) the user's cache."""
    monkeypatch.setenv("TORCHSURGEON_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return narrow_checkpoint(tmp_path_factory.mktemp("narrow"), width=1536)


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """A checkpoint whose config reads but whose weights are not a safetensors file."""
    directory = tmp_path_factory.mktemp("broken")
    for item in checkpoint.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--top-k", "0"], "torchsurgeon demo: argument --top-k: expected at least 1"),
        (["demo", "--value", "inf"], "argument --value: expected a finite number"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
        (["demo", "--neurons", "1:x"], "--neurons: cannot read '1:x'"),
        (["demo", "--neurons", "1:2;1:3"], "layer 1 is listed twice"),
        (["demo", "--target", "two words"], "--target must be one word"),
        (["demo", "--target", "zzz"], "not a word of the demo model's language"),
        (["serve"], "the following arguments are required: --model"),
        (["serve", "--model", "nameonly"], "expected NAME=PATH"),
    ],
)
def test_argument_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in one_line_error(capsys, *argv)


def test_missing_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = one_line_error(capsys, "demo", "--model", str(tmp_path / "nope"))
    assert err == f"torchsurgeon demo: --model {tmp_path / 'nope'}: no such directory\n"
    assert "no config.json" in one_line_error(capsys, "demo", "--model", str(tmp_path))
    assert "has no config.json" in one_line_error(capsys, "serve", "--model", f"m={tmp_path}")


def test_neurons_that_do_not_fit_the_model(
    capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    err = one_line_error(
        capsys, "demo", "--model", str(checkpoint), "--neurons", "12:7171,2519,1786;13:9469"
    )
    assert "layer 12 does not exist: the model has 3 layers (0-2)" in err
    err = one_line_error(capsys, "demo", "--model", str(checkpoint), "--neurons", "1:7171")
    assert "neuron(s) [7171] of layer 1 do not exist: its MLP is 1536 wide" in err


def test_checkpoint_that_fails_to_load(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    err = one_line_error(capsys, "demo", "--model", str(broken))
    assert err.startswith(f"torchsurgeon demo: --model {broken}: cannot load the checkpoint (")
    config = broken.parent / "badconfig"
    config.mkdir()
    (config / "config.json").write_text('{"model_type": "no-such-family"}')
    assert "cannot read its config" in one_line_error(capsys, "demo", "--model", str(config))


def test_serve_errors_before_listening(
    capsys: pytest.CaptureFixture[str], broken: Path, checkpoint: Path, tmp_path: Path
) -> None:
    require("uvicorn", "serve needs the remote extra")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        err = one_line_error(capsys, "serve", "--model", f"m={checkpoint}", "--port", port)
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err
    keys = tmp_path / "missing-keys.txt"
    args = ["serve", "--model", f"m={checkpoint}", "--port", "0", "--api-keys", str(keys)]
    assert "missing-keys.txt" in one_line_error(capsys, *args)
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys\n")
    args[-1] = str(empty)
    assert "no keys in the file" in one_line_error(capsys, *args)
    assert "--port must be 0-65535" in one_line_error(
        capsys, "serve", "--model", f"m={checkpoint}", "--port", "70000"
    )
    err = one_line_error(capsys, "serve", "--model", f"m={broken}", "--port", "0")
    assert err.startswith("torchsurgeon serve: ")


def test_unforeseen_errors_are_one_line_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchsurgeon.demo

    def boom(**_: object) -> None:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(torchsurgeon.demo, "run_demo", boom)
    err = one_line_error(capsys, "demo")
    assert err == "torchsurgeon demo: RuntimeError: first line second line\n"
    monkeypatch.setenv("TORCHSURGEON_TRACEBACK", "1")
    code, _, err = run(capsys, "demo")
    assert code == 2 and "Traceback" in err and "boom" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0 and "--neurons" in out and "--target" in out


def test_demo_on_a_checkpoint(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    html, png = tmp_path / "d.html", tmp_path / "d.png"
    code, out, err = run(
        capsys, "demo", "--model", str(checkpoint), "--neurons", "1:1535,7;2:0",
        "--html", str(html), "--png", str(png),
    )  # fmt: skip
    assert code == 0, err
    assert "neurons = {1: [1535, 7], 2: [0]}" in out and "ts.idx[8:, -1, chosen]" in out
    assert "max |change|: 0 (expected 0)" in out
    assert html.is_file() and png.is_file()


@pytest.mark.slow
def test_console_script_prints_no_traceback(checkpoint: Path) -> None:
    command = [sys.executable, "-m", "torchsurgeon.cli", "demo", "--model", str(checkpoint)]
    done = subprocess.run(
        [*command, "--neurons", "0:99999"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "its MLP is 1536 wide" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_without_the_web_packages(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, checkpoint: Path
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    err = one_line_error(capsys, "serve", "--model", f"m={checkpoint}")
    assert "serve needs uvicorn: python -m pip install -e . (from a checkout" in err
    assert err.rstrip().endswith("python -m pip install uvicorn")
