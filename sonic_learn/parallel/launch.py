"""Start W processes on this machine, each a rank of one process group, and run a function in each.

``torchrun`` does this for real jobs (one process per GPU). ``launch`` is the small version the
tests, the tutorial and ``python -m sonic_learn.parallel`` use on a CPU: gloo, a rendezvous file in
a temporary folder (no port to pick), and a time limit so that a hang fails instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch"]


def _entry(rank: int, fn, world_size: int, init_file: str, backend: str, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # W processes share the cores
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _caller_script_not_rerun():
    """Spawned processes re-run the caller's script (``__main__``) before they start, so a script or
    a tutorial that calls ``launch`` at top level would launch again in every rank. The ranks need only
    ``fn``'s own module: hide ``__main__``'s path while they start."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if main is None or path is None or spec is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def launch(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes of one gloo group and
    return their results in rank order. ``fn`` must be importable (a module-level function) and its
    result picklable (a function of the caller's script cannot be: see ``_caller_script_not_rerun``).
    Raises the first rank's exception, or TimeoutError after ``timeout_s``."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory() as tmp, _caller_script_not_rerun():
        manager = mp.get_context("spawn").Manager()
        try:
            results = manager.dict()
            ctx = mp.start_processes(_entry, args=(fn, world_size, os.path.join(tmp, "rendezvous"), backend, args,
                                                   results),
                                     nprocs=world_size, join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"launch: {world_size} ranks of {getattr(fn, '__name__', fn)} did not finish "
                                       f"in {timeout_s:.0f} s (a collective that not every rank reached?)")
            return [results[r] for r in range(world_size)]
        finally:
            manager.shutdown()
