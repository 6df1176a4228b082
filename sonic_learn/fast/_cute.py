"""Shared plumbing for the CuTe-DSL kernels: import, target architecture, availability.

Why this module exists: CuTe-DSL reads the target GPU architecture **once**, when ``cutlass`` is
first imported. On a machine without a GPU it then silently targets sm_100a, and simple kernels
compile for the wrong chip without any warning. So every kernel module imports cutlass through
``import_cutlass()``, which pins ``CUTE_DSL_ARCH=sm_90a`` (Hopper) first unless the user chose.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

HOPPER_ARCH = "sm_90a"


@functools.lru_cache(maxsize=None)
def import_cutlass():
    """Import and return the ``cutlass`` module with the target arch pinned to sm_90a.

    Raises ImportError with an install hint when nvidia-cutlass-dsl is missing.
    """
    if importlib.util.find_spec("cutlass") is None:
        raise ImportError(
            "the fast path needs CuTe-DSL: pip install 'sonic_learn[gpu]' (nvidia-cutlass-dsl==4.8.1)"
        )
    os.environ.setdefault("CUTE_DSL_ARCH", HOPPER_ARCH)
    import cutlass  # noqa: PLC0415  (imported late on purpose: the arch must be pinned first)

    return cutlass


def cutlass_available() -> tuple[bool, str]:
    """Return (True, version) when CuTe-DSL imports, else (False, why)."""
    try:
        cutlass = import_cutlass()
    except ImportError as exc:  # pragma: no cover - depends on the machine
        return False, str(exc)
    return True, f"nvidia-cutlass-dsl {cutlass.__version__}"


def hopper_available() -> tuple[bool, str]:
    """Return (True, device name) when the current CUDA device is a Hopper GPU (sm_90), else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) != (9, 0):
        return False, f"{name} is sm_{major}{minor}, the kernels target Hopper (sm_90a)"
    return True, name


def fast_available() -> tuple[bool, str]:
    """Can the fast kernels *run* here? (CuTe-DSL importable and a Hopper GPU present.)"""
    ok, why = cutlass_available()
    if not ok:
        return False, why
    return hopper_available()


def launch(compiled, device: torch.device, *args) -> None:
    """Call a TVM-FFI compiled kernel on ``device``. TVM-FFI launches on the current torch stream of
    the *current* CUDA device, so inputs living on another GPU need that device made current for the
    call (skipped in the usual case, where it would only cost host time)."""
    if device.index is None or device.index == torch.cuda.current_device():
        compiled(*args)
    else:
        with torch.cuda.device(device):
            compiled(*args)


def cutlass_dtype(dtype: torch.dtype):
    """The CuTe-DSL numeric type of a torch float dtype (bfloat16, float16 or float32)."""
    cutlass = import_cutlass()
    types = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16, torch.float32: cutlass.Float32}
    if dtype not in types:
        raise ValueError(f"dtype must be one of {tuple(types)} for the CuTe-DSL kernels, got {dtype}")
    return types[dtype]


_COMPILED: dict[tuple, object] = {}


def compiled(compile_fn, *args, **kwargs):
    """``compile_fn(*args, **kwargs)``, compiled once per process and then reused: the one compile
    cache of the fast path.

    Every kernel module has a ``compile_*`` function that builds its kernel from fake tensors (no
    GPU needed, never cached: tests and benchmarks call it for PTX or variants) and launches through
    ``launch(compiled(compile_fn, *variant), ...)``, so the first call of a variant compiles (seconds)
    and every later one is a dictionary lookup. The arguments must be hashable: the variant's
    compile-time parameters (dtypes, sizes, flags), never tensors.
    """
    key = (compile_fn, args, tuple(sorted(kwargs.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = compile_fn(*args, **kwargs)
    return fn


def compiled_variants() -> list[tuple]:
    """The (compile function name, args, kwargs) of every variant compiled so far in this process."""
    return [(f.__qualname__, args, dict(kwargs)) for f, args, kwargs in _COMPILED]


def compile_options(keep_ptx: bool = False, extra: str = "") -> str:
    """Options for ``cute.compile``: TVM-FFI launch (microseconds of host time per call) and, with
    ``keep_ptx``, the PTX kept for inspection (``compiled.__ptx__``), its files written to a
    temporary folder rather than the working directory."""
    opts = "--enable-tvm-ffi"
    if keep_ptx:
        import tempfile

        opts += f" --keep-ptx --dump-dir={tempfile.mkdtemp(prefix='sonic_learn_ptx_')}"
    return f"{opts} {extra}".strip()
