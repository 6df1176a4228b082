"""How long a comparison will take and how much memory it will hold, before it runs.

The estimate comes from the same cost model as the tables (useful FLOPs of a GEMM row, bytes a
top-k or routing row reads and writes) times the number of calls a run makes: the float64 oracle
once, then every row that can run here once to check it, ``warmup`` times and ``reps`` times. The
time divides the FLOPs by a matmul rate measured here in a few milliseconds (float32 and float64
separately), and the bytes by a measured copy rate. The memory adds up the tensors a pair keeps
alive at its peak: its inputs, the float64 oracle with its autograd activations, and the rows' own
outputs and activations. Both are rough: right in order of magnitude for large problems, low by a
few times for small ones, where Python overheads dominate. They exist to stop a paper-sized problem
from running for a quarter of an hour on a laptop CPU without a word.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from sonic_learn.compare.configs import Problem
from sonic_learn.compare.pairs import SPECS, TOUR
from sonic_learn.compare.registry import Impl, Setup

F64 = 8  # bytes of a float64
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


def _calls(reps: int, warmup: int) -> int:
    return 1 + warmup + reps  # check once, warm up, time


def _runnable(rows: tuple[Impl, ...], setup: Setup) -> list[Impl]:
    return [r for r in rows if r.available(setup)[0]]


def estimate(command: str, problem: Problem, setup: Setup, reps: int, warmup: int) -> Estimate:
    """Estimate ``command`` (a pair key, "tour" as the four pairs, or "memory") on ``problem``, with
    ``reps`` timed and ``warmup`` untimed calls per row."""
    keys = TOUR if command == "tour" else (command,)
    flops32 = flops64 = moved = 0.0
    peak = 0.0
    for key in keys:
        rows = _runnable(SPECS[key].rows, setup) if key in SPECS else []
        f32, f64, nbytes, mem = _pair_cost(key, problem, setup, len(rows), _calls(reps, warmup))
        flops32, flops64, moved = flops32 + f32, flops64 + f64, moved + nbytes
        peak = max(peak, mem)  # the pairs of a tour run one after the other
    if setup.device.type == "cuda":
        r32, r64, rb = GPU_RATES
        rate = "nominal Hopper rates"
    else:
        r32, r64, rb = cpu_rates()
        rate = f"matmul {r32 / 1e9:.0f} GFLOP/s fp32, {r64 / 1e9:.0f} fp64, copy {rb / 1e9:.0f} GB/s measured here"
    seconds = flops32 / r32 + flops64 / r64 + moved / rb
    return Estimate(flops=flops32 + flops64, bytes_moved=moved, memory_bytes=SAFETY * peak, seconds=seconds,
                    rate=rate)


def _pair_cost(key: str, p: Problem, setup: Setup, n_rows: int, calls: int) -> tuple[float, float, float, float]:
    """(FLOPs in the run's dtype, FLOPs in float64, bytes moved, peak bytes held) of one pair."""
    b = torch.empty((), dtype=setup.dtype).element_size()
    f64_only = setup.dtype == torch.float64
    P = p.T * p.K  # routed pairs (token rounding changes it by less than a tile per expert)
    if key in ("topk", "routing"):
        logits = p.T * p.E
        per_call = logits * b * 8  # the references make several passes over the (T, E) logits
        oracle = logits * F64 * 4  # the float64 sort
        held = logits * (b + 4 * F64) + n_rows * P * 3 * F64
        return 0.0, 0.0, oracle + n_rows * calls * per_call, held
    if key == "grouped-gemm":
        gemm = 2.0 * P * p.d * 2 * p.n
        oracle = 2 * gemm  # y and dW in float64
        held = (p.T * p.d + p.E * p.d * 2 * p.n + 2 * P * 2 * p.n + P * p.d) * b \
            + (p.T * p.d + 2 * p.E * p.d * 2 * p.n + 3 * P * 2 * p.n) * F64 + n_rows * P * 2 * p.n * b
        run = n_rows * calls * gemm
        return (0.0 if f64_only else run), oracle + (run if f64_only else 0.0), 0.0, held
    # the layer: backward, moe, memory
    weights = p.E * p.d * 3 * p.n  # w1 (E, d, 2n) + w2 (E, n, d)
    acts = P * (2 * p.d + 3 * p.n) + 2 * p.T * p.d + p.T * p.E  # gathered x, Y, H, A; x, out; logits
    fwd = 6.0 * P * p.n * p.d
    if key == "memory":  # two forwards (one per backward mode), their saved tensors alive one at a time
        return (0.0 if f64_only else 2 * fwd), (2 * fwd if f64_only else 0.0), 0.0, 3 * weights * b + acts * b
    routings = 2 if key == "moe" else 1  # the moe pair's oracle runs for top-k and token rounding
    oracle = routings * 3 * fwd  # forward + backward in float64
    oracle_held = (3 * weights + acts + 2 * p.T * p.d) * F64
    if key == "backward":  # every row keeps its graph for re-running the backward
        run = n_rows * (fwd + calls * 2 * fwd)
        rows_held = n_rows * (acts + weights) * b
    else:
        run = n_rows * calls * 3 * fwd
        rows_held = (acts + 2 * weights) * b
    held = oracle_held + rows_held + 4 * weights * b
    return (0.0 if f64_only else run), oracle + (run if f64_only else 0.0), 0.0, held


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
