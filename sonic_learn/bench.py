"""Honest timing and memory measurement, shared by the compare CLI, the tutorials and benchmarks/.

Rules this module enforces (see docs "Benchmarks"):

- warm up before timing (JIT compilation, caches, allocator);
- synchronize the device around every timed region (CUDA events on a GPU);
- on a GPU, rotate among several input sets or flush L2 so short kernels are not timed hot in cache;
- report the median with the 20th and 80th percentiles, never a single run.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


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


def _flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than the L2 cache (50 MB on H100/H200) so the next call starts cold."""
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        _L2_FLUSH[device] = buf
    buf.zero_()


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    reps: int = 20,
    min_time_s: float = 0.0,
    flush_l2: bool = True,
) -> Timing:
    """Time ``fn()`` (no arguments) and return median / p20 / p80 in milliseconds.

    On CUDA every repetition is bracketed by CUDA events (L2 flushed before each when ``flush_l2``);
    on the CPU by ``time.perf_counter``. ``min_time_s`` keeps repeating past ``reps`` until that much
    time has been measured (useful for very short CPU functions).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        total = 0.0
        while len(times) < reps or total < min_time_s * 1e3:
            if flush_l2:
                _flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            total += times[-1]
        timer = "cuda-events"
    else:
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


def environment() -> dict:
    """Device name and library versions, stamped on every benchmark record."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu: " + (platform.processor() or platform.machine()),
    }
    from sonic_learn import __version__

    info["sonic_learn"] = __version__
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import importlib.metadata as md

        info["nvidia-cutlass-dsl"] = md.version("nvidia-cutlass-dsl")
    except Exception:  # noqa: BLE001 - not installed
        info["nvidia-cutlass-dsl"] = None
    return info
