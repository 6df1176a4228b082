"""Honest timing and memory measurement, shared by the compare CLI, the tutorials and benchmarks/.

Rules this module enforces (see docs "Benchmarks"):

- warm up before timing (JIT compilation, caches, allocator);
- synchronize the device around every timed region (CUDA events on a GPU);
- on a GPU, rotate among several input sets or flush L2 so short kernels are not timed hot in cache;
- on a GPU, time the device work, not the host's issue of it: before each timed call the GPU is
  kept busy (a sleep kernel longer than the call's host time), so every kernel of the call is
  queued before the start event is reached -- as in training, where the host runs ahead. The
  host cost of a call is reported separately (``host_time_us``);
- report the median with the 20th and 80th percentiles, never a single run.

Benchmark scripts also share ``host_time_us`` (the host cost of issuing one call, no sync per
call), ``kernel_us`` / ``kernel_breakdown`` (a call's device time, kernel by kernel, from the torch
profiler), ``environment()`` (stamped on every record) and ``write_record`` (the JSON file, named by
benchmark and device).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from sonic_learn import _checks


@dataclass(frozen=True)
class Timing:
    """Time of one implementation, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str  # "cuda-events" or "perf_counter"

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable taking no arguments, got {type(fn).__name__}")


def _flush_l2(device: torch.device) -> None:
    """Read a buffer larger than the L2 cache (50 MB on H100/H200) so the next call starts cold.

    A read, not a write: writing the buffer would leave the L2 full of dirty lines that the timed
    call then has to write back to DRAM (measured on H200: a plain 88 MB copy reached only 85% of
    its bandwidth after a write flush)."""
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = torch.zeros(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        _L2_FLUSH[device] = buf
    torch.amax(buf)


_SLEEP_CYCLES_PER_US: dict[torch.device, float] = {}


def _sleep_cycles_per_us(device: torch.device) -> float:
    """Clock cycles of ``torch.cuda._sleep`` per microsecond on ``device`` (measured once)."""
    if device not in _SLEEP_CYCLES_PER_US:
        with torch.cuda.device(device):
            cycles = 2_000_000
            torch.cuda._sleep(cycles)  # warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            _SLEEP_CYCLES_PER_US[device] = cycles / max(start.elapsed_time(end) * 1e3, 1.0)
    return _SLEEP_CYCLES_PER_US[device]


def _hold_device(device: torch.device, host_us: float) -> None:
    """Queue a sleep kernel that outlasts ``host_us`` of host work (capped at 50 ms), so that the
    GPU reaches the next start event only after the host has issued the whole timed call."""
    us = min(1.5 * host_us + 30.0, 50_000.0)
    with torch.cuda.device(device):
        torch.cuda._sleep(int(us * _sleep_cycles_per_us(device)))


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    reps: int = 20,
    min_time_s: float = 0.0,
    flush_l2: bool = True,
    host_ahead: bool = True,
) -> Timing:
    """Time ``fn()`` (no arguments) and return median / p20 / p80 in milliseconds.

    On CUDA every repetition is bracketed by CUDA events (L2 flushed by a read before each when
    ``flush_l2``); with ``host_ahead`` the device is held by a sleep kernel longer than ``fn``'s
    host time (measured in the warm-up) before the start event, so the events time the device work
    only, however long the host takes to issue it (``host_ahead=False``: a call whose host issue
    outlasts the flush is timed with its host gaps). On the CPU ``time.perf_counter``.
    ``min_time_s`` keeps repeating past ``reps`` until that much time has been measured (useful for
    very short CPU functions).
    """
    _check_callable("fn", fn)
    _checks.check_int_range("warmup", warmup, 0)
    _checks.check_int_range("reps", reps, 1)
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)):
        raise TypeError(f"min_time_s must be a number of seconds, got {type(min_time_s).__name__}")
    if not min_time_s >= 0:  # also rejects NaN
        raise ValueError(f"min_time_s must be >= 0 seconds, got {min_time_s!r}")
    device = torch.device(device)
    _checks.check_bool("host_ahead", host_ahead)
    host_us = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        host_us.append((time.perf_counter() - t0) * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.synchronize(device)
        # the host time of one call: the fastest warm-up after the first (which may compile)
        issue_us = min(host_us[1:] or host_us or [1000.0])
        with torch.cuda.device(device):  # events and work on the timed device's current stream, not cuda:0's
            total = 0.0
            while len(times) < reps or total < min_time_s * 1e3:
                if flush_l2:
                    _flush_l2(device)
                if host_ahead:
                    _hold_device(device, issue_us)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
                total += times[-1]
        timer = "cuda-events"
    else:  # TIMER_CPU
        total = 0.0
        while len(times) < reps or total < min_time_s * 1e3:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            total += times[-1]
        timer = "perf_counter"
    times.sort()
    return Timing(
        median_ms=statistics.median(times),
        p20_ms=_quantile(times, 0.2),
        p80_ms=_quantile(times, 0.8),
        reps=len(times),
        timer=timer,
    )


def host_time_us(fn: Callable[[], object], *, calls: int = 1000, warmup: int = 20) -> float:
    """Host time of one ``fn()`` call in microseconds, with no device sync between calls.

    What the CPU spends issuing the call (argument checks, allocation, kernel launch); the device
    is synchronized before and after the timed loop, outside it. Not the kernel time: use
    ``measure`` for that.
    """
    _check_callable("fn", fn)
    _checks.check_int_range("calls", calls, 1)
    _checks.check_int_range("warmup", warmup, 0)
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def _profile(fn: Callable[[], object], calls: int, device: torch.device):
    """The torch profiler's per-name averages over ``calls`` calls of ``fn`` (after two warm-up
    calls): CUDA kernels on a CUDA device, ATen ops on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    return [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total, e.count)
            for e in prof.key_averages()]


def kernel_us(fn: Callable[[], object], *, calls: int = 10, device: torch.device | str = "cuda") -> float:
    """Device time of one ``fn()`` call in microseconds: the sum of its kernels' own time (torch
    profiler), i.e. what the call costs the GPU when the host runs ahead, as inside a layer.
    Gaps between kernels are not counted (``measure`` times the wall of the device work)."""
    _check_callable("fn", fn)
    _checks.check_int_range("calls", calls, 1)
    return sum(us for _, us, _ in _profile(fn, calls, torch.device(device))) / calls


def kernel_breakdown(fn: Callable[[], object], *, calls: int = 10, top: int = 14,
                     device: torch.device | str = "cuda") -> list[dict]:
    """Where one ``fn()`` call spends its device time, kernel by kernel (torch profiler): the
    ``top`` largest, each ``{"kernel": name (first 90 characters), "us_per_call",
    "launches_per_call"}``, largest first. On a CUDA device: the CUDA kernels' own time; on the
    CPU (the tests): the ATen ops' self CPU time."""
    _check_callable("fn", fn)
    _checks.check_int_range("calls", calls, 1)
    _checks.check_int_range("top", top, 1)
    rows = sorted((r for r in _profile(fn, calls, torch.device(device)) if r[1] > 0), key=lambda r: -r[1])
    return [{"kernel": name[:90], "us_per_call": us / calls, "launches_per_call": count / calls}
            for name, us, count in rows[:top]]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated *above what was allocated before* ``fn()`` ran (None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy rate in GB/s (bytes read + bytes written), the memory ceiling."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, warmup=3, reps=20, flush_l2=False)
    return 2 * src.numel() / (t.median_ms * 1e-3) / 1e9


TIMER_CUDA = "cuda-events around the device work (host held ahead by a sleep kernel), L2 read-flushed"
TIMER_CPU = "time.perf_counter around each call (CPU)"


def environment(device: torch.device | str | None = None) -> dict:
    """Device name, how ``measure`` times on it, and library versions, stamped on every record.

    ``device`` is where the timed work runs (default: the current CUDA device when there is one,
    else the CPU); a CUDA device is named by its own index (``cuda:1`` is not described as ``cuda:0``).
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu: " + (platform.processor() or platform.machine()),
    }
    from sonic_learn import __version__

    info["sonic_learn"] = __version__
    # how bench.measure times on this device (see its docstring); records without this key used the
    # older harness: a 256 MB *write* flush and no sleep kernel holding the GPU before the start event
    info["timer"] = TIMER_CPU
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["timer"] = TIMER_CUDA
    try:
        import importlib.metadata as md

        info["nvidia-cutlass-dsl"] = md.version("nvidia-cutlass-dsl")
    except Exception:  # noqa: BLE001 - not installed
        info["nvidia-cutlass-dsl"] = None
    return info


def write_record(record: dict, out_dir: str, name: str) -> str:
    """Write a benchmark record as ``out_dir/<name>_<device>.json`` and return the path.

    ``<device>`` is the record's ``environment["device"]`` (else ``environment()``'s), with every
    run of characters other than letters and digits turned into ``_`` (``NVIDIA_H200``).
    """
    device = (record.get("environment") or environment())["device"]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{slug}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path


def parse_layer_shape(parser, text: str) -> tuple[int, int, int, int, int]:
    """(T, d, n, E, K) from a ``--shape`` option "T,d,n,E,K" of ``parser`` (an argparse parser, whose
    ``error`` exits naming the option)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        parser.error(f"--shape: five integers T,d,n,E,K expected, got {text!r}")
    if len(shape) != 5 or min(shape) < 1:
        parser.error(f"--shape: five positive integers T,d,n,E,K expected, got {text!r}")
    return shape


def layer_inputs(shape: tuple[int, int, int, int, int], seed: int = 0, device: torch.device | str = "cuda"):
    """The MoE layer's inputs for a (T, d, n, E, K) shape: x (T, d), router_w (d, E), w1 (E, d, 2n),
    w2 (E, n, d) and an output gradient (T, d), bf16, scaled like the layer's initialization, drawn
    in this order from one generator seeded with ``seed`` on ``device`` (the same tensors for every
    script that asks for the same shape, seed and device)."""
    T, d, n, E, _ = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(torch.bfloat16)

    x, router_w = randn(T, d), randn(d, E, scale=d**-0.5)
    w1, w2, dout = randn(E, d, 2 * n, scale=d**-0.5), randn(E, n, d, scale=n**-0.5), randn(T, d)
    return x, router_w, w1, w2, dout
