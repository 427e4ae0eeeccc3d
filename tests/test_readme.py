"""The README's test command is what CI runs, and its demo command names the real script."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "the README must open with a bash block of two commands"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, tests = _readme_commands()
    assert demo.startswith("python -m pip install torch==2.13.0 && ")
    assert demo.endswith("torchsurgeon demo")
    assert tests.startswith("python -m pip install torch==2.13.0 && ")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README must show torchsurgeon in at least one ```python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_soak_loops_are_reduced_by_default_and_full_in_ci(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from requirements import soak

    for name in ("CI", "TORCHSURGEON_SOAK", "FUZZ_N"):
        monkeypatch.delenv(name, raising=False)
    assert soak("FUZZ_N", full=10, quick=2) == 2
    monkeypatch.setenv("TORCHSURGEON_SOAK", "full")
    assert soak("FUZZ_N", full=10, quick=2) == 10
    monkeypatch.delenv("TORCHSURGEON_SOAK")
    monkeypatch.setenv("CI", "true")
    assert soak("FUZZ_N", full=10, quick=2) == 10
    monkeypatch.setenv("FUZZ_N", "7")
    assert soak("FUZZ_N", full=10, quick=2) == 7
    assert "export TORCHSURGEON_SOAK=full" in (ROOT / ".ci" / "run").read_text()
