"""MkDocs hooks of the sonic_learn site.

``on_page_markdown`` fills two pages with text generated from the code at build time, so neither
can drift from it:

- the Benchmarks page: tables rendered from the measured JSON files in ``benchmarks/results/``
  (``docs/gen_benchmarks.py``), never a hand-typed number;
- the CLI reference: the ``--help`` of ``python -m sonic_learn.compare`` and of each subcommand,
  from the tool's own argument parser;
- the Course page: the table of assignments defined in ``sonic_learn.course``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from pathlib import Path

BENCHMARK_MARKER = "<!-- benchmark-tables -->"
CLI_MARKER = "<!-- cli-help -->"
COURSE_MARKER = "<!-- course-assignments -->"


def _gen_benchmarks():
    path = Path(__file__).with_name("gen_benchmarks.py")
    spec = importlib.util.spec_from_file_location("sonic_learn_docs_gen_benchmarks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_help_markdown() -> str:
    """The help of the compare tool and of every subcommand, as Markdown sections."""
    try:
        cli = importlib.import_module("sonic_learn.compare.__main__")
        build_parser = cli.build_parser
    except (ModuleNotFoundError, AttributeError):
        return (
            '!!! warning "Not in this version"\n'
            "    `python -m sonic_learn.compare` is not available in this version of sonic_learn.\n"
        )
    old = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "TERM")}
    os.environ.update({"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})  # plain, fixed-width help
    try:
        parser = build_parser()
        parser.prog = "python -m sonic_learn.compare"
        sections = ["## `python -m sonic_learn.compare`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for action in parser._actions:  # argparse keeps subcommands in a _SubParsersAction
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    sub.prog = f"python -m sonic_learn.compare {name}"
                    sections += [f"## `{name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "\n".join(sections)


def course_markdown(docs_dir: Path) -> str:
    """The assignments that ``sonic_learn.course`` defines, as a table (or a note if there are none)."""
    try:
        course = importlib.import_module("sonic_learn.course")
    except ModuleNotFoundError:
        return '!!! warning "Not in this version"\n    `sonic_learn.course` is not available in this version.\n'
    rows = ["| # | Assignment | Your module | Tasks (points) | Needs |", "|---|---|---|---|---|"]
    for a in sorted(course.all_assignments().values(), key=lambda a: a.number):
        title = f"[{a.title}]({a.page})" if (docs_dir / a.page).is_file() else a.title
        tasks = ", ".join(f"`{t.function}` ({t.points})" for t in a.tasks)
        needs = "CuTe-DSL (compiles on a CPU, runs on a Hopper GPU)" if a.gpu else "a CPU"
        rows.append(f"| {a.number} | {title} | `{a.filename}` | {tasks} | {needs} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if BENCHMARK_MARKER in markdown:
        markdown = markdown.replace(BENCHMARK_MARKER, _gen_benchmarks().render_results())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_help_markdown())
    if COURSE_MARKER in markdown:
        markdown = markdown.replace(COURSE_MARKER, course_markdown(Path(config["docs_dir"])))
    return markdown
