"""How long a comparison will take and how much memory it will hold, before it runs.

Each pair states the cost of a whole run in its module (``PairSpec.work``, next to the per-row
cost model of the tables): the FLOPs of its GEMMs or the bytes its top-k and routing rows move,
times the calls a run makes (the float64 oracle once, then every row that can run here once to
check it, ``warmup`` times and ``reps`` times), and the bytes it keeps alive at its peak (inputs,
the float64 oracle with its autograd activations, the rows' outputs and graphs). Here the FLOPs
are divided by a matmul rate measured in a few milliseconds (float32 and float64 separately) and
the bytes by a measured copy rate. Both are rough: right in order of magnitude for large problems, low by a
few times for small ones, where Python overheads dominate. They exist to stop a paper-sized problem
from running for a quarter of an hour on a laptop CPU without a word.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from sonic_learn.compare import memory
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs import SPECS, TOUR
from sonic_learn.compare.registry import Setup

SAFETY = 1.25  # allocator slack, temporaries of the references
# Above these, a CPU run is refused unless --allow-large is given.
CPU_MAX_SECONDS = 180.0
CPU_MAX_MEMORY_FRACTION = 0.5  # of the machine's physical memory
LONG_RUN_SECONDS = 15.0  # above this, progress goes to stderr even when it is not a terminal


@dataclass(frozen=True)
class Estimate:
    """The predicted cost of one command on one problem."""

    flops: float  # every FLOP of the run (oracle + all calls of every row that runs here)
    bytes_moved: float  # bytes read + written by the memory-bound rows' calls
    memory_bytes: float  # peak memory held at once (host memory on the CPU)
    seconds: float
    rate: str  # how the seconds were derived, in words

    def describe(self) -> str:
        return (f"~{fmt_seconds(self.seconds)} and ~{self.memory_bytes / 2**30:.1f} GiB "
                f"({self.flops / 1e12:.2f} TFLOP, {self.bytes_moved / 1e9:.1f} GB moved; {self.rate})")


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@functools.lru_cache(maxsize=None)
def cpu_rates() -> tuple[float, float, float]:
    """(float32 FLOP/s, float64 FLOP/s, copy bytes/s) measured here on small problems (a few ms)."""
    def best_seconds(fn) -> float:  # the fastest of a few runs: other processes only slow a run down
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-9)

    rates = []
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(384, 384, dtype=dtype)
        rates.append(2 * 384**3 / best_seconds(lambda: a @ a))
    src = torch.empty(16 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    rates.append(2 * src.numel() / best_seconds(lambda: dst.copy_(src)))
    return rates[0], rates[1], rates[2]


# Nominal rates of one Hopper GPU (no measurement: the GPU rows are short anyway).
GPU_RATES = (100e12, 30e12, 2e12)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def estimate(command: str, problem: Problem, setup: Setup, reps: int, warmup: int) -> Estimate:
    """Estimate ``command`` (a pair key, "tour" as the four pairs, or "memory") on ``problem``, with
    ``reps`` timed and ``warmup`` untimed calls per row, from each pair's cost model (``PairSpec.work``)."""
    calls = 1 + warmup + reps  # each row: checked once, warmed up, timed
    if command == "memory":
        works = [memory.work(problem, setup.dtype)]
    else:
        keys = TOUR if command == "tour" else (command,)
        works = [SPECS[k].work(problem, setup.dtype, sum(r.available(setup)[0] for r in SPECS[k].rows), calls)
                 for k in keys]
    flops = sum(w.flops for w in works)
    flops_f64 = sum(w.flops_f64 for w in works)
    moved = sum(w.bytes_moved for w in works)
    peak = max(w.held_bytes for w in works)  # the pairs of a tour run one after the other
    if setup.device.type == "cuda":
        r32, r64, rb = GPU_RATES
        rate = "nominal Hopper rates"
    else:
        r32, r64, rb = cpu_rates()
        rate = f"matmul {r32 / 1e9:.0f} GFLOP/s fp32, {r64 / 1e9:.0f} fp64, copy {rb / 1e9:.0f} GB/s measured here"
    seconds = flops / r32 + flops_f64 / r64 + moved / rb
    return Estimate(flops=flops + flops_f64, bytes_moved=moved, memory_bytes=SAFETY * peak, seconds=seconds,
                    rate=rate)


def refusal(est: Estimate, setup: Setup) -> str | None:
    """Why a run is too large for this machine (CPU only), or None."""
    if setup.device.type != "cpu":
        return None
    total = physical_memory_bytes()
    reasons = []
    if est.seconds > CPU_MAX_SECONDS:
        reasons.append(f"more than {fmt_seconds(CPU_MAX_SECONDS)}")
    if total and est.memory_bytes > CPU_MAX_MEMORY_FRACTION * total:
        reasons.append(f"more than half of this machine's {total / 2**30:.0f} GiB of memory")
    return " and ".join(reasons) or None
