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
from sonic_learn.compare.registry import Impl, Setup, UnsupportedProblem

# Smallest tolerance per dtype (used when the baseline itself is (nearly) exact).
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
TOLERANCE_FACTOR = 2.0  # a row may be this many times as far from the oracle as torch's own computation
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


@dataclass(frozen=True)
class Work:
    """What a whole comparison of one pair costs, predicted before it runs (``compare.estimate``)."""

    flops: float = 0.0  # in the run's dtype (every call of every row)
    flops_f64: float = 0.0  # in float64 (the oracle; the rows too for a float64 run)
    bytes_moved: float = 0.0  # by the memory-bound rows' calls and the oracle's sort
    held_bytes: float = 0.0  # peak bytes alive at once: inputs, oracle, the rows' outputs and graphs


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
    rows: tuple[Impl, ...] = ()  # every implementation of the pair, in table order
    # (problem, dtype, rows that run, calls per row) -> Work: the cost model of the whole run
    work: Callable[[Problem, torch.dtype, int, int], Work] | None = None


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
# Fault injection (testing only): prove that the check catches a small wrong answer in any output
# ----------------------------------------------------------------------------------------------
FAULT_MARGIN = 2.5  # a float fault moves one element by FAULT_MARGIN x the tolerance (relative to max|x|)


