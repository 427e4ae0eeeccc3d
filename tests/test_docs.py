"""The documentation runs as written, and the site builds in strict mode.

Every ```` ```python ```` block of README.md and of every docs/*.md page runs: one test per
page, each page in a fresh interpreter (a subprocess), its blocks in page order sharing one
namespace, as if pasted into one script (``__name__ == "__main__"``). The conventions —
how a block is marked as not run (``<!-- docs-test: skip (reason) -->`` on the line before
it), and how expected output is written (a ```` ```text ```` block right after the
``python`` block, compared with doctest's ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``) — are
in ``tests/docs_blocks.py``. A page may skip only as many blocks as ``ALLOWED_SKIPS``
grants it; ``test_docs_skips_are_listed`` names every skipped block.

Pages run with torch's default thread count and the default cache of the toy model of
docs/methods.md (``TORCHSURGEON_CACHE`` or the temp directory: trained once per machine,
as the tests and notebooks share it). Each page prints its blocks' wall and CPU times on
stderr (``@@docs-time``; ``pytest -s`` shows them). On an idle 2-core machine the pages
take about 3 minutes together, most of it docs/methods.md; the timeouts leave room for a
busy machine. The mkdocs build is checked with ``--strict`` (broken links, bad references:
failures).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docs_blocks import blocks, matches, outputs, run

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Blocks a page may leave unrun, each for a reason written beside its mark on the page.
ALLOWED_SKIPS = {
    "docs/distributed.md": 1,  # the torchrun example: ranks started by torchrun
}
PAGE_TIMEOUT = {"docs/methods.md": 600.0, "docs/distributed.md": 300.0}
DEFAULT_TIMEOUT = 240.0


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES, ids=_name)
def test_docs_page_runs(path: Path, tmp_path: Path) -> None:
    page = _name(path)
    found = blocks(path)
    runnable = [n for n, block in enumerate(found) if block.runs]
    skipped = [block for block in found if block.info == "python" and block.skip is not None]
    assert len(skipped) <= ALLOWED_SKIPS.get(page, 0), (
        f"{page} skips {len(skipped)} blocks, {ALLOWED_SKIPS.get(page, 0)} allowed: "
        + ", ".join(f"line {b.line} ({b.skip})" for b in skipped)
    )
    if not runnable:
        return
    timeout = PAGE_TIMEOUT.get(page, DEFAULT_TIMEOUT)
    start = time.perf_counter()
    try:
        done = run(path, tmp_path, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{page} ran past {timeout:.0f} s; output so far:\n{error.stdout!s:.4000}")
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"{page} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    printed = outputs(done.stdout)
    assert sorted(printed) == runnable, f"{page}: not every block ran ({sorted(printed)})"
    for n in runnable:
        block = found[n]
        if block.expected is not None:
            assert matches(block.expected, printed[n]), (
                f"{page} line {block.line}: printed\n{printed[n]}\nthe page shows\n{block.expected}"
            )
    times = [line for line in done.stderr.splitlines() if line.startswith("@@docs-time")]
    print(f"{page}: {len(runnable)} blocks in {seconds:.1f} s\n" + "\n".join(times))


def test_docs_skips_are_listed() -> None:
    """Every skipped python block has a reason, and no page skips more than it is allowed."""
    listing = []
    for path in PAGES:
        for block in blocks(path):
            if block.info == "python" and block.skip is not None:
                assert block.skip.strip(), f"{_name(path)} line {block.line}: skip without reason"
                listing.append(f"{block.page}:{block.line}: {block.skip}")
    per_page: dict[str, int] = {}
    for entry in listing:
        page = entry.split(":")[0]
        per_page[page] = per_page.get(page, 0) + 1
    assert per_page == {page: n for page, n in ALLOWED_SKIPS.items() if n}, "\n".join(listing)
    print("skipped blocks:\n" + "\n".join(listing))


def test_docs_blocks_have_known_languages() -> None:
    """Python meant to run is fenced ```python; illustrative output is ```text."""
    known = {"python", "bash", "text", "toml", "json", "yaml", ""}
    for path in PAGES:
        for block in blocks(path):
            assert block.info in known, f"{block.page} line {block.line}: fence '{block.info}'"


def test_docs_runner_checks_output_and_skips(tmp_path: Path) -> None:
    """The runner itself: expected output is compared, a wrong one fails, skips are seen."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 2\nprint(x + 1)\n```\n\n```text\n3\n```\n\n"
        "<!-- docs-test: skip (illustration) -->\n```python\nundefined_name\n```\n\n"
        "```python\nprint([x] * 40)\n```\n\n```text\n[2, 2, ...]\n```\n"
        "```python\nprint(x)\n```\n```text\n4\n```\n"
    )
    found = blocks(page)
    assert [b.info for b in found] == [
        "python",
        "text",
        "python",
        "python",
        "text",
        "python",
        "text",
    ]
    assert found[2].skip == "illustration" and not found[2].runs
    done = run(page, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = outputs(done.stdout)
    assert sorted(printed) == [0, 3, 5]
    assert matches(found[0].expected, printed[0]) and matches(found[3].expected, printed[3])
    assert not matches(found[5].expected, printed[5])  # the page says 4, it prints 2


@pytest.mark.slow
def test_docs_build_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "WARNING" not in done.stderr, done.stderr[-4000:]
    assert (tmp_path / "index.html").exists()
