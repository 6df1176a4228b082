"""The implementations the compare tool knows about, and whether each one can run here.

An ``Impl`` is one row of a comparison table: a name (``"reference bitonic"``), a kind (the
``baseline`` a user would otherwise pick, the readable ``reference``, the ``fast`` CuTe-DSL kernel,
or the ``upstream`` sonic-moe package), the algorithm of the pair it implements, an availability
check returning ``(ok, why)``, and a ``build(case)`` that returns a zero-argument callable to time.

Rows for modules that do not exist yet, or that cannot run on this machine (no CUDA, no CuTe-DSL,
not Hopper), are listed as ``n/a`` with the reason; they appear by themselves once the module lands
and the machine qualifies. ``python -m sonic_learn.compare list`` prints this registry.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("baseline", "torch", "reference", "fast", "upstream")
# "baseline": THE row every speed-up is relative to (one per pair); "torch": further torch rows timed
# as yardsticks (their same-dtype error also sets the tolerance of the oracle they are checked on)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype (--dtype) must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "device", device)


@dataclass(frozen=True)
class Impl:
    """One implementation = one row of a table."""

    name: str
    kind: str  # one of KINDS
    algorithm: str  # which side of the pair it implements (e.g. "radix", "bitonic")
    available: Callable[[Setup], tuple[bool, str]]
    build: Callable[[Any], Callable[[], Any]]  # case -> zero-argument callable (the thing timed)
    note: str = ""


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """Import ``module``; return (module, None) or (None, reason)."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None, f"{module} is not written yet"
        return None, f"{module} failed to import: {exc}"
    except Exception as exc:  # noqa: BLE001 - any import-time failure makes the row n/a, with the reason
        return None, f"{module} failed to import: {type(exc).__name__}: {exc}"


def resolve(module: str, attr: str):
    """Return ``module.attr`` or raise LookupError with the reason it is missing."""
    mod, why = _import(module)
    if mod is None:
        raise LookupError(why)
    if not hasattr(mod, attr):
        raise LookupError(f"{module}.{attr} is not written yet")
    return getattr(mod, attr)


def has(module: str, *attrs: str) -> Callable[[Setup], tuple[bool, str]]:
    """Availability check: the module imports and defines every attribute."""

    def check(setup: Setup) -> tuple[bool, str]:
        for attr in attrs:
            try:
                resolve(module, attr)
            except LookupError as exc:
                return False, str(exc)
        return True, ""

    return check


def always(setup: Setup) -> tuple[bool, str]:
    return True, ""


def fast_has(module: str, *attrs: str) -> Callable[[Setup], tuple[bool, str]]:
    """Availability of a CuTe-DSL kernel: a CUDA device was asked for, it is Hopper with CuTe-DSL,
    and the fast module defines the functions."""

    def check(setup: Setup) -> tuple[bool, str]:
        if setup.device.type != "cuda":
            return False, f"needs a CUDA Hopper GPU (--device is {setup.device.type})"
        from sonic_learn.fast._cute import fast_available

        ok, why = fast_available()
        if not ok:
            return False, why
        return has(module, *attrs)(setup)

    return check


def upstream_available(setup: Setup) -> tuple[bool, str]:
    """The upstream sonic-moe package: importable, on a CUDA device, in bf16/fp16."""
    if setup.device.type != "cuda":
        return False, "upstream sonic-moe runs on CUDA (Hopper/Blackwell) only"
    if setup.dtype not in (torch.bfloat16, torch.float16):
        return False, "upstream sonic-moe supports bf16/fp16 only"
    mod, why = _import("sonicmoe")
    if mod is None:
        return False, "sonicmoe is not installed" if "not written" in (why or "") else why
    if not hasattr(mod, "moe_TC_softmax_topk_layer"):
        return False, "sonicmoe has no moe_TC_softmax_topk_layer (unknown version)"
    return True, ""


# The registry itself is filled by sonic_learn.compare.pairs (one list of Impl per pair).
REGISTRY: dict[str, list[Impl]] = {}


def register(pair: str, impl: Impl) -> Impl:
    if impl.kind not in KINDS:
        raise ValueError(f"impl.kind must be one of {KINDS}, got {impl.kind!r}")
    rows = REGISTRY.setdefault(pair, [])
    if any(r.name == impl.name for r in rows):
        raise ValueError(f"implementation {impl.name!r} is already registered for pair {pair!r}")
    rows.append(impl)
    return impl
