"""Build the rows of a comparison: check every implementation against an oracle, then time the ones
that agree.

The order is the one honest benchmarks use (see llm.c's ``validate -> then benchmark`` and the
gpu-mode harness): every row is first run once and compared with a higher-precision oracle; a row
that disagrees is marked FAIL and is **not timed**; only then are the passing rows timed with
``sonic_learn.bench.measure`` (warm-up, device sync, CUDA events or perf_counter, median with p20
and p80, L2 flushed between CUDA runs).

Agreement rule for floating-point outputs: the error of a row is ``max|out - oracle| / max|oracle|``
per output tensor, and it passes when it is at most ``max(2 x the baseline's error, floor(dtype))``:
a kernel may be at most about twice as far from the float64 oracle as torch's own computation in
the same dtype. Integer outputs (indices, counts, routing) must match exactly.

Tutorials and benchmarks call ``run_pair`` directly; the CLI only parses arguments and prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sonic_learn import _checks
from sonic_learn.bench import measure, peak_memory_bytes
from sonic_learn.compare.configs import Problem
from sonic_learn.compare.registry import Impl, Setup

# Smallest tolerance per dtype (used when the baseline itself is (nearly) exact).
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
TOLERANCE_RULE = ("max|err|/max|oracle| <= max(2 x the other torch rows' error on the same oracle (the baseline's "
                  "own where no other torch row checks it), dtype floor); integers exact")

FAULT_ENV = "SONIC_LEARN_COMPARE_FAULT"


@dataclass
class Agreement:
    """How one implementation's output compares with the oracle."""

    errors: dict[str, float] = field(default_factory=dict)  # tensor name -> max|err| / max|oracle|
    mismatches: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (wrong, total)
    violations: list[str] = field(default_factory=list)  # broken invariants, in words
    tolerances: dict[str, float] = field(default_factory=dict)  # filled by the runner
    passed: bool | None = None

    def summary(self) -> str:
        parts = []
        if self.errors:
            worst = max(self.errors, key=lambda k: self.errors[k])
            parts.append(f"{self.errors[worst]:.1e}" + (f" ({worst})" if len(self.errors) > 1 else ""))
        bad = {k: v for k, v in self.mismatches.items() if v[0]}
        if bad:
            parts.append(", ".join(f"{k} {w}/{t} differ" for k, (w, t) in bad.items()))
        elif self.mismatches:
            total = sum(t for _, t in self.mismatches.values())
            parts.append(f"{total} ints exact")
        if self.violations:
            parts.append("; ".join(self.violations))
        return ", ".join(parts) if parts else "-"

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_rel_err": dict(self.errors),
            "tolerance": dict(self.tolerances),
            "mismatches": {k: {"differ": w, "total": t} for k, (w, t) in self.mismatches.items()},
            "violations": list(self.violations),
        }


@dataclass
class Cost:
    """Analytic counts of one row (from the pair's cost model), independent of the measurement."""

    flops: int | None = None  # useful FLOPs (for TFLOP/s)
    bytes_moved: int | None = None  # HBM bytes read + written (for GB/s)
    wasted_flops: int | None = None  # FLOPs spent on padding
    throughput_from: str = "flops"  # "flops" -> TFLOP/s, "bytes" -> GB/s
    extra: dict = field(default_factory=dict)  # pair-specific numbers (padded rows, ...)


@dataclass
class Row:
    """One implementation's line of a table (also one JSON/CSV record)."""

    pair: str
    impl: str
    kind: str
    algorithm: str
    status: str  # PASS, FAIL, n/a, ERROR
    why: str = ""  # reason for n/a or the error message
    agreement: Agreement | None = None
    timing: dict | None = None  # bench.Timing.as_dict()
    speedup: float | None = None  # baseline median / this median
    throughput: float | None = None
    throughput_unit: str = ""
    peak_memory_bytes: int | None = None
    saved_bytes: int | None = None
    expected_saved_bytes: int | None = None
    cost: Cost | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")

    def as_dict(self) -> dict:
        d = {
            "pair": self.pair,
            "impl": self.impl,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "status": self.status,
            "why": self.why,
            "agreement": self.agreement.as_dict() if self.agreement else None,
            "timing": self.timing,
            "speedup": self.speedup,
            "throughput": self.throughput,
            "throughput_unit": self.throughput_unit,
            "peak_memory_bytes": self.peak_memory_bytes,
            "saved_bytes": self.saved_bytes,
            "expected_saved_bytes": self.expected_saved_bytes,
        }
        if self.cost is not None:
            d["flops"] = self.cost.flops
            d["bytes_moved"] = self.cost.bytes_moved
            d["wasted_flops"] = self.cost.wasted_flops
            d["cost_extra"] = dict(self.cost.extra)
        return d


