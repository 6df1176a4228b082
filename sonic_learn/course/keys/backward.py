"""Key for assignment 4: the reduced-memory backward pieces of ``sonic_learn.reference.moe``, by name.

``reduced_memory_backward`` runs ``ReducedMemoryExperts.backward`` on the tensors its forward caches,
``saved_bytes`` sums ``expected_saved_bytes``; ``dh_epilogue`` and ``swiglu_backward`` are the reference's.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sonic_learn import _checks
from sonic_learn.reference.moe import (
    BACKWARD_MODES,
    ReducedMemoryExperts,
    dh_epilogue,
    expected_saved_bytes,
    swiglu_backward,
)

__all__ = ["dh_epilogue", "reduced_memory_backward", "saved_bytes", "swiglu_backward"]

_DTYPE_OF_BYTES = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def reduced_memory_backward(dout, x, w1, w2, h, scores, meta, tile_m):
    """Run ``ReducedMemoryExperts.backward`` on exactly what its forward saves."""
    ctx = SimpleNamespace(
        saved_tensors=(x, w1, w2, h, scores, meta.expert_offsets, meta.gather_idx, meta.pair_of_row), tile_m=tile_m
    )
    dx, dw1, dw2, dscores, _, _ = ReducedMemoryExperts.backward(ctx, dout)
    return dx, dw1, dw2, dscores


def saved_bytes(T: int, d: int, n: int, E: int, P: int, *, dtype_bytes: int = 2, backward: str = "reduced_memory") -> int:
    """Total of ``expected_saved_bytes`` (activations in a ``dtype_bytes``-byte dtype)."""
    for name, value, lo in (("T", T, 0), ("d", d, 1), ("n", n, 1), ("E", E, 1), ("P", P, 0)):
        _checks.check_int_range(name, value, lo)
    _checks.check_int_range("dtype_bytes", dtype_bytes, 1, 8, what="bytes per element")
    _checks.check_choice("dtype_bytes", dtype_bytes, tuple(_DTYPE_OF_BYTES))
    _checks.check_choice("backward", backward, BACKWARD_MODES)
    return expected_saved_bytes(T, d, n, E, P, dtype=_DTYPE_OF_BYTES[dtype_bytes], backward=backward)["total"]
