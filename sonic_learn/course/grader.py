"""The autograder: import a student's module, run every task's properties, score, report.

Scoring: a task is worth ``points``; it earns ``points * passed / run`` where ``run`` counts its
properties that ran (a property that needs CUDA is *skipped* on a CPU machine and left out). A
property passes only if every drawn example and every pinned edge case passes.

Reproducibility: with ``seed=None`` Hypothesis is derandomized, so a student sees the same examples
(and the same shrunk counterexample) on every run. An instructor passes ``seed=N`` to grade with
examples the students have not seen.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree as ET

from sonic_learn.course.assignments import Assignment, Task
from sonic_learn.properties import PropertyResult, run_property

DEFAULT_MAX_EXAMPLES = 25


@dataclass
class TaskResult:
    task: Task
    results: list[PropertyResult]
    warning: str = ""

    @property
    def ran(self) -> list[PropertyResult]:
        return [r for r in self.results if r.status != "skipped"]

    @property
    def score(self) -> float:
        ran = self.ran
        return self.task.points * sum(r.passed for r in ran) / len(ran) if ran else 0.0

    @property
    def max_score(self) -> int:
        return self.task.points if self.ran else 0


@dataclass
class GradeReport:
    assignment: Assignment
    source: str  # the graded file or module
    seed: int | None
    max_examples: int
    tasks: list[TaskResult] = field(default_factory=list)
    import_error: str = ""
    seconds: float = 0.0
    shown: str = ""  # the assignment's "show" line, computed with the graded module

    @property
    def score(self) -> float:
        return sum(t.score for t in self.tasks)

    @property
    def max_score(self) -> int:
        return sum(t.max_score for t in self.tasks) if self.tasks else self.assignment.max_points

    @property
    def percent(self) -> float:
        return 100.0 * self.score / self.max_score if self.max_score else 0.0

    @property
    def full_marks(self) -> bool:
        return not self.import_error and all(r.passed for t in self.tasks for r in t.ran) and self.max_score > 0


# ----------------------------------------------------------------------------------------------
# Loading the student's module
# ----------------------------------------------------------------------------------------------


def student_path(assignment: Assignment, directory: str | Path) -> Path:
    return Path(directory) / assignment.filename


def require_student_file(assignment: Assignment, directory: str | Path) -> Path:
    """The resolved path of ``DIR/<name>.py``; FileNotFoundError (a usage error) if it is missing."""
    path = student_path(assignment, directory).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m sonic_learn.course start {assignment.name} {directory}` first")
    return path


def load_student_module(assignment: Assignment, directory: str | Path) -> ModuleType:
    """Import ``DIR/<name>.py`` under a private module name; DIR is on sys.path while it runs.

    Raises FileNotFoundError when the file is missing; any exception of the module's own code
    (a syntax error, a failing import) propagates.
    """
    path = require_student_file(assignment, directory)
    module_name = f"sonic_learn_course_submission_{assignment.name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # CuTe-DSL (and dataclasses) look the module up by name
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------


def _all_failed(task: Task, why: str) -> TaskResult:
    """Every property of ``task`` failed for one reason (the function is missing, the module did not import)."""
    return TaskResult(task, [PropertyResult(p.name, p.summary, "failed", f"[{p.name}] {why}") for p in task.properties()])


def grade_module(
    assignment: Assignment,
    module: ModuleType,
    *,
    source: str | None = None,
    seed: int | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    reference: bool = False,
) -> GradeReport:
    """Run every task's properties on the functions of ``module``."""
    source = source or getattr(module, "__file__", None) or module.__name__
    report = GradeReport(assignment, source, seed, max_examples)
    start = time.perf_counter()
    for task in assignment.tasks:
        fn = getattr(module, task.function, None)
        if not callable(fn):
            report.tasks.append(_all_failed(task, f"function {task.function!r} is missing from {source}"))
            continue
        results = [run_property(p, fn, max_examples=max_examples, seed=seed) for p in task.properties()]
        warning = ""
        fn_module = getattr(fn, "__module__", "") or ""
        if not reference and fn_module.startswith("sonic_learn."):
            warning = f"{task.function} is the library's own function ({fn_module}), not one written in {source}"
        report.tasks.append(TaskResult(task, results, warning))
    report.seconds = time.perf_counter() - start
    needed = [t for t in report.tasks if t.task.function in assignment.show_needs]
    if assignment.show is not None and needed and all(r.passed for t in needed for r in t.ran):
        report.shown = assignment.show(module)
    return report


def grade(
    assignment: Assignment,
    directory: str | Path | None = None,
    *,
    seed: int | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    reference: bool = False,
) -> GradeReport:
    """Grade ``DIR/<name>.py`` (or, with ``reference=True``, the library's own key module)."""
    if not isinstance(assignment, Assignment):
        raise TypeError(f"assignment must be an Assignment (get_assignment(name)), got {type(assignment).__name__}")
    if directory is None and not reference:
        raise ValueError(f"directory must be the folder holding {assignment.filename} (or pass reference=True), got None")
    if reference:
        module = importlib.import_module(assignment.key)
        return grade_module(assignment, module, source=assignment.key, seed=seed, max_examples=max_examples, reference=True)
    require_student_file(assignment, directory)  # a missing file is a usage error, not a score of 0
    try:
        module = load_student_module(assignment, directory)
    except (Exception, SystemExit) as exc:  # the student's module failed to import: score 0 with the reason
        report = GradeReport(assignment, str(student_path(assignment, directory)), seed, max_examples)
        report.import_error = f"{type(exc).__name__}: {exc}"
        report.tasks = [_all_failed(t, f"the module failed to import: {report.import_error}") for t in assignment.tasks]
        return report
    return grade_module(assignment, module, source=str(student_path(assignment, directory)), seed=seed,
                        max_examples=max_examples)


