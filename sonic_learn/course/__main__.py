"""``python -m sonic_learn.course list | start NAME DIR | grade NAME DIR [--junit FILE] [--seed N]``.

Exit codes: 0 = success (``grade``: full marks), 1 = ``grade`` below full marks, 2 = usage error.
"""

from __future__ import annotations

import argparse
import sys

from sonic_learn.course.assignments import all_assignments, get_assignment
from sonic_learn.course.grader import DEFAULT_MAX_EXAMPLES, grade, print_report, write_junit
from sonic_learn.course.starter import start


def _parser() -> argparse.ArgumentParser:
    names = ", ".join(all_assignments())
    p = argparse.ArgumentParser(
        prog="python -m sonic_learn.course", description="SonicMoE course assignments: starter code and an autograder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m sonic_learn.course list                    # the assignments and their tasks\n"
               "  python -m sonic_learn.course start topk hw1          # starter code + README in hw1/\n"
               "  python -m sonic_learn.course grade topk hw1          # grade hw1/topk.py\n"
               "  python -m sonic_learn.course grade topk --reference  # the library's own answer (full marks)\n\n"
               "exit status: 0 success (grade: full marks), 1 grade below full marks, 2 usage error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the assignments and their tasks")
    s = sub.add_parser("start", help="write the starter module and a README into DIR")
    s.add_argument("name", metavar="NAME", help=f"one of: {names}")
    s.add_argument("directory", metavar="DIR")
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    g = sub.add_parser("grade", help="grade DIR/NAME.py",
                       epilog="Exit code: 0 at full marks, 1 below, 2 on a usage error.")
    g.add_argument("name", metavar="NAME", help=f"one of: {names}")
    g.add_argument("directory", metavar="DIR", nargs="?", help="the folder holding NAME.py")
    g.add_argument("--junit", metavar="FILE", help="also write JUnit XML (one testcase per property)")
    g.add_argument("--seed", type=int, default=None,
                   help="draw examples from this seed (instructors: unseen examples); default: derandomized")
    g.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, metavar="N",
                   help=f"examples per property (default {DEFAULT_MAX_EXAMPLES}; pinned edge cases always run)")
    g.add_argument("--reference", action="store_true", help="grade the library's own implementation instead of DIR")
    g.add_argument("--verbose", "-v", action="store_true", help="show every failure, not just the first per task")
    return p


def _list() -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sonic_learn course assignments", title_justify="left")
    for col in ("#", "NAME", "title", "tasks (points)"):
        table.add_column(col, no_wrap=col in ("NAME", "tasks (points)"))
    for a in all_assignments().values():
        tasks = "\n".join(f"{t.function} ({t.points})" for t in a.tasks)
        title = f"{a.title}{' [GPU]' if a.gpu else ''}\n[dim]docs/{a.page}[/]"
        table.add_row(str(a.number), a.name, title, tasks, end_section=True)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: wide enough that no doc path is cut
        console = Console(width=max(console.width, 160))
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:  # an install without the base dependencies (e.g. an old one)
        if exc.name != "hypothesis":
            raise
        print("error: the course needs Hypothesis: pip install hypothesis (or pip install -e .)", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list()
    try:
        assignment = get_assignment(args.name)
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "start":
        try:
            paths = start(args.name, args.directory, force=args.force)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}")
        print(f"next: implement the functions in {paths[0]}, then run\n  python -m sonic_learn.course grade {args.name} {args.directory}")
        return 0
    # grade
    if not args.reference and args.directory is None:
        parser.error("grade needs DIR (the folder holding NAME.py), or --reference")
    if args.max_examples < 1:
        parser.error(f"--max-examples must be >= 1, got {args.max_examples}")
    try:
        report = grade(assignment, args.directory, seed=args.seed, max_examples=args.max_examples, reference=args.reference)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report, verbose=args.verbose)
    if args.junit:
        write_junit([report], args.junit)
        print(f"wrote {args.junit}")
    return 0 if report.full_marks else 1


if __name__ == "__main__":
    sys.exit(main())
