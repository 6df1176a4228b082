"""The comparison tool: each SonicMoE pair, every implementation, side by side.

``python -m sonic_learn.compare`` is the command-line face; the pieces are reusable from tutorials
and benchmarks:

- ``configs``: problem sizes in the paper's notation and the paper's named configurations;
- ``registry``: what a row is (``Impl``), where it runs (``Setup``), ``UnsupportedProblem``;
- ``pairs``: one module per pair: inputs, float64 oracle, agreement check, cost model and rows;
- ``runner``: check first, then time (``run_pair``), using ``sonic_learn.bench``;
- ``tables`` / ``records`` / ``plots``: rich tables, JSON/CSV records, matplotlib figures;
- ``memory``: the saved-tensor table of the two backward modes.

Example::

    from sonic_learn.compare import run, get_config
    result = run("topk", get_config("tour"))
    print([(r.impl, r.status, r.timing and r.timing["median_ms"]) for r in result.rows])
"""

from __future__ import annotations

import torch

from sonic_learn.compare.configs import CONFIGS, Problem, get_config
from sonic_learn.compare.pairs import PAIRS, REGISTRY, SPECS, TOUR
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem
from sonic_learn.compare.runner import PairResult, Row, Settings, run_pair


def run(pair: str, problem: Problem, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        settings: Settings | None = None) -> PairResult:
    """Compare every registered implementation of ``pair`` (one of ``PAIRS``) on ``problem``."""
    if pair not in SPECS:
        raise ValueError(f"pair must be one of {PAIRS}, got {pair!r}")
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a sonic_learn.compare.Problem, got {type(problem).__name__}")
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"settings must be a sonic_learn.compare.Settings or None, got {type(settings).__name__}")
    setup = Setup(device=device, dtype=dtype)  # checks device and dtype
    return run_pair(SPECS[pair], SPECS[pair].rows, problem, setup, settings)


__all__ = [
    "CONFIGS", "PAIRS", "REGISTRY", "SPECS", "TOUR", "Impl", "PairResult", "Problem", "Row", "Settings", "Setup",
    "UnsupportedProblem",
    "get_config", "run", "run_pair",
]
