"""Assignment 3: grouped GEMM, naive (gather + pad) vs gather-fused, and the IO cost model.

Fill in the three functions below. The page docs/course/grouped-gemm.md has the problem statement and hints.
Grade yourself with:  python -m sonic_learn.course grade grouped_gemm <this folder>

Notation: a GEMM is (M, K) @ (K, N) -> (M, N); here K is the reduction dim. Expert e owns the
grouped rows ``meta.expert_offsets[e] : meta.expert_offsets[e + 1]`` (f_e rows) and row r reads
token ``meta.gather_idx[r]`` of x. tile_m = rows per GEMM tile.
"""

from __future__ import annotations

import torch

from sonic_learn import _checks  # check_tensor, check_ndim, check_dtype, check_int_range, check_choice, ...
from sonic_learn.reference.grouped_gemm import GemmCost, KernelIO  # the result types of io_cost
from sonic_learn.reference.routing import RoutingMetadata  # from sonic_learn.reference.routing.build_metadata


def naive_grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int = 128, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The classic grouped GEMM: gather + pad into a new buffer, one GEMM per expert, drop the padding.

    1. gather: ``x_g = x[gather_idx]`` (M, K), a new tensor;
    2. pad: copy expert e's f_e rows into a zero buffer whose block for e has ceil(f_e / tile_m) * tile_m rows;
    3. one GEMM per expert with a non-empty block, accumulated in float32 (float64 for float64 inputs),
       rounded to ``out_dtype`` (default x.dtype); 4. drop the padding rows.

    Args:
        x: (T, K) float; w: (E, K, N) of x's dtype; meta: RoutingMetadata with num_tokens = T, num_experts = E.
    Returns:
        y (M, N), M = meta.num_rows: ``y[r] = x[gather_idx[r]] @ w[e]`` for the expert e that owns row r.
    Raises:
        TypeError/ValueError naming the argument: x not 2-D, w not (E, K, N) with x's K, dtypes differ,
        meta not a RoutingMetadata or inconsistent with x/w, tile_m < 1, out_dtype not a float dtype.
    """
    raise NotImplementedError("naive_grouped_gemm: about 25 lines (checks, gather, pad, per-expert GEMM, unpad)")


def gather_fused_grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, meta: RoutingMetadata, *, tile_m: int = 128, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """SonicMoE's grouped GEMM: every (expert, m-tile) loads its own rows from x through gather_idx.

    Walk the tiles like a varlen-M tile scheduler: for each expert e, for m0 in 0, tile_m, 2 tile_m,
    ... < f_e, the tile covers grouped rows offsets[e] + m0 up to (not including)
    offsets[e] + min(m0 + tile_m, f_e): the last tile of an expert is MASKED (shorter), never padded.
    Load the tile's rows as ``x[gather_idx[rows]]`` (at most tile_m rows: never build the whole
    gathered (M, K) copy), multiply by w[e] with float32 accumulation, store into y[rows].

    Same arguments, result and errors as naive_grouped_gemm.
    """
    raise NotImplementedError("gather_fused_grouped_gemm: about 15 lines (checks, the tile loop, masked last tile)")


def io_cost(
    T: int,
    K: int,
    N: int,
    counts: torch.Tensor | list[int] | tuple[int, ...],
    *,
    tile_m: int = 128,
    dtype_bytes: int = 2,
    variant: str = "naive",
) -> GemmCost:
    """First-order HBM bytes and FLOPs of a varlen-M grouped GEMM, x (T, K) gathered, w (E, K, N).

    M = sum f_e, M_pad = sum ceil(f_e / tile_m) * tile_m, E_act = #experts with f_e > 0,
    b = dtype_bytes, weights = E_act * K * N * b. Every operand byte crosses HBM once per kernel.

    - ``"naive"``: kernel "gather+pad" reads M*K*b, writes M_pad*K*b; kernel "grouped GEMM" reads
      M_pad*K*b + weights, writes M_pad*N*b.
    - ``"gather_fused"``: one kernel reads M*K*b + weights, writes M*N*b.

    FLOPs (both variants): flops_useful = 2*M*K*N, flops_padded = 2*(M_pad - M)*K*N (the masked last
    tile still runs full MMA instructions). Also: source_bytes = T*K*b, rows = M, padded_rows = M_pad,
    bytes_read / bytes_written = sums over the kernels (``KernelIO(name, bytes_read, bytes_written)``).

    Args:
        counts: (E,) ints (tensor, list or tuple), E >= 1, each in [0, T].
    Raises:
        TypeError/ValueError naming the argument: bad T, K, N, tile_m, dtype_bytes, counts or variant.
    """
    raise NotImplementedError("io_cost: about 25 lines (checks, M, M_pad, E_act, the two variants)")
