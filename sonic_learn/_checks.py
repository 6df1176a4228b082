"""Argument checks shared by the reference and the fast implementations.

Every public function validates its inputs *before* doing any work (and, on the fast path, before
any kernel launch). A failed check raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, device or value) whose message names the argument and says what was
expected, e.g. ``ValueError: k must satisfy 1 <= k <= 8 (the size of the last dim of x), got 9``.

These checks read only what the host knows (types, shapes, dtypes, devices, Python values). Checks
that read tensor *values* live in ``sonic_learn.contracts`` (see ``value_checks_enabled``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object) -> torch.Tensor:
    """Raise TypeError unless ``t`` is a torch.Tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_ndim(name: str, t: torch.Tensor, ndim: int | Iterable[int], what: str = "") -> None:
    """Raise ValueError unless ``t`` has ``ndim`` dims (or one of several allowed counts)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in allowed:
        want = " or ".join(str(a) for a in allowed)
        hint = f" {what}" if what else ""
        raise ValueError(f"{name} must be {want}-D{hint}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    """Raise TypeError unless ``t.dtype`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    """Raise ValueError unless ``t.shape == expected`` (``None`` entries match any size)."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        hint = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {want}{hint}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all named tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def check_cuda(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is on a CUDA device (fast kernels only)."""
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the fast (CuTe-DSL) path, got device {t.device}")


def check_bool(name: str, value: object) -> bool:
    """Raise TypeError unless ``value`` is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int_range(name: str, value: object, lo: int, hi: int | None = None, what: str = "") -> int:
    """Raise TypeError/ValueError unless ``value`` is an int with ``lo <= value <= hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo} <= {name}" + (f" <= {hi}" if hi is not None else "")
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must satisfy {rng}{hint}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Raise ValueError unless ``value`` is one of the allowed strings."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]
