"""Inputs and measures shared by the pairs: tie-free logits, the case bag, tile padding.

Inputs are chosen so that a comparison measures the implementations, not rounding noise: top-k
and routing logits are **tie-free** (each row a random permutation of E distinct values that the
dtype represents exactly), so every correct implementation selects the same indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sonic_learn.compare.configs import Problem
from sonic_learn.compare.registry import Setup


F64 = 8  # bytes of a float64 (the oracles)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


def _row_permutations(T: int, E: int, g: torch.Generator) -> torch.Tensor:
    return torch.argsort(torch.rand(T, E, generator=g), dim=1)  # (T, E) int64, a permutation per row


def distinct_logits(T: int, E: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(T, E) logits, every row a random permutation of E consecutive values of a 16-bit float
    format around 1.0 (bfloat16 for bf16, float16 otherwise), so the values are exact in ``dtype``
    and in float32, and no row has a tie: every implementation sees the same values, and the
    selected experts are unique whatever an implementation's tie rule."""
    perm = _row_permutations(T, E, g)  # (T, E)
    if dtype == torch.bfloat16:
        base, limit, fmt = 0x3F80, 0x7F7F, torch.bfloat16  # bf16 bits of 1.0, largest finite
    else:
        base, limit, fmt = 0x3C00, 0x7BFF, torch.float16  # fp16 bits of 1.0, largest finite
    lo = base - E // 2
    if lo < 1 or lo + E - 1 > limit:
        raise ValueError(f"E must be at most {2 * (limit - base)} for tie-free {fmt} logits, got {E}")
    bits = (lo + perm).to(torch.int16)  # (T, E) positive floats' bits: order of bits = order of values
    return bits.view(fmt).to(dtype)  # (T, E)


def spread_logits(T: int, E: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """(T, E) tie-free router logits in about [-4, 4]: each row a permutation of (j - E/2) * delta
    with delta a power of two (exact in float32/float64)."""
    perm = _row_permutations(T, E, g)  # (T, E)
    delta = 2.0 ** math.floor(math.log2(8.0 / E))
    return ((perm - E // 2).to(torch.float64) * delta).to(dtype)  # (T, E)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router's score dtype for a run in ``dtype``: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def padded_rows(counts: torch.Tensor, tile_m: int) -> int:
    """Rows of a tiled grouped GEMM: every expert's f_e rows padded up to a multiple of ``tile_m``."""
    return int((-(-counts.long() // tile_m) * tile_m).sum())  # sum_e ceil(f_e / tile_m) * tile_m


@dataclass
class Case:
    """Inputs and oracle outputs of one pair on one problem (a plain bag of tensors)."""

    problem: Problem
    setup: Setup
    data: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getattr__(self, name):
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None
