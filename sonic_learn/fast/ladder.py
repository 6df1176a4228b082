"""Kernel ladders: the steps that lead to a production kernel, each one runnable, validated and timed.

A ladder (llm.c style) is a list of ``Step``: a name, one line saying what the step adds to the one
before, and the call that runs it. A kernel module picks its step with an explicit argument
(``bitonic_topk(..., step="rowwise")``, ``token_rounding(..., selection="torch")``), never a
global, and ends with::

    if __name__ == "__main__":
        raise SystemExit(climb("fast top-k", STEPS_AS_LADDER, reference=..., agree=..., problems=...))

``python -m sonic_learn.fast.<module>`` then runs every step on every problem, checks it against
the reference (``agree`` raises on a mismatch, before anything is timed) and times it with
``sonic_learn.bench.measure`` (CUDA events, L2 flushed, device time only), one table per problem.
Every step of a problem is timed in the same run on the same GPU, so their ratios mean something.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sonic_learn import bench
from sonic_learn.fast._cute import fast_available


@dataclass(frozen=True)
class Step:
    """One rung: ``run(*inputs)`` returns what the reference returns for the same inputs."""

    name: str
    adds: str  # one line: what this step adds to the previous one
    run: Callable


@dataclass(frozen=True)
class Problem:
    """A named problem: ``make()`` builds the inputs (on the GPU) that every step and the reference take."""

    name: str
    make: Callable[[], tuple]


def climb(title: str, steps: Sequence[Step], *, reference: Callable, agree: Callable, problems: Sequence[Problem],
          argv: Sequence[str] | None = None) -> int:
    """Validate, then time, every step on every problem; print one table per problem. Returns the
    exit status: 0 when every step agrees with the reference, 1 on a mismatch, 2 without a GPU."""
    parser = argparse.ArgumentParser(description=f"{title}: validate every step against the reference, then time it")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per step (default 20)")
    parser.add_argument("--steps", nargs="*", choices=[s.name for s in steps], help="only these steps")
    args = parser.parse_args(argv)
    chosen = [s for s in steps if not args.steps or s.name in args.steps]

    print(f"{title}: the ladder")
    for i, s in enumerate(steps, 1):
        print(f"  {i}. {s.name:<14} {s.adds}")
    ok, why = fast_available()
    if not ok:
        print(f"the kernels run on a Hopper GPU (sm_90): {why}")
        return 2
    failed = 0
    for problem in problems:
        inputs = problem.make()
        want = reference(*inputs)
        device = next(t.device for t in inputs if hasattr(t, "device"))
        print(f"\n{problem.name}")
        print(f"  {'step':<14} {'check':<8} {'median ms':>10} {'p20-p80 ms':>18}")
        for s in chosen:
            try:
                agree(s.run(*inputs), want)
            except AssertionError as exc:
                failed += 1
                print(f"  {s.name:<14} {'FAIL':<8} {str(exc).splitlines()[0][:60]}")
                continue
            t = bench.measure(lambda s=s: s.run(*inputs), device=device, reps=args.reps)
            print(f"  {s.name:<14} {'ok':<8} {t.median_ms:>10.4f} {t.p20_ms:>8.4f}-{t.p80_ms:<9.4f}")
    env = bench.environment(device)
    print(f"\n{env['device']}; timer: bench.measure ({env.get('timer', '')}), {args.reps} reps; "
          "every step of a problem was timed in this run")
    return 1 if failed else 0
