"""``start NAME DIR``: write the starter module and a short README for the student."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sonic_learn.course.assignments import get_assignment

DOCS = Path(__file__).resolve().parents[2] / "docs"  # the course pages, in a source checkout of sonic_learn
PAGE_COPY = "ASSIGNMENT.md"  # the course page, copied next to the starter when the checkout has it


def course_page(name: str) -> str | None:
    """The text of assignment ``name``'s course page, or None when sonic_learn is not a source checkout."""
    page = DOCS / get_assignment(name).page
    return page.read_text(encoding="utf-8") if page.is_file() else None


def starter_text(name: str) -> str:
    """The starter module of assignment ``name`` (a real, importable module in sonic_learn.course.starters)."""
    a = get_assignment(name)
    return resources.files("sonic_learn.course.starters").joinpath(a.filename).read_text(encoding="utf-8")


def readme_text(name: str, directory: str = "DIR") -> str:
    a = get_assignment(name)
    lines = [
        f"# Assignment {a.number}: {a.title}",
        "",
        a.summary,
        "",
        (f"The problem statement, the math and the hints are in `{PAGE_COPY}`, next to this README (a copy of "
         f"the docs site's course page)." if course_page(name) is not None else
         f"The problem statement, the math and the hints are on the docs site's course page "
         f"`{a.page.removesuffix('.md')}/` (in a sonic_learn checkout: `mkdocs serve`, then open "
         f"http://127.0.0.1:8000/{a.page.removesuffix('.md')}/)."),
        "",
        f"## What to implement in `{a.filename}`",
        "",
        "| function | points | what |",
        "|---|---|---|",
    ]
    lines += [f"| `{t.function}` | {t.points} | {t.summary} |" for t in a.tasks]
    lines += [
        "",
        "Every function starts as `raise NotImplementedError(...)` with a hint of its length. Keep the",
        "signatures; the docstrings are the contract the grader checks (results, dtypes, error messages).",
        "",
        "## Check yourself",
        "",
        "```bash",
        f"python -m sonic_learn.course grade {a.name} {directory}",
        f"python -m sonic_learn.course grade {a.name} {directory} --verbose     # every failure, not just the first",
        "```",
        "",
        "The grader runs Hypothesis property tests on your functions (agreement with an oracle, invariants,",
        "error handling) and prints a score per task. The examples are derandomized: every run shows the same",
        "(shrunk, minimal) counterexample, so fix it and rerun. Your instructor may grade with `--seed N`,",
        "which draws examples you have not seen: pass the properties, not the examples.",
        "`grade` exits with 0 only at full marks (1 otherwise), so it can gate a CI job; `--junit FILE`",
        "writes one JUnit test case per property for autograding systems.",
        "",
        "Import what the starter imports; do not import the function you are writing from `sonic_learn`",
        "(the grader warns when a graded function comes from the library).",
    ]
    if a.gpu:
        lines += [
            "",
            "This exercise needs `pip install 'sonic_learn[gpu]'`. On a CPU-only machine it is graded for",
            "compilation (PTX for sm_90a); on a Hopper GPU the kernel also runs and is checked numerically.",
        ]
    return "\n".join(lines) + "\n"


def start(name: str, directory: str | Path, *, force: bool = False) -> list[Path]:
    """Write ``DIR/<name>.py`` and ``DIR/README.md``; refuse to overwrite unless ``force``."""
    a = get_assignment(name)
    directory = Path(directory)
    targets = {directory / a.filename: starter_text(name), directory / "README.md": readme_text(name, str(directory))}
    page = course_page(name)
    if page is not None:
        targets[directory / PAGE_COPY] = page
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(map(str, existing))} already exist: pass --force to overwrite (your work is lost)")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in targets.items():
        path.write_text(text, encoding="utf-8")
    return list(targets)
