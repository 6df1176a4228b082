"""Property checks shared by the library's tests and the course autograder.

A *property* is a statement that every correct implementation of a function satisfies, checked on
many drawn inputs: "radix_topk agrees with a float64 stable-sort oracle", "ties go to the lower
column first", "every expert's load is a multiple of tile_m". Each property lives here once, as a
plain function ``check(fn, case)`` that raises ``AssertionError`` with a message that names the
property and explains what went wrong, plus a Hypothesis strategy that draws ``case`` (shapes,
dtypes and a seed, never giant element lists) and a few pinned edge cases.

Two users call the same definitions:

* the course grader (``sonic_learn.course``) runs them on a student's module, and
* the library's own tests can run them on ``sonic_learn.reference`` and ``sonic_learn.fast``
  (``@given(case=prop.strategy)`` then ``prop.check(fn, case)``, or ``run_property``).

One submodule per pair: ``topk``, ``routing``, ``grouped_gemm``, ``backward``; ``moe`` holds the
whole layer's float64 oracle, with routing of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from hypothesis import HealthCheck, Verbosity, example, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError("the property checks and the course grader need Hypothesis: pip install 'sonic_learn[course]'") from exc

__all__ = [
    "BadInput",
    "Property",
    "PropertyResult",
    "expect",
    "expect_raises",
    "run_property",
    "seeded",
]


# ----------------------------------------------------------------------------------------------
# The building blocks of a property
# ----------------------------------------------------------------------------------------------


def expect(condition: object, message: str) -> None:
    """Raise AssertionError(message) unless ``condition`` holds (works under ``python -O`` too)."""
    if not condition:
        raise AssertionError(message)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every tensor of a case is materialized from it."""
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class BadInput:
    """One class of bad input: calling ``fn(*args, **kwargs)`` must raise ``error`` matching ``match``."""

    what: str  # e.g. "k larger than the last dim"
    args: tuple
    kwargs: dict = field(default_factory=dict)
    error: type[Exception] | tuple[type[Exception], ...] = (ValueError, TypeError)
    match: str = ""  # a regex the message must contain, usually the argument's name


def expect_raises(fn: Callable, bad: BadInput, prop: str = "rejects_bad_input") -> None:
    """The error-handling property: ``fn`` refuses ``bad`` with a clear exception.

    ``NotImplementedError`` is passed through untouched (the grader reports it as "not implemented").
    """
    errors = bad.error if isinstance(bad.error, tuple) else (bad.error,)
    names = " or ".join(e.__name__ for e in errors)
    try:
        fn(*bad.args, **bad.kwargs)
    except NotImplementedError:
        raise
    except errors as exc:
        if bad.match and not re.search(bad.match, str(exc)):
            raise AssertionError(
                f"[{prop}] {bad.what}: raised {type(exc).__name__} as expected, but the message "
                f"{str(exc)!r} does not mention {bad.match!r} (name the argument and what was expected)"
            ) from None
        return
    except Exception as exc:  # noqa: BLE001 - any other exception is the failure we report
        raise AssertionError(
            f"[{prop}] {bad.what}: expected {names} (checked before any work), got {type(exc).__name__}: {exc}"
        ) from None
    raise AssertionError(f"[{prop}] {bad.what}: expected {names}, but the call returned normally")


@dataclass(frozen=True)
class Property:
    """A named property of one function.

    Attributes:
        name: short identifier, e.g. ``"tie_rule"``; failure messages start with ``[name]``.
        summary: one sentence, shown in the grader's report and the JUnit XML.
        strategy: a Hypothesis strategy that draws a ``case``.
        check: ``check(fn, case)`` raises AssertionError when ``fn`` breaks the property.
        examples: pinned cases that always run first (edge cases, realistic sizes).
        max_examples: a cap for expensive properties (None: the runner's budget).
        needs_cuda: the property runs only where CUDA is available (skipped elsewhere).
    """

    name: str
    summary: str
    strategy: st.SearchStrategy
    check: Callable[[Callable, Any], None]
    examples: tuple = ()
    max_examples: int | None = None
    needs_cuda: bool = False


@dataclass(frozen=True)
class PropertyResult:
    """The outcome of running one property: status is "passed", "failed", "not_implemented" or "skipped"."""

    name: str
    summary: str
    status: str
    message: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _with_case(name: str, check: Callable, fn: Callable) -> Callable:
    """Wrap ``check`` so that a failure message also shows the (shrunk) case that broke it."""

    def test(case):
        try:
            check(fn, case)
        except NotImplementedError:
            raise
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n    case: {case!r}") from None
        except Exception as exc:  # a crash in the implementation fails the property, with its case
            raise AssertionError(f"[{name}] raised {type(exc).__name__}: {exc}\n    case: {case!r}") from None

    return test


def run_property(
    prop: Property,
    fn: Callable,
    *,
    max_examples: int = 25,
    seed: int | None = None,
) -> PropertyResult:
    """Run ``prop`` on ``fn`` with Hypothesis and return its result (never raises for a failure).

    ``seed=None`` derandomizes Hypothesis: the same examples every run (reproducible feedback).
    An integer seed draws other examples (an instructor's unseen tests). The pinned examples run
    first either way. A ``NotImplementedError`` anywhere gives status "not_implemented".
    """
    import time

    if prop.needs_cuda and not torch.cuda.is_available():
        return PropertyResult(prop.name, prop.summary, "skipped", "needs a CUDA GPU")
    budget = max_examples if prop.max_examples is None else min(max_examples, prop.max_examples)
    test = given(case=prop.strategy)(_with_case(prop.name, prop.check, fn))
    for case in reversed(prop.examples):
        test = example(case=case)(test)
    test = settings(
        max_examples=max(budget, 1),
        derandomize=seed is None,
        database=None,
        deadline=None,
        print_blob=False,
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
    )(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)

    start = time.perf_counter()
    try:
        test()
    except NotImplementedError as exc:
        status, message = "not_implemented", f"not implemented: {exc}" if str(exc) else "not implemented"
    except AssertionError as exc:
        status, message = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - a crash in the student's code is a failed property
        status, message = "failed", f"[{prop.name}] raised {type(exc).__name__}: {exc}"
    else:
        status, message = "passed", ""
    return PropertyResult(prop.name, prop.summary, status, message, time.perf_counter() - start)


def first_mismatch(expected: torch.Tensor, got: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first element where two same-shape tensors differ (None if equal)."""
    diff = (expected != got).nonzero()
    return tuple(int(i) for i in diff[0]) if diff.numel() else None


def short(t: torch.Tensor | Sequence, limit: int = 12) -> str:
    """A compact repr of a 1-D tensor or list for failure messages."""
    values = t.tolist() if isinstance(t, torch.Tensor) else list(t)
    text = ", ".join(str(v) for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
