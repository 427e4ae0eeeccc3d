"""Run the Python blocks of a Markdown page as a reader would: pasted, in order, in one script.

Conventions (the docs test, ``tests/test_docs.py``, relies on them; keep pages to them):

* Every fenced block whose info string is exactly ``python`` runs. A page's blocks run in
  page order, in one fresh interpreter, sharing one namespace, as one script (``__name__ ==
  "__main__"``, so a block may use ``if __name__ == "__main__":`` and multiprocessing with
  spawn works as it does for a reader's own script). Shell commands are ```` ```bash ````,
  output is ```` ```text ````, neither runs.
* A block that must not run (it needs ``torchrun``, a GPU, a real checkpoint...) has the
  comment ``<!-- docs-test: skip (the reason) -->`` on the line right before its opening
  fence (blank lines between are allowed). The test lists every skipped block and fails when
  a page skips more blocks than ``ALLOWED_SKIPS`` in ``tests/test_docs.py`` grants it.
* Expected output: a ```` ```text ```` block that follows a ``python`` block with nothing
  but blank lines between them is what that block prints. It is compared with
  ``doctest``'s rules, ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE`` on: ``...`` matches
  anything, runs of spaces and newlines are equal. A ``# ...`` comment after a ``print``
  is prose for the reader and is not checked.

``python tests/docs_blocks.py docs/page.md`` runs one page the same way and prints its
blocks' output, one ``@@docs-block N@@`` line before each block's.
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$")
MARK = "@@docs-block {}@@"
END = "@@docs-end@@"


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the first line of code
    info: str  # the fence's info string ("python", "text", "bash", ...)
    source: str
    skip: str | None = None  # the reason, for a block marked skip
    expected: str | None = None  # the ```text block that follows it, if any

    @property
    def runs(self) -> bool:
        return self.info == "python" and self.skip is None


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page, in order, with skip marks and expected output attached."""
    lines = path.read_text().splitlines()
    resolved = path.resolve()
    page = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(path)
    found: list[tuple[Block, int]] = []  # (block, line index after its closing fence)
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]
        ]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = SKIP.match(lines[k]) if k >= 0 else None
        block = Block(page, i + 2, info, "\n".join(body) + "\n", mark["reason"] if mark else None)
        found.append((block, j + 1))
        i = j + 1
    result: list[Block] = []
    for n, (block, after) in enumerate(found):
        if block.info == "python" and n + 1 < len(found):
            following, _ = found[n + 1]
            between = lines[after : following.line - 2]
            if following.info == "text" and all(not line.strip() for line in between):
                block = Block(
                    block.page, block.line, block.info, block.source, block.skip, following.source
                )
        result.append(block)
    return result


def script(path: Path) -> str:
    """The page's runnable blocks as one script; tracebacks name the page and its lines."""
    # Spawned processes import the script again (as ``__mp_main__``): only the reader's own
    # process marks where each block's output starts.
    runnable = [(n, block) for n, block in enumerate(blocks(path)) if block.runs]
    sources = ["\n" * (block.line - 1) + block.source for _, block in runnable]
    parts = [
        "import sys as _docs_sys, time as _docs_time",
        "_docs_main = __name__ == '__main__'",
        f"_docs_sources = {sources!r}",
    ]
    for i, (n, block) in enumerate(runnable):
        parts.append(f"_docs_main and print({MARK.format(n)!r}, flush=True)")
        parts.append("_docs_start = _docs_time.perf_counter(), _docs_time.process_time()")
        parts.append(f"exec(compile(_docs_sources[{i}], {block.page!r}, 'exec'))")
        parts.append("_docs_sys.stdout.flush()")
        parts.append(
            f"_docs_main and print('@@docs-time {block.page}:{block.line} wall %.1f s, cpu %.1f s'"
            " % (_docs_time.perf_counter() - _docs_start[0],"
            " _docs_time.process_time() - _docs_start[1]), file=_docs_sys.stderr, flush=True)"
        )
    parts.append(f"_docs_main and print({END!r}, flush=True)")
    return "\n".join(parts) + "\n"


def outputs(stdout: str) -> dict[int, str]:
    """Split a run's stdout into each block's output, by block number."""
    found: dict[int, str] = {}
    current: int | None = None
    for line in stdout.splitlines(keepends=True):
        marker = re.fullmatch(r"@@docs-block (\d+)@@\n?", line)
        if marker:
            current = int(marker[1])
            found[current] = ""
        elif line.rstrip("\n") == END:
            current = None
        elif current is not None:
            found[current] += line
    return found


def matches(expected: str, got: str) -> bool:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(expected, got, flags)


def run(
    path: Path, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    file = cwd / "docs_page.py"
    file.write_text(script(path))
    return subprocess.run(
        [sys.executable, str(file)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        done = run(Path(sys.argv[1]), Path(folder), timeout=600)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