@dataclass
class PairSpec:
    """What a pair needs to be compared: inputs + oracle, the agreement check, the cost model."""

    key: str
    title: str
    oracle: str  # one line: what the rows are checked against
    make_case: Callable[[Problem, Setup, int], Any]
    compare: Callable[[Any, Impl, Any], Agreement]
    cost: Callable[[Any, Impl, Any], Cost]
    timed: str = "the call"  # what the time column measures, in words
    saved: Callable[[Any, Impl], tuple[int | None, int | None]] | None = None  # (measured, closed form)


@dataclass
class Settings:
    """How to measure."""

    reps: int | None = None  # None: 5 on CPU, 20 on CUDA
    warmup: int | None = None  # None: 1 on CPU, 3 on CUDA
    min_time_s: float | None = None  # keep repeating until this much time is measured (None: 0.02 s on CPU, 0 on CUDA)
    seed: int = 0
    fault: str | None = None  # testing only: corrupt the output of rows whose name contains this
    on_step: Callable[[str], None] | None = None  # progress callback (one call per check / timing)

    def __post_init__(self) -> None:
        if self.reps is not None:
            _checks.check_int_range("reps (--reps)", self.reps, 1)
        if self.warmup is not None:
            _checks.check_int_range("warmup (--warmup)", self.warmup, 0)
        if self.min_time_s is not None and (isinstance(self.min_time_s, bool)
                                            or not isinstance(self.min_time_s, (int, float))
                                            or not self.min_time_s >= 0):
            raise ValueError(f"min_time_s must be a number of seconds >= 0, got {self.min_time_s!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed (--seed) must be an int, got {type(self.seed).__name__}")
        if self.fault is not None and not isinstance(self.fault, str):
            raise TypeError(f"fault (--inject-fault) must be a str or None, got {type(self.fault).__name__}")
        if self.on_step is not None and not callable(self.on_step):
            raise TypeError(f"on_step must be a callable or None, got {type(self.on_step).__name__}")

    def resolved(self, device: torch.device) -> tuple[int, int]:
        cuda = device.type == "cuda"
        reps = self.reps if self.reps is not None else (20 if cuda else 5)
        warmup = self.warmup if self.warmup is not None else (3 if cuda else 1)
        return reps, warmup

    def min_time(self, device: torch.device) -> float:
        # perf_counter timings of sub-millisecond CPU calls are noisy: take more of them.
        if self.min_time_s is not None:
            return self.min_time_s
        return 0.0 if device.type == "cuda" else 0.02


@dataclass
class PairResult:
    """A finished table: the rows plus everything needed to print or store it."""

    pair: str
    title: str
    oracle: str
    timed: str
    problem: Problem
    device: str
    dtype: str
    reps: int
    warmup: int
    timer: str
    rows: list[Row]
    min_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.rows)

    def as_dict(self) -> dict:
        return {
            "pair": self.pair,
            "title": self.title,
            "oracle": self.oracle,
            "timed": self.timed,
            "tolerance_rule": TOLERANCE_RULE,
            "problem": self.problem.as_dict(),
            "device": self.device,
            "dtype": self.dtype,
            "reps": self.reps,
            "warmup": self.warmup,
            "min_time_s": self.min_time_s,
            "timer": self.timer,
            "ok": self.ok,
            "notes": list(self.notes),
            "rows": [r.as_dict() for r in self.rows],
        }


