"""Grouped GEMM: every expert multiplies its own rows by its own weight matrix.

Pair 3 of SonicMoE (paper v1: the kernel list of Section 3.1 / Algorithms 2, 3 and 5; gather fusion
in the IO-aware kernel design of Section 4.1; Appendix B for the IO of other MoE implementations).
After routing, expert e owns ``f_e`` rows of the grouped GEMM, and row r must load
token ``gather_idx[r]`` of ``x``. There are two ways to feed those rows to a tile-based GEMM:

1. **naive** (``naive_grouped_gemm``), the way MegaBlocks-style or DeepGEMM-style pipelines do it:
   a separate *gather* kernel copies the rows into a new (M, K) buffer, padded so that every
   expert's block is a multiple of the M tile; then the GEMM reads that buffer back. The gathered
   copy costs one extra write and one extra read of about M*K elements, and the padding rows cost
   memory traffic and tensor-core work.
2. **gather-fused** (``gather_fused_grouped_gemm``), SonicMoE's way: the GEMM's tile scheduler walks
   the (expert, m-tile) grid, and each tile loads its rows *straight from x* through ``gather_idx``
   (``cp.async`` on Hopper, because a TMA descriptor cannot express an arbitrary row gather). The
   last tile of an expert is *masked*, not padded: no gathered copy, no padding bytes.

``grouped_gemm_varlen_k`` is the weight-gradient form (the dW1 and dW2 kernels of Section 3.1): the
tokens are the *reduction* dim, so each expert's reduction length varies ("varlen-K"), and the
gather happens along that reduction dim.

``io_cost`` and ``varlen_k_cost`` are a first-order cost model (bytes and FLOPs) of both variants,
so the difference can be shown without a GPU.

Naming in this file: a GEMM is (M, K) @ (K, N) -> (M, N). Here K is the GEMM's *reduction* dim (d
for the up-projection, n for the down-projection), not the paper's top-K; M = sum_e f_e is the
number of grouped rows (T*K for token-choice top-K routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sonic_learn import _checks, contracts
from sonic_learn.contracts import MAX_TILE_M, RoutingMetadata

__all__ = [
    "GemmCost",
    "KernelIO",
    "gather_fused_grouped_gemm",
    "grouped_gemm_varlen_k",
    "io_cost",
    "gather_fusion_savings",
    "naive_grouped_gemm",
    "varlen_k_cost",
]


# --------------------------------------------------------------------------------------------------
# Shared helpers: argument checks and the accumulation dtype
# --------------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor-core GEMM accumulates in: float32 for 16/32-bit inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_out_dtype(out_dtype: object, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be None or a torch.dtype, got {type(out_dtype).__name__}")
    if out_dtype not in _checks.FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _checks.FLOAT_DTYPES)
        raise TypeError(f"out_dtype must be one of ({names}), got {str(out_dtype).replace('torch.', '')}")
    return out_dtype


def _check_gemm_args(x: object, w: object, meta: object, tile_m: object, out_dtype: object,
                     transpose_w: object) -> torch.dtype:
    """Validate the arguments of the two varlen-M grouped GEMMs (``w`` as the caller stored it);
    return the output dtype."""
    _checks.check_bool("transpose_w", transpose_w)
    layout = "(E, N, K)" if transpose_w else "(E, K, N)"
    _checks.check_tensor("x", x)
    _checks.check_tensor("w", w)
    _checks.check_ndim("x", x, 2, "(T, K): one row per token")
    _checks.check_ndim("w", w, 3, f"{layout}: one matrix per expert")
    _checks.check_dtype("x", x, _checks.FLOAT_DTYPES)
    _checks.check_dtype("w", w, _checks.FLOAT_DTYPES)
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must have the same dtype, got x {x.dtype} and w {w.dtype}")
    k_axis = 2 if transpose_w else 1
    if w.shape[k_axis] != x.shape[1]:
        raise ValueError(
            f"w must have shape {layout} with K = {x.shape[1]} (x.shape[1]) in dim {k_axis}"
            f"{' (transpose_w=True)' if transpose_w else ''}, got {tuple(w.shape)}"
        )
    _checks.check_same_device(x=x, w=w)
    _checks.check_int_range("tile_m", tile_m, 1, MAX_TILE_M, "rows per GEMM tile")
    contracts.check_metadata(meta, "x", x, num_tokens=x.shape[0], num_experts=w.shape[0])
    return _check_out_dtype(out_dtype, x.dtype)


# --------------------------------------------------------------------------------------------------
# The classic way: gather into a padded buffer, then one GEMM per expert
# --------------------------------------------------------------------------------------------------


def naive_grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    meta: RoutingMetadata,
    *,
    tile_m: int = 128,
    out_dtype: torch.dtype | None = None,
    transpose_w: bool = False,
) -> torch.Tensor:
    """Grouped GEMM the classic way: gather + pad (a copy), one GEMM per expert, drop the padding.

    Args:
        x: (T, K) token rows (K = the GEMM's reduction dim, e.g. d).
        w: (E, K, N) one weight matrix per expert, paper orientation (``x_e @ w[e]``).
        meta: routing metadata from ``build_metadata`` (counts, offsets, ``gather_idx``).
        tile_m: rows per GEMM tile; every expert's block is padded to a multiple of it.
        out_dtype: dtype of the result (default ``x.dtype``). Products are accumulated in float32
            (float64 for float64 inputs), as a tensor-core GEMM does.
        transpose_w: ``w`` is stored (E, N, K) and row r is multiplied by ``w[e]^T`` (the backward's
            dY @ W2^T and dH @ W1^T, with no transposed copy of the weights).

    Returns:
        (M, N) with M = ``meta.num_rows``: row r is ``x[gather_idx[r]] @ w[e]`` for the expert e
        that owns row r, in expert-grouped row order.
    """
    out_dtype = _check_gemm_args(x, w, meta, tile_m, out_dtype, transpose_w)
    if transpose_w:
        w = w.transpose(1, 2)  # stored (E, N, K): used as w[e]^T, an (E, K, N) view, no copy
    # --8<-- [start:naive_grouped_gemm]
    E, K, N = w.shape
    acc_dtype = _accumulation_dtype(x.dtype)
    counts = meta.expert_counts.tolist()  # f_e, as Python ints (E,)
    offsets = meta.expert_offsets.tolist()  # (E+1,)
    gather_idx = meta.gather_idx.long()  # (M,)

    # Step 1a: gather. A separate kernel copies every routed row into a new buffer: the source x is
    # read once per (token, expert) pair and a brand-new (M, K) tensor is written.
    x_gathered = x[gather_idx]  # (M, K)

    # Step 1b: pad. A tile-based GEMM processes whole tiles of tile_m rows, so every expert's block
    # is rounded up to a multiple of tile_m. The padding rows are zeros: real memory, real traffic,
    # and (in Step 2) real tensor-core work whose results are thrown away.
    padded_counts = [-(-f // tile_m) * tile_m for f in counts]  # ceil(f_e / tile_m) * tile_m
    padded_offsets = [0]
    for f_pad in padded_counts:
        padded_offsets.append(padded_offsets[-1] + f_pad)
    M_pad = padded_offsets[-1]
    x_padded = torch.zeros(M_pad, K, dtype=x.dtype, device=x.device)  # (M_pad, K)
    for e in range(E):
        x_padded[padded_offsets[e] : padded_offsets[e] + counts[e]] = x_gathered[offsets[e] : offsets[e + 1]]

    # Step 2: one dense GEMM per expert on its padded block, accumulated in fp32 (fp64 for fp64),
    # then rounded to the output dtype when stored (the GEMM's epilogue).
    y_padded = torch.empty(M_pad, N, dtype=out_dtype, device=x.device)  # (M_pad, N)
    for e in range(E):
        block = slice(padded_offsets[e], padded_offsets[e + 1])
        if padded_counts[e] == 0:
            continue  # an expert with no rows launches no tiles
        y_padded[block] = (x_padded[block].to(acc_dtype) @ w[e].to(acc_dtype)).to(out_dtype)

    # Step 3: drop the padding rows, back to M rows in expert-grouped order.
    y = torch.empty(len(gather_idx), N, dtype=out_dtype, device=x.device)  # (M, N)
    for e in range(E):
        y[offsets[e] : offsets[e + 1]] = y_padded[padded_offsets[e] : padded_offsets[e] + counts[e]]
    return y
    # --8<-- [end:naive_grouped_gemm]


# --------------------------------------------------------------------------------------------------
# SonicMoE's way: each tile gathers its own rows from x; the last tile of an expert is masked
# --------------------------------------------------------------------------------------------------


def gather_fused_grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    meta: RoutingMetadata,
    *,
    tile_m: int = 128,
    out_dtype: torch.dtype | None = None,
    transpose_w: bool = False,
) -> torch.Tensor:
    """Grouped GEMM with the gather fused into the tile loads (SonicMoE, paper Section 4.1).

    Walks the (expert, m-tile) grid in the order a varlen-M tile scheduler does. Each tile reads its
    row indices from ``gather_idx`` and loads those rows directly from ``x``; the gathered (M, K)
    copy is never built. The last tile of an expert is shorter (masked), never padded.

    Same arguments, result and accumulation rule as ``naive_grouped_gemm``.
    """
    out_dtype = _check_gemm_args(x, w, meta, tile_m, out_dtype, transpose_w)
    if transpose_w:
        w = w.transpose(1, 2)  # stored (E, N, K): used as w[e]^T, an (E, K, N) view, no copy
    # --8<-- [start:gather_fused_grouped_gemm]
    E, K, N = w.shape
    acc_dtype = _accumulation_dtype(x.dtype)
    counts = meta.expert_counts.tolist()  # f_e (E,)
    offsets = meta.expert_offsets.tolist()  # (E+1,)
    gather_idx = meta.gather_idx.long()  # (M,)
    y = torch.empty(len(gather_idx), N, dtype=out_dtype, device=x.device)  # (M, N)

    # The tile scheduler: expert by expert, m-tile by m-tile. On the GPU each (e, m-tile) is one CTA's
    # work item (and each also loops over the N-tiles; here one tile spans all N columns).
    for e in range(E):
        w_e = w[e].to(acc_dtype)  # (K, N): the B operand of every tile of expert e (TMA-loaded on Hopper)
        for m0 in range(0, counts[e], tile_m):
            # Rows of this tile, in grouped order. The last tile of the expert is cut short: rows
            # past the expert's end are masked out (not loaded, not computed into y, not stored).
            rows = slice(offsets[e] + m0, offsets[e] + min(m0 + tile_m, counts[e]))
            idx_tile = gather_idx[rows]  # (<= tile_m,) token ids, prefetched into registers on Hopper

            # The fused gather: load this tile's A rows straight from x through the indices.
            a_tile = x[idx_tile]  # (<= tile_m, K), only this tile: never the whole (M, K) copy

            # MMA with fp32 (fp64) accumulation, then the epilogue rounds and stores the tile.
            y[rows] = (a_tile.to(acc_dtype) @ w_e).to(out_dtype)  # (<= tile_m, N)
    return y
    # --8<-- [end:gather_fused_grouped_gemm]


# --------------------------------------------------------------------------------------------------
# The weight-gradient form: the token dim is the reduction dim (varlen-K), gathered on K
# --------------------------------------------------------------------------------------------------


def grouped_gemm_varlen_k(
    a: torch.Tensor,
    b: torch.Tensor,
    meta: RoutingMetadata,
    *,
    gather_a: bool = True,
    out_dtype: torch.dtype | None = None,
    transpose_out: bool = False,
) -> torch.Tensor:
    """Per-expert ``a_e^T @ b_e``: the weight-gradient GEMMs dW1 = X_e^T dH_e and dW2 = dO_e^T A'_e.

    Args:
        a: (T, K) read through ``meta.gather_idx`` when ``gather_a`` (e.g. X or dO), else (M, K)
            already in expert-grouped row order.
        b: (M, N) in expert-grouped row order (e.g. dH or A').
        meta: routing metadata from ``build_metadata``.
        gather_a: whether ``a`` is gathered through ``gather_idx`` (fused gather on the K dim).
        out_dtype: dtype of the result (default ``a.dtype``); fp32 (fp64) accumulation.
        transpose_out: return ``out[e]^T`` instead, (E, N, K) (dW2 in W2's (E, n, d) orientation).

    Returns:
        (E, K, N): ``out[e] = a[rows of e]^T @ b[rows of e]``; an expert with no rows gets zeros.
    """
    _checks.check_tensor("a", a)
    _checks.check_tensor("b", b)
    _checks.check_ndim("a", a, 2, "((T, K) with gather_a=True, else (M, K))")
    _checks.check_ndim("b", b, 2, "(M, N): grouped rows")
    _checks.check_dtype("a", a, _checks.FLOAT_DTYPES)
    _checks.check_dtype("b", b, _checks.FLOAT_DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got a {a.dtype} and b {b.dtype}")
    _checks.check_same_device(a=a, b=b)
    _checks.check_bool("gather_a", gather_a)
    _checks.check_bool("transpose_out", transpose_out)
    contracts.check_metadata(meta, "a", a, num_tokens=a.shape[0] if gather_a else None, num_experts=None)
    M = meta.num_rows
    if b.shape[0] != M:
        raise ValueError(f"b must have shape (M, N) with M = {M} (meta.num_rows), got {tuple(b.shape)}")
    if not gather_a and a.shape[0] != M:
        raise ValueError(
            f"a must have shape (M, K) with M = {M} (meta.num_rows) when gather_a=False, got {tuple(a.shape)}"
        )
    out_dtype = _check_out_dtype(out_dtype, a.dtype)
    # --8<-- [start:grouped_gemm_varlen_k]
    E = meta.num_experts
    K, N = a.shape[1], b.shape[1]
    acc_dtype = _accumulation_dtype(a.dtype)
    offsets = meta.expert_offsets.tolist()  # (E+1,)
    gather_idx = meta.gather_idx.long()  # (M,)

    # Every expert's (K, N) block is written, so an expert with no rows gets an all-zero gradient.
    out = torch.zeros(E, K, N, dtype=out_dtype, device=a.device)  # (E, K, N)
    for e in range(E):
        rows = slice(offsets[e], offsets[e + 1])  # f_e grouped rows = the reduction length of expert e
        if rows.stop == rows.start:
            continue
        # The gather on K: the kernel walks the reduction dim in chunks of tokens, loading each
        # chunk's rows of a through gather_idx (staged in shared memory on Hopper).
        a_e = a[gather_idx[rows]] if gather_a else a[rows]  # (f_e, K)
        b_e = b[rows]  # (f_e, N), contiguous: already grouped
        out[e] = (a_e.to(acc_dtype).T @ b_e.to(acc_dtype)).to(out_dtype)  # (K, N)
    if transpose_out:  # the kernel writes each (K, N) tile transposed in its epilogue; here: a copy
        return out.transpose(1, 2).contiguous()  # (E, N, K)
    return out
    # --8<-- [end:grouped_gemm_varlen_k]


# --------------------------------------------------------------------------------------------------
# A first-order cost model: bytes through HBM and FLOPs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelIO:
    """Bytes one kernel of a variant reads from and writes to GPU memory (HBM)."""

    name: str
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True)
class GemmCost:
    """Memory traffic and FLOPs of one grouped GEMM variant (first-order model, see ``io_cost``).

    Attributes:
        variant: ``"naive"`` or ``"gather_fused"``.
        bytes_read: bytes read from HBM, summed over the variant's kernels.
        bytes_written: bytes written to HBM, summed over the variant's kernels.
        flops_useful: 2*M*K*N, the multiply-adds whose results are kept.
        flops_padded: FLOPs spent on the rows that fill each expert's last tile (results discarded).
        kernels: the per-kernel split of the bytes (the naive variant has a gather kernel and a GEMM).
        source_bytes: T*K*dtype_bytes, the size of ``x`` itself. The gathered rows (M*K) are about
            M/T times more; a fused gather that finds repeated tokens in L2 reads closer to this.
        rows: M = sum of the counts.
        padded_rows: M_pad = sum of the counts rounded up to a multiple of the tile.
    """

    variant: str
    bytes_read: int
    bytes_written: int
    flops_useful: int
    flops_padded: int
    kernels: tuple[KernelIO, ...]
    source_bytes: int
    rows: int
    padded_rows: int

    @property
    def bytes_moved(self) -> int:
        """bytes_read + bytes_written."""
        return self.bytes_read + self.bytes_written

    @property
    def flops_executed(self) -> int:
        """flops_useful + flops_padded: what the tensor cores actually run."""
        return self.flops_useful + self.flops_padded


_VARIANTS = ("naive", "gather_fused")


def _rows_and_padded_rows(f: list[int], tile: int) -> tuple[int, int]:
    """M = sum of the counts, and M_pad = each count rounded up to a multiple of ``tile``."""
    return sum(f), sum(-(-f_e // tile) * tile for f_e in f)


def _cost_from_kernels(variant: str, kernels: tuple[KernelIO, ...], *, T: int, K: int, N: int,
                       M: int, M_pad: int, b: int) -> GemmCost:
    """Sum the kernels' bytes; FLOPs are 2*M*K*N useful and 2*(M_pad - M)*K*N on padding."""
    return GemmCost(
        variant=variant,
        bytes_read=sum(k.bytes_read for k in kernels),
        bytes_written=sum(k.bytes_written for k in kernels),
        flops_useful=2 * M * K * N,
        flops_padded=2 * (M_pad - M) * K * N,
        kernels=kernels,
        source_bytes=T * K * b,
        rows=M,
        padded_rows=M_pad,
    )


def _check_counts(counts: object, T: int) -> list[int]:
    """Accept a 1-D integer tensor or a list/tuple of ints; return the counts as Python ints."""
    if isinstance(counts, torch.Tensor):
        _checks.check_ndim("counts", counts, 1, "(E,): rows per expert")
        if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
            raise TypeError(f"counts must be an integer tensor, got dtype {counts.dtype}")
        values = counts.tolist()
    elif isinstance(counts, (list, tuple)):
        values = list(counts)
        for i, c in enumerate(values):
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"counts must hold ints, got {type(c).__name__} at position {i}")
    else:
        raise TypeError(f"counts must be a 1-D integer tensor or a list of ints, got {type(counts).__name__}")
    if len(values) == 0:
        raise ValueError("counts must have one entry per expert (E >= 1), got an empty sequence")
    for e, c in enumerate(values):
        if c < 0 or c > T:
            raise ValueError(
                f"counts[{e}] must satisfy 0 <= counts[{e}] <= T = {T} "
                f"(an expert sees each token at most once), got {c}"
            )
    return values


def _check_cost_args(
    T: object, K: object, N: object, tile: object, tile_name: str, dtype_bytes: object, variant: object
) -> None:
    _checks.check_int_range("T", T, 0, what="number of tokens")
    _checks.check_int_range("K", K, 1, what="GEMM reduction dim")
    _checks.check_int_range("N", N, 1, what="GEMM output columns")
    _checks.check_int_range(tile_name, tile, 1, what="rows per GEMM tile")
    _checks.check_int_range("dtype_bytes", dtype_bytes, 1, what="bytes per element, e.g. 2 for bf16")
    _checks.check_choice("variant", variant, _VARIANTS)


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
    """First-order HBM traffic and FLOPs of a varlen-M grouped GEMM (x (T, K) gathered, w (E, K, N)).

    Notation: f_e = counts[e], M = sum_e f_e rows, M_pad = sum_e ceil(f_e / tile_m) * tile_m,
    E_act = number of experts with f_e > 0, b = dtype_bytes (one dtype for x, w and the output).

    **Assumption (first order, the paper's "algorithmic IO").** Inside one GEMM every operand byte
    crosses HBM once: the A tile a CTA loads is reused for all its N columns, and the weight tiles
    are reused across an expert's m-tiles, through SMEM and L2. A real kernel with tile_n < N
    re-reads A once per N-tile column unless L2 serves it, and re-reads w[e] once per m-tile; both
    variants pay those re-reads alike, so the *difference* between them is the same in either model.
    Index arrays (4 bytes per row, versus K*b bytes per row of data) are left out, and every gathered
    row counts as one HBM read even when the same token was read for another expert (in practice x
    is M/T times smaller than the gathered copy and often stays in L2, as the SonicMoE Blackwell
    blog post's appendix measures; ``source_bytes`` gives that lower bound).

    **naive** (two kernels):

    - gather + pad: reads the M routed rows, M*K*b; writes the padded buffer, M_pad*K*b (padding
      rows are written as zeros).
    - GEMM: reads the padded buffer back, M_pad*K*b, plus the weights of the active experts,
      E_act*K*N*b (an expert with no rows launches no tile and reads no weights); writes the padded
      output, M_pad*N*b (whole tiles are stored; the next kernel reads only the M real rows, so
      dropping the padding costs no extra pass).

    **gather_fused** (one kernel): reads the M routed rows straight from x, M*K*b, plus E_act*K*N*b
    of weights; writes M*N*b (the last tile of an expert is masked on load and on store).

    So fused saves M_pad*K*b of reads and M_pad*K*b + (M_pad - M)*N*b of writes. For the
    up-projection (K = d) with M = TK rows, no padding and bf16 (b = 2), that is one write and one
    read of the gathered (TK, d) copy, 2TKd bytes each. (The paper's Appendix B counts a separate
    gather plus a separate scatter, read and write each, as 8TKd bytes, the same per-pass sizes.)
    ``gather_fusion_savings`` applies this model to all six GEMMs of a layer.

    **FLOPs.** Useful: 2*M*K*N. Wasted on padding: 2*(M_pad - M)*K*N for *both* variants. The fused
    kernel masks the rows past an expert's end out of its loads and stores, but the tensor cores
    still run the full tile_m-row MMA instructions of that last tile, so the compute waste is
    the same; gather fusion saves memory traffic, not FLOPs. Removing the FLOP waste is what token
    rounding (routing, Algorithm 4) is for: with every f_e a multiple of tile_m, flops_padded = 0.
    """
    _check_cost_args(T, K, N, tile_m, "tile_m", dtype_bytes, variant)
    f = _check_counts(counts, T)
    # --8<-- [start:io_cost]
    b = dtype_bytes
    M, M_pad = _rows_and_padded_rows(f, tile_m)
    E_act = sum(1 for f_e in f if f_e > 0)
    weight_bytes = E_act * K * N * b

    if variant == "naive":
        kernels = (
            KernelIO("gather+pad", bytes_read=M * K * b, bytes_written=M_pad * K * b),
            KernelIO("grouped GEMM", bytes_read=M_pad * K * b + weight_bytes, bytes_written=M_pad * N * b),
        )
    else:
        kernels = (KernelIO("gather-fused grouped GEMM", bytes_read=M * K * b + weight_bytes, bytes_written=M * N * b),)

    return _cost_from_kernels(variant, kernels, T=T, K=K, N=N, M=M, M_pad=M_pad, b=b)
    # --8<-- [end:io_cost]


def varlen_k_cost(
    T: int,
    K: int,
    N: int,
    counts: torch.Tensor | list[int] | tuple[int, ...],
    *,
    tile_k: int = 64,
    dtype_bytes: int = 2,
    variant: str = "gather_fused",
) -> GemmCost:
    """First-order HBM traffic and FLOPs of the weight-gradient GEMM out[e] = a_e^T @ b_e -> (E, K, N).

    ``a`` is (T, K) gathered through ``gather_idx`` and ``b`` is (M, N) already grouped; the token
    dim is the *reduction* dim, walked in chunks of ``tile_k`` tokens. Same first-order assumption
    and notation as ``io_cost`` (M_pad rounds each f_e up to a multiple of tile_k here).

    - **naive**: a gather kernel reads M*K*b and writes the gathered (M, K) copy, M*K*b (no padding
      is needed: a zero-filled tail of the reduction dim adds nothing to the sum); the GEMM reads it
      back, M*K*b, plus b, M*N*b, and writes all E blocks, E*K*N*b (empty experts get zeros).
    - **gather_fused**: one kernel reads M*K*b (through the index) + M*N*b and writes E*K*N*b.

    FLOPs: useful 2*M*K*N; the last reduction chunk of an expert is zero-filled but still runs on
    the tensor cores, so 2*(M_pad - M)*K*N are wasted in both variants.
    """
    _check_cost_args(T, K, N, tile_k, "tile_k", dtype_bytes, variant)
    f = _check_counts(counts, T)
    # --8<-- [start:varlen_k_cost]
    b = dtype_bytes
    E = len(f)
    M, M_pad = _rows_and_padded_rows(f, tile_k)
    gemm_read = M * K * b + M * N * b  # a (gathered or contiguous) + b
    out_bytes = E * K * N * b  # every expert's (K, N) block, zeros for empty experts

    if variant == "naive":
        kernels = (
            KernelIO("gather", bytes_read=M * K * b, bytes_written=M * K * b),
            KernelIO("varlen-K GEMM", bytes_read=gemm_read, bytes_written=out_bytes),
        )
    else:
        kernels = (KernelIO("gather-fused varlen-K GEMM", bytes_read=gemm_read, bytes_written=out_bytes),)

    return _cost_from_kernels(variant, kernels, T=T, K=K, N=N, M=M, M_pad=M_pad, b=b)
    # --8<-- [end:varlen_k_cost]


# --8<-- [start:gather_fusion_savings]
def gather_fusion_savings(
    T: int,
    d: int,
    n: int,
    counts: torch.Tensor | list[int] | tuple[int, ...],
    *,
    tile_m: int = 128,
    tile_k: int = 64,
    dtype_bytes: int = 2,
) -> dict[str, int]:
    """Bytes gather fusion saves in each of the six grouped GEMMs of one MoE layer (fwd + bwd).

    One accounting for the whole library, derived from the cost model: for every GEMM, the
    ``naive`` variant's ``bytes_moved`` minus the ``gather_fused`` one's (``io_cost`` for the
    varlen-M GEMMs, ``varlen_k_cost`` for the weight gradients). Only a GEMM that *gathers* token
    rows can save anything:

    - **up-projection** ``H = X[gather_idx] W1`` (varlen-M, gathers X);
    - **dH** ``dA' = dO[gather_idx] W2^T`` (varlen-M, gathers dO);
    - **dW2** ``= A'^T dO[gather_idx]`` (varlen-K, gathers dO along the reduction dim);
    - **dW1** ``= X[gather_idx]^T dH`` (varlen-K, gathers X along the reduction dim).

    The **down-projection** ``Y = A W2`` and **dX~** ``= dH W1^T`` read an operand that the previous
    GEMM already wrote in grouped row order: there is nothing to gather, both pipelines run the
    same kernel, and they save 0.

    With M = TK rows and every f_e a multiple of ``tile_m`` (no padding), each gathering GEMM saves
    one write and one read of the gathered (TK, d) copy, 2 * TK*d*b bytes: 4TKd bytes in bf16
    (the copy itself is the "2TKd bytes" of the paper). Over the layer that is 4TKd in the forward
    and 16TKd per training step. Counts that are not tile multiples add the padding rows the naive
    varlen-M pipeline writes and reads (the varlen-K gather needs no padding).

    Args:
        T: tokens.
        d: model width (W1 is (E, d, 2n), W2 is (E, n, d)).
        n: expert width.
        counts: (E,) rows per expert, f_e.
        tile_m: rows per tile of the varlen-M GEMMs.
        tile_k: reduction chunk of the varlen-K GEMMs.
        dtype_bytes: b, bytes per element (2 for bf16).

    Returns:
        ``{"up-projection", "down-projection", "dH", "dW2", "dX~", "dW1"}`` -> bytes saved (ints).
    """
    _checks.check_int_range("d", d, 1, what="model width")
    _checks.check_int_range("n", n, 1, what="expert width")

    def saved(cost, K: int, N: int, **tile) -> int:
        naive = cost(T, K, N, counts, dtype_bytes=dtype_bytes, variant="naive", **tile)
        fused = cost(T, K, N, counts, dtype_bytes=dtype_bytes, variant="gather_fused", **tile)
        return naive.bytes_moved - fused.bytes_moved

    return {
        "up-projection": saved(io_cost, d, 2 * n, tile_m=tile_m),  # X gathered, (M, d) @ (d, 2n)
        "down-projection": 0,  # A is already grouped: nothing to gather
        "dH": saved(io_cost, d, n, tile_m=tile_m),  # dO gathered, (M, d) @ (d, n)
        "dW2": saved(varlen_k_cost, d, n, tile_k=tile_k),  # dO gathered on the reduction dim
        "dX~": 0,  # dH is already grouped: nothing to gather
        "dW1": saved(varlen_k_cost, d, 2 * n, tile_k=tile_k),  # X gathered on the reduction dim
    }
    # --8<-- [end:gather_fusion_savings]
