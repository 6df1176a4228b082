"""Grouped GEMM on Hopper, step 1 of the ladder: one CTA per output tile, cp.async loads, WGMMA math.

What this file teaches (paper Section 3, "grouped GEMM with varlen-M / varlen-K"): a *grouped* GEMM
is E independent GEMMs whose sizes are only known on the device. Expert e owns the rows
``expert_offsets[e] : expert_offsets[e+1]`` of the grouped row order. Two shapes occur in MoE
training:

* **varlen-M** (forward up/down projection, backward data gradient): expert e computes
  ``out[rows of e] = A[rows of e] @ W[e]``; the number of rows varies per expert. With ``gather=True``
  the rows of A are read from ``x`` through ``gather_idx`` (SonicMoE's gather fusion): row r of the
  grouped problem is ``x[gather_idx[r]]``, so the gathered copy of x is never materialized.
* **varlen-K** (weight gradients): expert e computes ``dW[e] = A[rows of e]^T @ B[rows of e]``; the
  *reduction* length varies per expert (and A's rows may again be gathered).

This first kernel favours clarity over speed (``ws.py`` holds the production path,
``grouped_gemm.py`` the public functions):

1. **Tile map.** varlen-M: the host launches ``ceil(M / tile_m) + E`` row-tiles (an upper bound on
   ``sum_e ceil(f_e / tile_m)`` that needs no device-to-host copy of the counts). A tiny device
   array ``tile_offsets[e] = sum_{j<e} ceil(f_j / tile_m)`` is made with torch, and each CTA finds
   its expert by a binary search over it; surplus CTAs exit at once. varlen-K: every expert has the
   same (d/tile_m) x (N/tile_n) tiles, so the grid's z index *is* the expert.
2. **Loads.** Every operand tile is read with 16-byte ``cp.async`` copies, one per (row, 8-element
   chunk), so each row can come from an arbitrary address (the gather). Slots outside the expert's
   rows or past K/N are filled with zeros by ordinary shared-memory stores, so ragged edges never
   feed garbage (or NaN) into the tensor cores. Tiles go into 128-byte-swizzled shared memory in the
   layout WGMMA reads: K-major for A in varlen-M, "MN-major" (N or M contiguous) otherwise. The
   weights ``w (E, K, N)`` are N-contiguous and are used as they are, through WGMMA's MN-major
   B mode (no transposed copy of w is made).
3. **Pipeline.** ``stages`` shared-memory buffers; loads run ``stages - 2`` k-tiles ahead of the
   math, and one WGMMA batch stays in flight while the next loads are issued (classic multistage
   ``cp.async.commit_group`` / ``wait_group`` pipeline, every thread both loads and multiplies).
4. **Math.** Two warpgroups (256 threads) each own 64 rows of the 128-row tile and issue
   ``wgmma.mma_async`` with fp32 accumulators in registers.
5. **Epilogue.** Each thread writes its accumulator elements straight to global memory, converting
   to the output dtype, masked to the expert's valid rows and the matrix's columns.
"""

from __future__ import annotations

from sonic_learn._deprecated import renamed
from sonic_learn.fast._cute import import_cutlass
from sonic_learn.fast.grouped_gemm import TILE_NS as TILE_NS_BY_KERNEL

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
import cutlass.utils.hopper_helpers as sm90_utils  # noqa: E402
from cutlass import Int32, const_expr  # noqa: E402
from cutlass.cute.nvgpu import cpasync, warpgroup  # noqa: E402
from cutlass.tensor_utils import LayoutEnum  # noqa: E402

# Binary-search depth for the expert lookup: supports up to 2**16 - 1 experts.
SEARCH_STEPS = 16
SEARCH_EXPERTS = 2**SEARCH_STEPS - 1  # the most experts the tile search can tell apart
THREADS = 256  # two consumer warpgroups
CHUNK = 8  # elements per 16-byte cp.async of a 16-bit dtype