def output_tensors(output: Any, path: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """Every non-empty tensor of a row's output with its path (tuple/list index, dict key, field name)."""
    if isinstance(output, torch.Tensor):
        return [(path, output)] if output.numel() else []
    if isinstance(output, (tuple, list)):
        items = enumerate(output)
    elif isinstance(output, dict):
        items = output.items()
    elif dataclasses.is_dataclass(output):
        items = ((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    else:
        return []
    return [found for key, item in items for found in output_tensors(item, (*path, key))]


def replace_at(output: Any, path: tuple, new: torch.Tensor) -> Any:
    """A copy of ``output`` with the tensor at ``path`` replaced (tuples, named or not, become plain tuples)."""
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(output, dict):
        return {**output, key: replace_at(output[key], rest, new)}
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **{key: replace_at(getattr(output, key), rest, new)})
    items = list(output)
    items[key] = replace_at(items[key], rest, new)
    return items if isinstance(output, list) else tuple(items)


def corrupt_tensor(t: torch.Tensor, tolerance: float) -> torch.Tensor:
    """A copy of ``t`` with ONE element wrong, by as little as the check should still catch:
    floats: the largest element moved by FAULT_MARGIN x tolerance x max|t| (its new error is at least
    (FAULT_MARGIN - 1) x tolerance whatever its old error, as long as that was within tolerance);
    integers (indices, counts, ids): that element plus one."""
    bad = t.detach().clone(memory_format=torch.contiguous_format)
    flat = bad.view(-1)
    if bad.is_floating_point():
        mags = flat.abs().double()
        i = int(torch.argmax(torch.nan_to_num(mags, nan=0.0)))
        scale = float(mags[i]) or 1.0
        flat[i] = float(flat[i]) + FAULT_MARGIN * tolerance * scale
    elif bad.dtype == torch.bool:
        flat[0] = ~flat[0]
    else:
        flat[0] += 1
    return bad


def fault_target(settings: Settings) -> str | None:
    """The row-name fragment to corrupt: ``settings.fault``, else the environment variable ``FAULT_ENV``."""
    return settings.fault or os.environ.get(FAULT_ENV) or None


def _inject_faults(spec: PairSpec, case: Any, impl: Impl, row: Row, out: Any) -> None:
    """Corrupt each output tensor of a row that passed, one at a time, and re-check it with the same
    tolerances: the row becomes FAIL when every fault is caught, ERROR naming the missed ones if not."""
    tolerance = max(row.agreement.tolerances.values(), default=0.0) or ERROR_FLOOR[torch.float32]
    caught, missed = [], []
    for path, tensor in output_tensors(out):
        bad = replace_at(out, path, corrupt_tensor(tensor, tolerance))
        a = spec.compare(case, impl, bad)
        a.tolerances = {k: row.agreement.tolerances.get(k, tolerance) for k in a.errors}
        _judge_agreement(a)
        where = "output" + "".join(f"[{k!r}]" for k in path) + f" ({str(tensor.dtype).replace('torch.', '')})"
        (missed if a.passed else caught).append((where, a))
    merged = Agreement(passed=False)
    for where, a in caught:
        for k, v in a.errors.items():
            merged.errors[k] = max(merged.errors.get(k, 0.0), v)
            merged.tolerances[k] = a.tolerances[k]
        for k, (w, t) in a.mismatches.items():
            if w or k not in merged.mismatches:
                merged.mismatches[k] = (w, t)
        merged.violations.extend(v for v in a.violations if v not in merged.violations)
    row.agreement = merged
    row.status = "FAIL"
    if missed:
        row.status = "ERROR"
        row.why = "injected fault NOT caught by the check in " + ", ".join(w for w, _ in missed)


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
            a.tolerances = {k: max(TOLERANCE_FACTOR * base_err.get(k, 0.0), floor) for k in a.errors}
            _judge(r)


def _judge_agreement(a: Agreement) -> None:
    """passed when every error is within its tolerance, integer outputs match and no invariant broke."""
    ok = all(a.errors[k] <= a.tolerances[k] for k in a.errors)
    a.passed = ok and all(w == 0 for w, _ in a.mismatches.values()) and not a.violations


def _judge(r: Row) -> None:
    _judge_agreement(r.agreement)
    r.status = "PASS" if r.agreement.passed else "FAIL"


def speedup(baseline_ms: float, ms: float) -> float | None:
    """How many times faster than the baseline: baseline median / this median (None for a zero time)."""
    return baseline_ms / ms if ms > 0 else None


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
    """Check every implementation against the oracle, then time the ones that agree (on a CUDA
    device, with that device current, so cuda:1 runs and is timed on cuda:1)."""
    if setup.device.type == "cuda":
        with torch.cuda.device(setup.device):
            return _run_pair(spec, impls, problem, setup, settings)
    return _run_pair(spec, impls, problem, setup, settings)


def _run_pair(spec: PairSpec, impls: Sequence[Impl], problem: Problem, setup: Setup,
              settings: Settings | None) -> PairResult:
    settings = settings or Settings()
    reps, warmup = settings.resolved(setup.device)
    step = settings.on_step or (lambda _msg: None)
    fault = fault_target(settings)
    torch.manual_seed(settings.seed)
    case = spec.make_case(problem, setup, settings.seed)

    rows: list[Row] = []
    fns: dict[str, Callable[[], Any]] = {}
    faulty: dict[str, Any] = {}  # row name -> its correct output, to corrupt (testing only)
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
            fn = impl.build(case)  # raises UnsupportedProblem outside the row's documented limits
        except UnsupportedProblem as exc:
            row.why = f"does not cover this problem: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - a row that cannot even be set up is a failing row
            row.status, row.why = "ERROR", f"{type(exc).__name__}: {exc}"
            continue
        try:
            out = fn()
            row.agreement = spec.compare(case, impl, out)
            row.status = "checked"
            fns[impl.name] = fn
            if fault and fault in impl.name:
                faulty[impl.name] = out
        except Exception as exc:  # noqa: BLE001 - an implementation that raises on a problem it covers fails
            row.status = "ERROR"
            row.why = f"{type(exc).__name__}: {exc}"
            continue
        try:
            row.cost = spec.cost(case, impl, out)
        except Exception as exc:  # noqa: BLE001 - a cost model gap must not hide the row
            row.why = f"cost model: {type(exc).__name__}: {exc}"
    _decide(rows, setup.dtype)
    for row, impl in zip(rows, impls):
        if impl.name in faulty and row.status == "PASS":
            _inject_faults(spec, case, impl, row, faulty[impl.name])

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
        if base is not None and r.timing:
            r.speedup = speedup(base.timing["median_ms"], r.timing["median_ms"])
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
