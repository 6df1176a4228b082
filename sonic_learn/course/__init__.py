"""Course assignments on SonicMoE: starter code, an autograder built on the property tests, and pages.

Command line (``python -m sonic_learn.course``)::

    list                                   the assignments and their tasks
    start NAME DIR [--force]               write DIR/NAME.py (the starter) and DIR/README.md
    grade NAME DIR [--junit FILE] [--seed N] [--max-examples N] [--verbose]
    grade NAME --reference                 grade the library's own implementation (must be 100%)

``grade`` exits with 0 only at full marks (every property passed), 1 otherwise, and 2 on a usage
error (unknown assignment, missing file). Partial credit is in the table and the JUnit XML.

Python: ``all_assignments()``, ``get_assignment(name)``, ``start(name, directory)``,
``grade(assignment, directory, seed=..., max_examples=...)``, ``print_report``, ``write_junit``.
"""

from sonic_learn.course.assignments import Assignment, Task, all_assignments, get_assignment
from sonic_learn.course.grader import GradeReport, grade, grade_module, print_report, write_junit
from sonic_learn.course.starter import readme_text, start, starter_text

__all__ = [
    "Assignment",
    "GradeReport",
    "Task",
    "all_assignments",
    "get_assignment",
    "grade",
    "grade_module",
    "print_report",
    "readme_text",
    "start",
    "starter_text",
    "write_junit",
]
