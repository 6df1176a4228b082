"""Every tutorial's exercises have an answer key that ships and runs: ``tutorials/answers/NN_name.py``.

Each key computes its answers with the library and asserts them; this test runs every key on a CPU
in a fresh process, checks that each exercise of the tutorial is answered, and that the tutorial
points to its key.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
ANSWERS = REPO / "tutorials" / "answers"


def _exercise_numbers(tutorial: Path) -> list[int]:
    text = tutorial.read_text()
    block = text[text.index("## Exercises"):text.index("<!-- --8<-- [end:exercises] -->")]
    return [int(m) for m in re.findall(r"^(\d+)\. \*\*", block, re.MULTILINE)]


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_answer_key_exists_and_the_tutorial_points_to_it(tutorial: Path) -> None:
    key = ANSWERS / tutorial.name
    assert key.is_file(), f"no answer key {key.relative_to(REPO)} for {tutorial.name}"
    assert f"tutorials/answers/{tutorial.name}" in tutorial.read_text(), "the exercises must name their key"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_answer_key_runs_and_answers_every_exercise(tutorial: Path) -> None:
    key = ANSWERS / tutorial.name
    if not key.is_file():
        pytest.fail(f"no answer key for {tutorial.name}")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(key)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{key.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    answered = {int(m) for m in re.findall(r"^(\d+)\. ", proc.stdout, re.MULTILINE)}
    exercises = _exercise_numbers(tutorial)
    assert exercises, f"no numbered exercises found in {tutorial.name}"
    assert set(exercises) <= answered, f"exercises {sorted(set(exercises) - answered)} have no printed answer"