# ----------------------------------------------------------------------------------------------
# Error measures shared by the pairs
# ----------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """max|out - oracle| / max|oracle| in float64 (0 for empty tensors; inf on a shape mismatch)."""
    if tuple(out.shape) != tuple(oracle.shape):
        return math.inf
    if oracle.numel() == 0:
        return 0.0
    o = oracle.detach().to(torch.float64)
    diff = (out.detach().to(device=o.device, dtype=torch.float64) - o).abs().max().item()
    scale = o.abs().max().item()
    if math.isnan(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def mismatch(out: torch.Tensor, oracle: torch.Tensor) -> tuple[int, int]:
    """(number of differing elements, total) of two integer tensors; a shape mismatch counts all."""
    total = int(oracle.numel())
    if tuple(out.shape) != tuple(oracle.shape):
        return max(total, int(out.numel())), max(total, int(out.numel()))
    wrong = int((out.detach().long().to(oracle.device) != oracle.long()).sum().item())
    return wrong, total


# ----------------------------------------------------------------------------------------------
# Fault injection (testing only): prove that a disagreement is caught and exits non-zero
# ----------------------------------------------------------------------------------------------
def corrupt(output: Any) -> Any:
    """Return ``output`` with its first tensor perturbed (floats: +1 + max|x| on one element; ints: +1)."""
    if isinstance(output, torch.Tensor):
        bad = output.detach().clone()
        flat = bad.view(-1)
        if flat.numel() == 0:
            return bad
        if bad.is_floating_point():
            flat[0] += 1.0 + flat.abs().max()
        else:
            flat[0] += 1
        return bad
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, item in enumerate(items):
            if _has_tensor(item):
                items[i] = corrupt(item)
                break
        return type(output)(items) if isinstance(output, tuple) and not hasattr(output, "_fields") else items
    if isinstance(output, dict):
        out = dict(output)
        for k, v in out.items():
            if _has_tensor(v):
                out[k] = corrupt(v)
                break
        return out
    if dataclasses.is_dataclass(output):
        for f in dataclasses.fields(output):
            v = getattr(output, f.name)
            if _has_tensor(v):
                return dataclasses.replace(output, **{f.name: corrupt(v)})
    return output


def _has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() > 0
    if isinstance(x, (tuple, list)):
        return any(_has_tensor(i) for i in x)
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if dataclasses.is_dataclass(x):
        return any(_has_tensor(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def fault_target(settings: Settings) -> str | None:
    """The row-name fragment to corrupt: ``settings.fault``, else the environment variable ``FAULT_ENV``."""
    return settings.fault or os.environ.get(FAULT_ENV) or None


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------
def _decide(rows: list[Row], dtype: torch.dtype) -> None:
    """Set tolerances from the torch rows (baseline and yardsticks) and decide PASS/FAIL for every checked row."""
    floor = ERROR_FLOOR.get(dtype, 1e-5)
    is_torch = lambda r: r.kind in ("baseline", "torch")  # noqa: E731
    checked = [r for r in rows if r.agreement is not None and r.status != "ERROR"]
    # Torch rows first, each judged by the OTHER torch rows on the same oracle, or the dtype floor
    # (only the pair's one baseline row may define the yardstick of an oracle that no other torch
    # row checks); then every other row, judged by the torch rows that passed.
    for phase in (True, False):
        for r in (q for q in checked if is_torch(q) == phase):
            a = r.agreement
            yardsticks = [q for q in checked if is_torch(q) and q is not r and (phase or q.status == "PASS")]
            base_err: dict[str, float] = {}
            for q in yardsticks:
                for k, v in q.agreement.errors.items():
                    if math.isfinite(v):
                        base_err[k] = max(base_err.get(k, 0.0), v)
            if r.kind == "baseline":  # THE baseline defines the yardstick of an oracle no other torch row checks
                for k, v in a.errors.items():
                    if k not in base_err and math.isfinite(v):
                        base_err[k] = v
            a.tolerances = {k: max(2.0 * base_err.get(k, 0.0), floor) for k in a.errors}
            _judge(r)


def _judge(r: Row) -> None:
    """PASS when every error is within its tolerance, integer outputs match and no invariant broke."""
    a = r.agreement
    ok = all(a.errors[k] <= a.tolerances[k] for k in a.errors)
    ok = ok and all(w == 0 for w, _ in a.mismatches.values()) and not a.violations
    a.passed = ok
    r.status = "PASS" if ok else "FAIL"


def _throughput(cost: Cost | None, median_ms: float | None) -> tuple[float | None, str]:
    if cost is None:
        return None, ""
    if cost.throughput_from == "bytes":
        unit, amount, scale = "GB/s", cost.bytes_moved, 1e9
    else:
        unit, amount, scale = "TFLOP/s", cost.flops, 1e12
    if amount is None or not median_ms:
        return None, unit
    return amount / (median_ms * 1e-3) / scale, unit


def run_pair(
    spec: PairSpec,
    impls: Sequence[Impl],
    problem: Problem,
    setup: Setup,
    settings: Settings | None = None,
) -> PairResult:
    """Check every implementation against the oracle, then time the ones that agree."""
    settings = settings or Settings()
    reps, warmup = settings.resolved(setup.device)
    step = settings.on_step or (lambda _msg: None)
    fault = fault_target(settings)
    torch.manual_seed(settings.seed)
    case = spec.make_case(problem, setup, settings.seed)

    rows: list[Row] = []
    fns: dict[str, Callable[[], Any]] = {}
    # Pass 1: correctness, before anything is timed.
    for impl in impls:
        step(f"{spec.key}: check {impl.name}")
        row = Row(pair=spec.key, impl=impl.name, kind=impl.kind, algorithm=impl.algorithm, status="n/a")
        rows.append(row)
        ok, why = impl.available(setup)
        if not ok:
            row.why = why
            continue
        try:
            fn = impl.build(case)
            out = fn()
            if fault and fault in impl.name:
                out = corrupt(out)
            row.agreement = spec.compare(case, impl, out)
            row.status = "checked"
            fns[impl.name] = fn
        except (ValueError, TypeError) as exc:
            if impl.kind not in ("fast", "upstream"):
                row.status, row.why = "ERROR", f"{type(exc).__name__}: {exc}"
                continue
            # A kernel validates its inputs before launching and rejects shapes/dtypes outside its
            # contract (e.g. E not a multiple of 8): that is "not applicable here", not a wrong answer.
            row.why = f"rejects this problem: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - an implementation that crashes is a failing row
            row.status = "ERROR"
            row.why = f"{type(exc).__name__}: {exc}"
            continue
        try:
            row.cost = spec.cost(case, impl, out)
        except Exception as exc:  # noqa: BLE001 - a cost model gap must not hide the row
            row.why = f"cost model: {type(exc).__name__}: {exc}"
    _decide(rows, setup.dtype)

    # Pass 2: time (and measure memory of) the rows that agree.
    timer = "cuda-events" if setup.device.type == "cuda" else "perf_counter"
    for row, impl in zip(rows, impls):
        if row.status != "PASS":
            continue
        fn = fns[impl.name]
        step(f"{spec.key}: time {impl.name}")
        measured = getattr(fn, "measured", None)  # a row timed in its own process (compare.upstream)
        t = measured.timing if measured else measure(fn, device=setup.device, warmup=warmup, reps=reps,
                                                     min_time_s=settings.min_time(setup.device))
        row.timing = t.as_dict()
        timer = t.timer
        row.peak_memory_bytes = measured.peak_memory_bytes if measured else peak_memory_bytes(fn, setup.device)
        if spec.saved is not None:
            row.saved_bytes, row.expected_saved_bytes = spec.saved(case, impl)
        row.throughput, row.throughput_unit = _throughput(row.cost, t.median_ms)

    base = next((r for r in rows if r.kind == "baseline" and r.timing), None)
    for r in rows:
        if base is not None and r.timing and r.timing["median_ms"] > 0:
            r.speedup = base.timing["median_ms"] / r.timing["median_ms"]
        if r.cost is not None and not r.throughput_unit:
            r.throughput_unit = "GB/s" if r.cost.throughput_from == "bytes" else "TFLOP/s"

    return PairResult(
        pair=spec.key,
        title=spec.title,
        oracle=spec.oracle,
        timed=spec.timed,
        problem=problem,
        device=str(setup.device),
        dtype=str(setup.dtype).replace("torch.", ""),
        reps=reps,
        warmup=warmup,
        timer=timer,
        rows=rows,
        min_time_s=settings.min_time(setup.device),
        notes=list(getattr(case, "notes", [])),
    )