# ----------------------------------------------------------------------------------------------
# Reporting: a rich table, and JUnit XML for autograding systems
# ----------------------------------------------------------------------------------------------

_STATUS_STYLE = {"passed": "green", "failed": "red", "not_implemented": "yellow", "skipped": "dim"}


def print_report(report: GradeReport, console=None, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape  # messages hold brackets ("[tie_rule]", "offsets[e]"): never markup
    from rich.table import Table

    console = console or Console()
    a = report.assignment
    examples = "derandomized (same examples every run)" if report.seed is None else f"seed {report.seed}"
    table = Table(title=f"Assignment {a.number}: {a.title}", caption=f"{report.source} | {report.max_examples} examples "
                  f"per property, {examples} | {report.seconds:.1f} s", title_justify="left")
    table.add_column("task", style="bold", no_wrap=True)
    table.add_column("property")
    table.add_column("result", no_wrap=True)
    table.add_column("points", justify="right", no_wrap=True)
    for t in report.tasks:
        first = True
        for r in t.results:
            shown = r.status.replace("_", " ")
            table.add_row(
                t.task.function if first else "",
                r.name,
                f"[{_STATUS_STYLE[r.status]}]{shown}[/]",
                f"{t.score:.2f} / {t.max_score}" if first else "",
            )
            first = False
        table.add_section()
    table.add_row("[bold]total", "", "", f"[bold]{report.score:.2f} / {report.max_score}  ({report.percent:.0f}%)")
    console.print(table)
    if report.import_error:
        console.print(f"[red]The module failed to import:[/] {escape(report.import_error)}")
    for t in report.tasks:
        if t.warning:
            console.print(f"[yellow]warning:[/] {escape(t.warning)}")
        for r in t.results:
            if r.status in ("failed", "not_implemented") and (verbose or r is _first_problem(t)):
                console.print(f"[{_STATUS_STYLE[r.status]}]{t.task.function} / {r.name}:[/] {escape(r.message)}", highlight=False)
            elif r.status == "skipped" and verbose:
                console.print(f"[dim]{t.task.function} / {r.name}: skipped ({escape(r.message)})[/]")
    if report.shown:
        console.print(escape(report.shown), highlight=False)
    if not verbose and any(not r.passed and r.status != "skipped" for t in report.tasks for r in t.results):
        console.print("[dim](first failure per task shown; --verbose shows all)[/]")


def _first_problem(t: TaskResult) -> PropertyResult | None:
    return next((r for r in t.results if r.status in ("failed", "not_implemented")), None)


def junit_xml(reports: list[GradeReport]) -> ET.ElementTree:
    """JUnit XML: one testsuite per assignment, one testcase per (task, property)."""
    suites = ET.Element("testsuites", name="sonic_learn.course")
    totals = {"tests": 0, "failures": 0, "skipped": 0, "time": 0.0}
    for report in reports:
        results = [(t, r) for t in report.tasks for r in t.results]
        failures = sum(r.status in ("failed", "not_implemented") for _, r in results)
        skipped = sum(r.status == "skipped" for _, r in results)
        suite = ET.SubElement(suites, "testsuite", name=report.assignment.name, tests=str(len(results)),
                              failures=str(failures), errors="0", skipped=str(skipped), time=f"{report.seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for name, value in (("score", f"{report.score:.4f}"), ("max_score", str(report.max_score)),
                            ("percent", f"{report.percent:.2f}"), ("source", report.source),
                            ("seed", "derandomized" if report.seed is None else str(report.seed)),
                            ("max_examples", str(report.max_examples))):
            ET.SubElement(props, "property", name=name, value=value)
        for t, r in results:
            case = ET.SubElement(suite, "testcase", classname=f"{report.assignment.name}.{t.task.function}", name=r.name,
                                 time=f"{r.seconds:.3f}")
            if r.status in ("failed", "not_implemented"):
                kind = "NotImplementedError" if r.status == "not_implemented" else "PropertyFailed"
                fail = ET.SubElement(case, "failure", message=r.message.splitlines()[0] if r.message else kind, type=kind)
                fail.text = r.message
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message)
        totals["tests"] += len(results)
        totals["failures"] += failures
        totals["skipped"] += skipped
        totals["time"] += report.seconds
    for key, value in totals.items():
        suites.set(key, f"{value:.3f}" if key == "time" else str(value))
    return ET.ElementTree(suites)


def write_junit(reports: list[GradeReport], path: str | Path) -> None:
    tree = junit_xml(reports)
    ET.indent(tree)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)