class GroupedGemmV1:
    """One compiled grouped GEMM: fixed dtypes, tile shape and variant; all sizes dynamic.

    Canonical form, per expert g: ``C_g[m, n] = sum_k A_g[m, k] * B_g[n, k]``.

    * varlen-M: A = rows of ``a`` (K-major), B = ``w[g]`` read as (N, K) with N contiguous,
      C = rows of ``out``. Tensors: a (rows_a, K), w2d (E*K, N) [w reshaped], out (M, N).
    * varlen-K: A = ``a[rows]^T`` (M contiguous), B = ``b[rows]^T`` (N contiguous),
      C = ``out[g]``. Tensors: a (rows_a, d), b (M, N), out2d (E*d, N) [out reshaped].
    """

    LAYOUT_OPTIONS = False  # b_k_major / transpose_out: implemented by the production kernel only
    MMA_WARPGROUPS = (2, 1, 1)  # two warpgroups share every tile, 64 rows each
    TILE_NS = TILE_NS_BY_KERNEL["v1"]  # the tile_n this kernel takes (sm90: the same)

    def __init__(self, *, varlen_k: bool, gather: bool, tile_m: int = 128, tile_n: int = 128,
                 tile_k: int = 64, stages: int = 5, b_k_major: bool = False, transpose_out: bool = False):
        assert tile_m == 128, "two warpgroups x 64 rows"
        assert tile_n in self.TILE_NS and tile_k in (32, 64)
        assert stages >= (2 if self.LAYOUT_OPTIONS else 3)  # the persistent kernels' pipeline needs 2 slots
        assert self.LAYOUT_OPTIONS or not (b_k_major or transpose_out), "K-major B / transposed out: 'ws' only"
        self.varlen_k = varlen_k
        self.gather = gather
        self.b_k_major = b_k_major  # varlen-M: w stored (E, N, K), the product uses w[e]^T
        self.transpose_out = transpose_out  # varlen-K: out stored (E, N, d) instead of (E, d, N)
        self.tile = (tile_m, tile_n, tile_k)
        self.stages = stages

    # ------------------------------------------------------------------------------------------
    # Host side (traced once per compile): layouts, MMA, shared storage, launch.
    # ------------------------------------------------------------------------------------------
    @cute.jit
    def __call__(self, a: cute.Tensor, b: cute.Tensor, out: cute.Tensor, gather_idx: cute.Tensor,
                 expert_offsets: cute.Tensor, tile_offsets: cute.Tensor, num_row_tiles: Int32,
                 stream):
        bm, bn, bk = self.tile
        tiled_mma, sA_layout, sB_layout = self.make_mma_and_smem_layouts(a, out)
        dtype = self.dtype

        @cute.struct
        class Storage:
            sA: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sA_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sB_layout)], 1024]

        self.storage = Storage

        n_dim = out.shape[1]
        num_experts = expert_offsets.shape[0] - 1
        grid_n = (n_dim + bn - 1) // bn
        if const_expr(self.varlen_k):
            d_dim = a.shape[1]
            grid = (grid_n, (d_dim + bm - 1) // bm, num_experts)
        else:
            grid = (grid_n, num_row_tiles, 1)
        self.kernel(a, b, out, gather_idx, expert_offsets, tile_offsets, tiled_mma,
                    sA_layout, sB_layout).launch(grid=grid, block=[THREADS, 1, 1], stream=stream)

    def make_mma_and_smem_layouts(self, a: cute.Tensor, out: cute.Tensor):
        """The WGMMA (two warpgroups x 64 rows, fp32 accumulators) and the swizzled, staged shared-memory
        layouts of the A and B tiles; records the operand dtypes and majorness on ``self``.
        Traced inside ``__call__`` (the production kernels of ``ws`` reuse it)."""
        bn = self.tile[1]
        dtype = a.element_type
        self.dtype = dtype
        self.out_dtype = out.element_type
        # Operand majorness: (mn, k) tile views; ROW_MAJOR = K contiguous, COL_MAJOR = MN contiguous.
        self.a_layout = LayoutEnum.COL_MAJOR if self.varlen_k else LayoutEnum.ROW_MAJOR
        self.b_layout = LayoutEnum.ROW_MAJOR if self.b_k_major else LayoutEnum.COL_MAJOR
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            dtype, dtype, self.a_layout.sm90_mma_major_mode(), self.b_layout.sm90_mma_major_mode(),
            cutlass.Float32, self.MMA_WARPGROUPS, tiler_mn=(64, bn),
        )
        sA_layout = sm90_utils.make_smem_layout_a(self.a_layout, self.tile, dtype, self.stages)
        sB_layout = sm90_utils.make_smem_layout_b(self.b_layout, self.tile, dtype, self.stages)
        return tiled_mma, sA_layout, sB_layout

    # ------------------------------------------------------------------------------------------
    # Loader: one (mn, k) operand tile of one stage, from a row-major global matrix.
    # ------------------------------------------------------------------------------------------
    def make_tiled_copy(self, k_major: bool, tile_mn: int, threads: int = THREADS):
        """cp.async of 8 contiguous elements per thread-copy, threads laid out along the contiguous axis."""
        bk = self.tile[2]
        atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                   self.dtype, num_bits_per_copy=128)
        if const_expr(k_major):
            t_k = bk // CHUNK  # threads along k (contiguous)
            thr = cute.make_layout((threads // t_k, t_k), stride=(t_k, 1))
            val = cute.make_layout((1, CHUNK))
        else:
            t_mn = tile_mn // CHUNK  # threads along mn (contiguous)
            thr = cute.make_layout((t_mn, threads // t_mn), stride=(1, t_mn))
            val = cute.make_layout((CHUNK, 1))
        return cute.make_tiled_copy_tv(atom, thr, val)

    @cute.jit
    def load_tile(self, tiled_copy: cute.TiledCopy, g2d: cute.Tensor, s_stage: cute.Tensor,
                  k_major: cutlass.Constexpr, row_index: cute.Tensor, row_base: Int32,
                  rows_valid: Int32, use_index: cutlass.Constexpr, col0: Int32, col_limit: Int32):
        """Copy one operand tile into shared memory.

        ``g2d`` is a row-major global matrix. The tile's "gathered" axis (mn for a K-major operand,
        k for an MN-major one) maps tile position p to global row ``row_index[row_base + p]``
        (``use_index``) or ``row_base + p``; positions ``p >= rows_valid`` are zero-filled. The
        contiguous axis maps position q to global column ``col0 + q``, valid below ``col_limit``.
        """
        tidx, _, _ = cute.arch.thread_idx()
        thr_copy = tiled_copy.get_slice(tidx)
        tile_shape = (cute.size(s_stage, mode=[0]), cute.size(s_stage, mode=[1]))
        t_smem = thr_copy.partition_D(s_stage)  # (CPY, CPY_MN, CPY_K)
        t_coord = thr_copy.partition_S(cute.make_identity_tensor(tile_shape))  # same shape, (mn, k)
        g_chunks = cute.logical_divide(g2d, (None, CHUNK))  # (rows, (8, cols/8))
        for i in cutlass.range_constexpr(cute.size(t_smem, mode=[1])):
            for j in cutlass.range_constexpr(cute.size(t_smem, mode=[2])):
                mn, kk = t_coord[0, i, j]
                p = mn  # position along the gathered axis (rows of g2d)
                q = kk  # position along the contiguous axis (columns of g2d)
                if const_expr(not k_major):
                    p = kk
                    q = mn
                col = col0 + q
                dst = t_smem[None, i, j]
                if p < rows_valid and col < col_limit:
                    row = row_base + p
                    if const_expr(use_index):
                        row = row_index[row]
                    src = g_chunks[row, (None, col // CHUNK)]
                    cute.copy(tiled_copy, cute.make_tensor(src.iterator, cute.make_layout(dst.shape)), dst)
                else:
                    dst.fill(0)

    @cute.jit
    def load_stage(self, copy_a: cute.TiledCopy, copy_b: cute.TiledCopy, a: cute.Tensor, b: cute.Tensor,
                   sA_s: cute.Tensor, sB_s: cute.Tensor, gather_idx: cute.Tensor, kt: Int32, expert: Int32,
                   row0: Int32, count: Int32, m_start: Int32, n_start: Int32, m_dim: Int32, n_dim: Int32,
                   k_len: Int32):
        """Issue the cp.async copies of k-tile ``kt`` (A and B) into one pipeline stage."""
        k0 = kt * self.tile[2]
        if const_expr(self.varlen_k):
            # A^T tile: gathered axis = k (the expert's rows), contiguous axis = m (d).
            self.load_tile(copy_a, a, sA_s, False, gather_idx, row0 + k0, count - k0, self.gather,
                           m_start, m_dim)
            # B^T tile: rows of b (never gathered: b is already in grouped row order).
            self.load_tile(copy_b, b, sB_s, False, gather_idx, row0 + k0, count - k0, False,
                           n_start, n_dim)
        else:
            # A tile: gathered axis = m (the expert's rows), contiguous axis = k.
            self.load_tile(copy_a, a, sA_s, True, gather_idx, row0 + m_start, count - m_start,
                           self.gather, k0, k_len)
            # B tile = w[e][k0:k0+bk, n0:n0+bn], read from w2d (E*K, N) with N contiguous.
            self.load_tile(copy_b, b, sB_s, False, gather_idx, expert * k_len + k0, k_len - k0, False,
                           n_start, n_dim)

    @cute.jit
    def find_expert(self, tile_offsets: cute.Tensor, num_experts: Int32, row_tile: Int32) -> Int32:
        """Binary search: the largest e with tile_offsets[e] <= row_tile. Empty experts share their
        offset with the next expert; the search lands on the last of them, the one owning the tile."""
        lo = Int32(0)
        hi = num_experts
        for _ in cutlass.range_constexpr(SEARCH_STEPS):
            if hi - lo > 1:
                mid = (lo + hi) // 2
                if tile_offsets[mid] <= row_tile:
                    lo = mid
                else:
                    hi = mid
        return lo

    # ------------------------------------------------------------------------------------------
    # Device kernel.
    # ------------------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, a: cute.Tensor, b: cute.Tensor, out: cute.Tensor, gather_idx: cute.Tensor,
               expert_offsets: cute.Tensor, tile_offsets: cute.Tensor, tiled_mma: cute.TiledMma,
               sA_layout: cute.ComposedLayout, sB_layout: cute.ComposedLayout):
        bm, bn, bk = self.tile
        tidx, _, _ = cute.arch.thread_idx()
        n_tile, m_tile, expert_z = cute.arch.block_idx()

        # ---- Phase 1: which expert, which rows, which k-range does this CTA own? ----------------
        num_experts = expert_offsets.shape[0] - 1
        expert = expert_z
        m_start = m_tile * bm  # first output row of the tile, inside the expert (varlen-M)
        if const_expr(not self.varlen_k):
            expert = self.find_expert(tile_offsets, num_experts, m_tile)
            m_start = (m_tile - tile_offsets[expert]) * bm
        row0 = expert_offsets[expert]  # first grouped row of the expert
        count = expert_offsets[expert + 1] - row0  # f_e
        n_start = n_tile * bn
        n_dim = out.shape[1]
        if const_expr(self.varlen_k):
            m_dim = a.shape[1]  # d
            k_len = count  # reduce over the expert's rows
        else:
            m_dim = count
            k_len = a.shape[1]  # K
        total_tiles = tile_offsets[num_experts]
        active = True
        if const_expr(not self.varlen_k):
            active = m_tile < total_tiles

        if active:
            # ---- Phase 2: shared memory and the MMA partition ---------------------------------
            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.storage)
            sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)  # (bm, bk, S)
            sB = storage.sB.get_tensor(sB_layout.outer, swizzle=sB_layout.inner)  # (bn, bk, S)
            wg_idx = cute.arch.make_warp_uniform(tidx // 128)
            thr_mma = tiled_mma.get_slice(cute.make_layout(2, stride=128)(wg_idx))
            tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
            # Accumulator coordinates: A/B are partitioned per *warpgroup* (thr_mma above), but each
            # thread holds its own accumulator elements, so C is partitioned per *thread*.
            tCcC = tiled_mma.get_slice(tidx).partition_C(cute.make_identity_tensor((bm, bn)))
            acc = cute.make_rmem_tensor(tCcC.shape, cutlass.Float32)
            acc.fill(0.0)
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)

            copy_a = self.make_tiled_copy(not self.varlen_k, bm)
            copy_b = self.make_tiled_copy(False, bn)
            k_tiles = (k_len + bk - 1) // bk

            # ---- Phase 4: multistage mainloop -------------------------------------------------
            ahead = self.stages - 2  # k-tiles in flight ahead of the math
            for s in cutlass.range_constexpr(ahead):
                if s < k_tiles:
                    self.load_stage(copy_a, copy_b, a, b, sA[None, None, s], sB[None, None, s], gather_idx,
                                    s, expert, row0, count, m_start, n_start, m_dim, n_dim, k_len)
                cute.arch.cp_async_commit_group()
            num_k_blocks = cute.size(tCrA, mode=[2])
            for kt in cutlass.range(k_tiles, unroll=1):
                stage = kt % self.stages
                cute.arch.cp_async_wait_group(ahead - 1)  # this thread's copies of tile kt landed
                cute.arch.fence_proxy("async.shared", space="cta")  # make them visible to WGMMA
                cute.arch.sync_threads()  # ... and everyone else's; MMA kt-2 is done everywhere
                warpgroup.fence()
                for kb in cutlass.range_constexpr(num_k_blocks):
                    cute.gemm(tiled_mma, acc, tCrA[None, None, kb, stage], tCrB[None, None, kb, stage], acc)
                warpgroup.commit_group()
                warpgroup.wait_group(1)  # keep one batch in flight; batch kt-1 is complete
                nxt = kt + ahead
                if nxt < k_tiles:
                    nst = nxt % self.stages
                    self.load_stage(copy_a, copy_b, a, b, sA[None, None, nst], sB[None, None, nst], gather_idx,
                                    nxt, expert, row0, count, m_start, n_start, m_dim, n_dim, k_len)
                cute.arch.cp_async_commit_group()
            warpgroup.wait_group(0)
            cute.arch.cp_async_wait_group(0)

            # ---- Phase 5: epilogue ---------------------------------------------------------------
            out_row0 = row0 + m_start
            if const_expr(self.varlen_k):
                out_row0 = expert * m_dim + m_start
            self.epilogue(acc, tCcC, out, storage.sA.data_ptr(), out_row0, m_dim - m_start, n_start, n_dim - n_start)

    @cute.jit
    def epilogue(self, acc: cute.Tensor, tCcC: cute.Tensor, out: cute.Tensor, smem_base: cute.Pointer,
                 out_row0: Int32, rows_left: Int32, n_start: Int32, cols_left: Int32):
        """Masked direct store: every accumulator element goes to out[out_row0 + m, n_start + n],
        converted to the output dtype, if (m, n) lies inside the expert's rows and the matrix.

        Simple and correct, but each thread stores 2-byte scalars scattered over 16 rows: the
        production kernel (ws.py) stages the tile in shared memory instead.
        """
        for i in cutlass.range_constexpr(cute.size(acc)):
            m, n = tCcC[i]
            if m < rows_left and n < cols_left:
                out[out_row0 + m, n_start + n] = acc[i].to(self.out_dtype)


def default_stages(tile: tuple[int, int, int], smem_bytes: int = 227 * 1024) -> int:
    """Largest number of (A, B) stages that fits in shared memory (16-bit operands)."""
    bm, bn, bk = tile
    per_stage = (bm + bn) * bk * 2
    return max(3, min(8, (smem_bytes - 1024) // per_stage))


__all__ = ["GroupedGemmV1", "default_stages", "SEARCH_EXPERTS"]
__getattr__ = renamed(__name__, globals(), {"MAX_EXPERTS": "SEARCH_EXPERTS"})  # one name, one meaning
