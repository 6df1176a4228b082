"""Every tutorial script runs top to bottom on the CPU, and is laid out as the docs expect.

The tutorials (``tutorials/NN_name.py``) are jupytext "percent" scripts whose cells the docs pages
include through ``pymdownx.snippets`` section markers; this file executes each one in a fresh
process with CUDA hidden (so the GPU-only cells are skipped, as on a CPU machine) and checks the
cell structure every chapter promises: learning objectives, a check, a measurement, exercises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
DOC_PAGES = sorted((REPO / "docs").rglob("*.md"))


def test_the_tutorials_exist_and_are_numbered_in_order() -> None:
    names = [p.name for p in TUTORIALS]
    for chapter in ["01_topk.py", "02_routing.py", "03_grouped_gemm.py", "04_backward.py", "05_moe_layer.py",
                    "07_expert_parallelism.py"]:
        assert chapter in names
    # A later chapter only needs a file tutorials/NN_name.py and a docs page; one file per number.
    assert len({n[:2] for n in names}) == len(names), names


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_on_cpu(script: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"{script.name} failed after {elapsed:.1f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    assert "Traceback" not in proc.stderr
    if script.name == "01_topk.py":  # its GPU cell says, on a CPU machine, what it skipped
        assert "no CUDA device here" in proc.stdout
    print(f"{script.name}: {elapsed:.1f} s")


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_a_jupytext_notebook(script: Path) -> None:
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(script)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= 4 and kinds.count("code") >= 4, kinds
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Learning objectives" in text and "## Exercises" in text
    assert "$" in text, "no math in the text cells"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "measure(" in code, "no measurement on the current device"
    assert "assert " in code, "no check against an oracle"
    assert "if torch.cuda.is_available():" in code, "no guarded GPU cell"
    # Every GPU cell says so on its guard line.
    for line in code.splitlines():
        if "torch.cuda.is_available()" in line and line.lstrip().startswith("if "):
            assert "GPU only" in line, line


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_sections_are_balanced_and_used_by_the_docs(script: Path) -> None:
    src = script.read_text()
    starts = re.findall(r"--8<-- \[start:([\w-]+)\]", src)
    ends = re.findall(r"--8<-- \[end:([\w-]+)\]", src)
    assert starts and starts == ends, (starts, ends)
    assert len(set(starts)) == len(starts), "duplicate section names"
    included = set()
    for page in DOC_PAGES:
        included |= set(re.findall(rf'--8<-- "tutorials/{re.escape(script.name)}:([\w-]+)"', page.read_text()))
    missing = set(starts) - included
    assert not missing, f"sections of {script.name} that no docs page shows: {sorted(missing)}"
