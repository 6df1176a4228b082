"""Every Python code block on the docs pages that is meant to run is run here.

A ```python block in ``docs/**/*.md`` is either

- made only of ``--8<--`` snippet lines: its code is cut from a file that has its own tests (the
  tutorials run in ``tests/test_tutorials.py``; ``sonic_learn/`` is the library under test), so it
  is checked to include only such files; or
- written inline: then it is executed, the blocks of one page in order in one namespace, unless the
  line before it says ``<!-- docs-test: skip (reason) -->`` (e.g. code that needs a Hopper GPU).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b")
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::[\w-]+)?"$')
TESTED_SOURCES = ("tutorials/", "sonic_learn/")


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """(line number, dedented code, skipped) of every ```python block of a page."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").splitlines()
        skipped = bool(before) and bool(SKIP.search(before[-1]))
        line = text[: m.start()].count("\n") + 1
        blocks.append((line, textwrap.dedent(m.group("body")), skipped))
    return blocks


def test_pages_have_python_blocks() -> None:
    assert sum(len(python_blocks(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO / "docs")))
def test_python_blocks_run(page: Path) -> None:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code, skipped in python_blocks(page):
        lines = [ln.strip() for ln in code.strip().splitlines()]
        if lines and all(SNIPPET.match(ln) for ln in lines):
            for ln in lines:
                path = SNIPPET.match(ln).group(1)
                assert path.startswith(TESTED_SOURCES), f"{page.name}:{line} includes {path}, which no test runs"
                assert (REPO / path).is_file(), f"{page.name}:{line} includes a missing file {path}"
            continue
        assert not any("--8<--" in ln for ln in lines), f"{page.name}:{line} mixes snippets and inline code"
        if skipped:
            continue
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"the code block at {page.relative_to(REPO)}:{line} raised {exc!r}\n{code}")
