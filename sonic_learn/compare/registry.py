"""What a row of a comparison table is, and whether it can run here.

An ``Impl`` is one row: a name (``"reference bitonic"``), a kind (the ``baseline`` a user would
otherwise pick, further ``torch`` yardsticks, the readable ``reference``, the ``fast`` CuTe-DSL
kernel, or the ``upstream`` sonic-moe package), the algorithm of the pair it implements, a typed
``spec`` (a small frozen dataclass of its pair: which function, which mode) that the pair's
agreement check and cost model read, an availability check returning ``(ok, why)``, and a
``build(case)`` that returns a zero-argument callable to time.

The pairs (``sonic_learn.compare.pairs``) import the implementations directly. Rows that cannot run
on this machine (no CUDA, no CuTe-DSL, not Hopper) are listed as ``n/a`` with the reason. A row whose
implementation does not cover a problem (a kernel's documented size limits) raises
``UnsupportedProblem`` from its ``build``: that too is ``n/a``, with the reason. Any other error is a
failing row. ``python -m sonic_learn.compare list`` prints every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("baseline", "torch", "reference", "fast", "upstream")
# "baseline": THE row every speed-up is relative to (one per pair); "torch": further torch rows timed
# as yardsticks (their same-dtype error also sets the tolerance of the oracle they are checked on)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class UnsupportedProblem(Exception):
    """A row's implementation does not cover this problem (outside its documented limits).

    Not a ``ValueError`` on purpose: bad input and a kernel rejecting a problem it should take are
    errors (a failing row); only a problem outside the row's stated limits makes the row ``n/a``.
    """


@dataclass(frozen=True)
class Setup:
    """Where and in which dtype a comparison runs (``device`` may be given as a string)."""

    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        device = self.device
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device (--device) must be a str or torch.device, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device (--device) must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device (--device) is cuda, but torch sees no CUDA device "
                             "(torch.cuda.is_available() is False)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device (--device) is {device}, but torch sees {torch.cuda.device_count()} CUDA "
                             "device(s)")
        if device.type == "cuda" and device.index is None:  # report the device that runs: cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype (--dtype) must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "device", device)


@dataclass(frozen=True)
class Impl:
    """One implementation = one row of a table."""

    name: str
    kind: str  # one of KINDS
    algorithm: str  # which side of the pair it implements (e.g. "radix", "bitonic"), for display
    spec: Any  # the pair's typed row spec (a frozen dataclass): what the check and the cost model read
    build: Callable[[Any], Callable[[], Any]]  # case -> zero-argument callable (the thing timed)
    available: Callable[[Setup], tuple[bool, str]] = lambda setup: (True, "")
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def rows_by_name(rows: list[Impl] | tuple[Impl, ...]) -> dict[str, Impl]:
    """``{name: row}``; two rows of one pair may not share a name."""
    out: dict[str, Impl] = {}
    for row in rows:
        if row.name in out:
            raise ValueError(f"two rows are named {row.name!r}")
        out[row.name] = row
    return out


def fast_ready(setup: Setup) -> tuple[bool, str]:
    """Can a CuTe-DSL kernel run: a CUDA device was asked for, CuTe-DSL imports and the GPU is Hopper."""
    if setup.device.type != "cuda":
        return False, f"needs a CUDA Hopper GPU (--device is {setup.device.type})"
    from sonic_learn.compare import fast_kernels  # noqa: PLC0415 - imports CuTe-DSL

    if fast_kernels.MISSING:
        return False, fast_kernels.MISSING
    from sonic_learn.fast._cute import fast_available  # noqa: PLC0415

    return fast_available()
