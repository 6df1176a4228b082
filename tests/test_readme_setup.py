"""The README's set-up section: exactly two commands (run the compare tool; install the dev extras
and run the tests), CPU users pointed at PyTorch's CPU wheels, and CI running the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_COMMAND = "pip install -e . && python -m sonic_learn.compare"
TEST_COMMAND = 'pip install -e ".[dev]" && python -m pytest -q'


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _commands(section: str) -> list[str]:
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", section, flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_set_up_has_exactly_the_two_commands():
    setup = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Set up")
    assert _commands(setup) == [RUN_COMMAND, TEST_COMMAND]


def test_readme_points_cpu_users_at_the_cpu_wheels():
    setup = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Set up")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in setup
    assert "torch==" not in setup  # a plain pin pulls the CUDA build on a stock Linux machine


def test_ci_runs_the_readme_test_command_verbatim():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert TEST_COMMAND in lines


def test_readme_gives_the_course_and_the_tutorials_one_command_each():
    section = _section((ROOT / "README.md").read_text(encoding="utf-8"), "The course and the tutorials")
    commands = [c.split("#")[0].strip() for c in _commands(section)]
    assert commands == ["python -m sonic_learn.course list", "python tutorials/01_topk.py"]
    assert (ROOT / "tutorials" / "01_topk.py").is_file()
