"""``python -m sonic_learn.course`` as a new user meets it: help with examples, a list that is not
cut in a pipe, a homework folder that carries its problem statement, Hypothesis in the base install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sonic_learn.course import __main__ as cli
from sonic_learn.course.assignments import all_assignments, get_assignment

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_each_command_once_and_has_examples():
    res = subprocess.run([sys.executable, "-m", "sonic_learn.course", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    assert "{list,start,grade}" not in res.stdout  # the commands are listed once, below
    assert res.stdout.count("grade DIR/NAME.py") == 1
    assert "examples:" in res.stdout and "python -m sonic_learn.course start topk hw1" in res.stdout


def test_list_in_a_pipe_shows_whole_doc_paths(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for a in all_assignments().values():
        assert f"docs/{a.page}" in out, a.page
    assert "…" not in out


def test_homework_folder_carries_the_problem_statement(tmp_path):
    assert cli.main(["start", "topk", str(tmp_path / "hw")]) == 0
    page = (ROOT / "docs" / get_assignment("topk").page).read_text(encoding="utf-8")
    assert (tmp_path / "hw" / "ASSIGNMENT.md").read_text(encoding="utf-8") == page
    readme = (tmp_path / "hw" / "README.md").read_text(encoding="utf-8")
    assert "ASSIGNMENT.md" in readme and "docs/course/" not in readme


def test_missing_hypothesis_is_a_one_line_hint(monkeypatch, capsys):
    def no_hypothesis(argv):
        raise ModuleNotFoundError("No module named 'hypothesis'", name="hypothesis")

    monkeypatch.setattr(cli, "_main", no_hypothesis)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install hypothesis" in err


def test_hypothesis_is_a_base_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(dep.startswith("hypothesis") for dep in project["dependencies"])
    assert project["optional-dependencies"]["course"]  # the old extra still installs
