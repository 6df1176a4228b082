"""Grouped GEMM on Hopper, steps 3 and 4 of the ladder: warp-specialized, persistent, TMA (the production kernel).

Step 3 (``GroupedGemmWS``, the production kernel) adds to step 2 (``sm90``) warp specialization, an mbarrier
pipeline, TMA loads and a persistent tile scheduler (its expert table built in shared memory), a
TMA bulk-store epilogue, clusters of 2 CTAs with the B tile multicast, K-major weights, a
transposed varlen-K store and the epilogue hook of the fused MoE epilogues (``epilogues``).
Step 4 (``GroupedGemmWS(ping_pong=True)``) lets one MMA warpgroup's epilogue overlap the other's mainloop; at the
128 x 128 tile it needs, it was measured slower than step 3 except on the 7B down-projection, so
step 3 stays the default (benchmarks/results/grouped_gemm_tiles_pingpong_NVIDIA_H200.json). Both
steps run in clusters of 2 CTAs on request (``cluster_m=2``): the same multicast producer, cluster
launch and remote slot release, with a ping-pong slot freed by the 4 warps of the one warpgroup
that read it in each CTA. (Upstream SonicMoE runs its dH GEMM as a ping-pong kernel with a
128 x 128 x 64 tile in clusters of 2 along M; ``GemmConfig(kernel="pingpong", cluster_m=2)`` is
that configuration here; as the 7B layer's dH GEMM it made the layer 1.7% faster on an H100, the
30B and E = 256 layers 1.1% and 1.6% slower, so it stays opt-in.) Also opt-in: the ping-pong
128 x 192 x 64 tile (upstream's choice for its short-K down-projection and dX~ GEMMs; 1.5%
slower on the 7B layer), whose warpgroups hold 192 fp32 accumulators per thread and keep a lean
epilogue (``GroupedGemmWS.lean_epilogue``: plain store only, 3 pipeline stages); the cooperative
kernel takes tile_n = 192 too. Both A/Bs: benchmarks/results/gemm_config_ab_session9_NVIDIA_H100_80GB_HBM3.json.

The TMA store uses one descriptor for the whole (M, N) output rather than one per expert: a
warpgroup's 64 rows that all belong to the expert (every tile but the expert's last) go out as one
bulk store, and the ragged rows of the expert's last tile take masked 16-byte stores from the same
shared-memory buffer -- a bulk store cannot stop at an expert's last row, and rewriting a
descriptor on the device would cost a rewrite and a fence each time a CTA moves to another
expert. Opt-in (``epi_subtile``): the plain store leaves in 64 x epi_subtile subtiles through two
small staging buffers per warpgroup instead of one whole-tile buffer, so the freed shared memory
becomes pipeline stages (``epilogue_wg_tma_subtiled``); the fused SwiGLU epilogue takes the same
loop with a second output (A, through a second TMA store atom). Not done: the dH epilogue still
stores with st.global (no TMA); tile shapes are fixed per output dtype.
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass
from sonic_learn.fast.grouped_gemm import PINGPONG_TILE_NS, lean_tile
from sonic_learn.fast.grouped_gemm import TILE_NS as TILE_NS_BY_KERNEL
from sonic_learn.fast.grouped_gemm.sm90 import CHUNK_BYTES, GroupedGemmSm90, epilogue_smem_bytes
from sonic_learn.fast.grouped_gemm.v1 import CHUNK
from sonic_learn.fast.primitives import prefetch_l2

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
import cutlass.pipeline as pipeline  # noqa: E402
import cutlass.utils.hopper_helpers as sm90_utils  # noqa: E402
from cutlass import Int32, const_expr  # noqa: E402
from cutlass.cute.nvgpu import cpasync, warpgroup  # noqa: E402
from cutlass.tensor_utils import LayoutEnum  # noqa: E402

PRODUCER_THREADS = 128  # warpgroup 0: the load warps
CONSUMER_THREADS = 256  # warpgroups 1 and 2: the MMA warps (64 rows of each tile, or whole tiles in ping-pong)
TABLE_EXPERTS = 2048  # the in-kernel expert tile table's capacity (E <= 2048, as the fast routing)
SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on Hopper
ORDER_BARRIER = 3  # named barriers 3 and 4: the ping-pong mainloop turns (1 and 2: the epilogues)
PRODUCER_REGS = 56  # setmaxnreg budgets: 56 * 128 + 224 * 256 <= 65536 registers per SM
CONSUMER_REGS = 224


class GroupedGemmWS(GroupedGemmSm90):
    """Warp-specialized, persistent grouped GEMM (same math and contract as GroupedGemmV1).

    * **Roles.** Warpgroup 0 only loads (cp.async gather of A, cp.async of B, zero-fill of ragged
      edges); warpgroups 1-2 only multiply and store. ``setmaxnreg`` moves registers from the
      loaders to the MMA warps, which hold the 64 x tile_n fp32 accumulators.
    * **Pipeline.** ``stages`` shared-memory slots, each with a "full" mbarrier (the 128 loader
      threads arrive through ``cp.async.mbarrier.arrive``, i.e. when their copies have landed) and
      an "empty" mbarrier (the 256 MMA threads arrive once the WGMMAs reading the slot are done).
      No CTA-wide barrier in the mainloop: the loaders run up to ``stages`` k-tiles ahead, across
      tile boundaries.
    * **Persistent scheduler.** One CTA per SM (or one cluster of ``cluster_m`` CTAs per ``cluster_m``
      SMs) walks the linear tile index ``t = cluster, cluster + clusters, ...`` over (row unit,
      n-tile) pairs (n fastest), a row unit being ``cluster_m`` m-tiles of one expert; the per-expert
      unit table is built in shared memory at start (``build_tile_table``). Loaders and MMA warps
      decode the same sequence independently, so they need no extra queue. While the MMA warps run
      an epilogue, the loaders already fill the next tile's slots.
    * **Clusters** (``cluster_m=2``): the two CTAs of a unit need the same B tile; each fetches half
      and TMA multicasts it into both, and a slot is freed only when both CTAs' MMA warps that read
      it are done with it (remote mbarrier arrivals, ``release_slot``; ``empty_arrivals``: the 8
      MMA warps per CTA, or when ping-ponging the 4 warps of the slot's warpgroup). Cooperative and
      ping-pong kernels share the producer, the launch and the release.
    * **Epilogue** per MMA warpgroup through its own shared-memory buffer (64 rows), synchronized
      with a named barrier of 128 threads; the same ``tile_value`` hook as GroupedGemmSm90. The
      plain store sends full rows by TMA bulk store (``epilogue_wg_tma``), or subtile by subtile
      (``epi_subtile``: ``epilogue_wg_tma_subtiled``, shared with the SwiGLU epilogue).
    * **Layout options** (so the MoE backward never copies a transposed weight or gradient):
      ``b_k_major`` (varlen-M) takes the weights stored (E, N, K) and multiplies by ``w[e]^T``
      (WGMMA reads B K-major; only the TMA view's strides change); ``transpose_out`` (varlen-K)
      stores ``out[e]^T``, i.e. an (E, N, d) result, from the shared-memory staged tile.
    """

    LAYOUT_OPTIONS = True
    TILE_NS = TILE_NS_BY_KERNEL["ws"]  # 192: three 64-column swizzle atoms (ping-pong: PINGPONG_TILE_NS)
    TMA_STORE = True  # the plain store epilogue can; the fused epilogues (subclasses) store with st.global
    # The outputs that the subtiled epilogue (``epi_subtile``) sends through TMA bulk stores, each as
    # the number of tile columns per column of that output: ``out`` first, then ``epi_out``. (1,):
    # the plain store; the SwiGLU epilogue adds ``epi_out`` at half width (one A column per (gate,
    # up) pair); (): the epilogue ignores ``epi_subtile``.
    SUBTILE_OUTPUTS: tuple[int, ...] = (1,)
    # Columns of the epilogue's input ``epi_in`` per output column (0: the epilogue reads no input;
    # the dH epilogue reads H, two columns (gate, up) per column of dA'). ``epi_prefetch`` uses it.
    EPI_IN_COLS = 0

    def __init__(self, *, ping_pong: bool = False, tma_store: bool = True, cluster_m: int = 1,
                 epi_subtile: int | None = None, epi_prefetch: int = 0, **kernel):
        """``kernel``: as ``GroupedGemmV1``. ``ping_pong`` (step 4 of the ladder): each MMA
        warpgroup owns whole tiles -- the CTA's tiles alternate between them -- so one warpgroup's
        epilogue runs while the other one's mainloop keeps the tensor cores busy; the producer is
        unchanged, each MMA warpgroup steps its pipeline state over the slots of the other one's
        tiles, a slot is released by the 128 threads that read it, and the two mainloops take turns
        through a pair of named barriers (ORDER_BARRIER); a whole 128 x tile_n tile's accumulators
        live in one warpgroup, so tile_n is 64, 128 or 192 (PINGPONG_TILE_NS; 192 has the lean
        epilogue, plain store only: ``lean_epilogue``). ``tma_store=False``: the plain store copies out
        of shared memory synchronously instead of the TMA bulk store. ``cluster_m``: CTAs per
        cluster along M that share each tile's B through TMA multicast (1 or 2; cooperative or
        ping-pong).
        ``epi_subtile``: columns per subtile of the subtiled TMA-store epilogue (cooperative kernel
        with ``tma_store``; the plain store and the SwiGLU epilogue, ``SUBTILE_OUTPUTS``; ignored by
        the dH epilogue and the transposed varlen-K store).
        ``epi_prefetch`` = N > 0: the producer prefetches each tile's part of the epilogue's input into
        L2 when it reaches the tile's k-tile ``k_tiles - N`` (``prefetch_epi_in``; only an epilogue
        that reads an input, ``EPI_IN_COLS`` > 0, i.e. the dH epilogue; ignored by the others). The
        producer runs up to ``stages`` k-tiles ahead of the MMA warps, so the input has about
        N + stages k-tiles of WGMMAs to arrive in L2 before the epilogue reads it."""
        super().__init__(**kernel)
        assert cluster_m in (1, 2)
        self.pingpong = ping_pong
        self.tma_store = tma_store
        self.cluster_m = cluster_m
        assert epi_subtile is None or (not ping_pong and self.tile[1] % (2 * epi_subtile) == 0)
        self.epi_subtile = epi_subtile
        self.epi_prefetch = epi_prefetch
        if ping_pong:
            self.MMA_WARPGROUPS = (1, 1, 1)  # one warpgroup's MMA covers a whole tile
            assert self.tile[1] in PINGPONG_TILE_NS
        # The lean epilogue serves the plain store only (see ``lean_epilogue``).
        assert not self.lean_epilogue() or (type(self).TMA_STORE and not self.transpose_out)

    def lean_epilogue(self) -> bool:
        """More than LEAN_ACC fp32 accumulators per MMA thread (the ping-pong 128 x 192 tile: 192).

        The accumulators alone then take 192 of the 224 registers an MMA thread has (CONSUMER_REGS),
        and the epilogue must not keep anything else alive across the mainloop. Two things would: the
        shared-memory address of each accumulator pair in the swizzled epilogue buffer (the 128-byte
        swizzle XORs each address, so the compiler computes the 96 addresses once before the tile
        loop and holds them in 96 registers through every mainloop), and the unrolled masked
        copy-out of the ragged rows (24 hoisted address pairs). So a lean epilogue re-derives the
        staging addresses every tile (``staging_view``) and rolls the copy-out loop; with both,
        the kernel compiles without spills at the usual 56 / 224 register split (ptxas reports of
        the compile tests). Only the plain store has a lean form: the fused epilogues and the
        transposed varlen-K store spill at this size, and ``compile_grouped_gemm`` rejects them.
        A lean kernel with the TMA store also allocates its swizzled buffers without the 16-byte
        row padding that only the unswizzled buffers of ``tma_store=False`` use
        (``epilogue_smem_bytes``): that leaves room for a third pipeline stage at 128 x 192
        (``ws_stages``)."""
        return lean_tile(self.tile, self.pingpong)

    def uses_tma_store(self) -> bool:
        """The plain store's full tiles leave through a TMA bulk store (row-major ``out`` only; the
        transposed varlen-K store and the fused epilogues keep the padded buffer and 16-byte
        stores, except the SwiGLU epilogue when ``subtiled``)."""
        return self.TMA_STORE and self.tma_store and not self.transpose_out

    def subtiled(self) -> bool:
        """The epilogue leaves subtile by subtile through TMA bulk stores (``epilogue_wg_tma_subtiled``):
        the plain store, and the fused epilogues whose ``SUBTILE_OUTPUTS`` say so (SwiGLU)."""
        return (self.epi_subtile is not None and self.tma_store and not self.transpose_out
                and len(self.SUBTILE_OUTPUTS) > 0)

    def prefetches_epi_in(self) -> bool:
        """Does the producer prefetch the epilogue's input (``epi_prefetch`` and an epilogue that
        reads one)?"""
        return self.epi_prefetch > 0 and self.EPI_IN_COLS > 0 and not self.varlen_k

    def wg_rows(self) -> int:
        """Output rows one MMA warpgroup owns (and stages in its epilogue buffer)."""
        return self.tile[0] if self.pingpong else self.tile[0] // 2

    def wg_row_offset(self, wg):
        """The first tile row of MMA warpgroup ``wg`` (1 or 2)."""
        return 0 if self.pingpong else (wg - 1) * (self.tile[0] // 2)

    @cute.jit
    def __call__(self, a: cute.Tensor, b: cute.Tensor, out: cute.Tensor, epi_out: cute.Tensor, epi_in: cute.Tensor,
                 row_in: cute.Tensor, row_out: cute.Tensor, gather_idx: cute.Tensor, expert_offsets: cute.Tensor,
                 tile_offsets: cute.Tensor, num_ctas: Int32, stream):
        bm, bn, bk = self.tile
        tiled_mma, sA_layout, sB_layout = self.make_mma_and_smem_layouts(a, out)  # as GroupedGemmV1
        dtype = self.dtype
        epi_elems = 2 * self.wg_rows() * (bn + CHUNK_BYTES * 8 // self.out_dtype.width)  # one buffer per MMA WG
        if const_expr(self.lean_epilogue() and self.uses_tma_store()):
            epi_elems = 2 * self.wg_rows() * bn  # the swizzled TMA-store buffers need no row padding
        if const_expr(self.subtiled()):  # per output, two (rows, subtile) buffers per MMA WG
            epi_elems = subtile_staging_elems(self.wg_rows(), self.epi_subtile, self.SUBTILE_OUTPUTS)
        if const_expr(self.transpose_out):  # the column-major staging tile(s), see ``consumer``
            epi_elems = max(epi_elems, transposed_staging_elems(self.tile, self.pingpong, self.out_dtype.width // 8))

        @cute.struct
        class Storage:
            barriers: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sA_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sB_layout)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[self.out_dtype, epi_elems], 1024]
            tiles: cute.struct.MemRange[Int32, TABLE_EXPERTS + 1]  # varlen-M: first unit of each expert

        self.storage = Storage
        # (the stage count comes from ``ws_stages``, which must count the same buffers)
        assert Storage.size_in_bytes() <= SMEM_BYTES, f"{Storage.size_in_bytes()} bytes of shared memory"
        # The TMA-store epilogue: each MMA warpgroup stages its (rows, bn) part of the tile in a
        # swizzled buffer (slot wg - 1 of a 2-slot layout; it fits in the padded buffers' space)
        # and one thread sends it to ``out`` with a bulk tensor store. TMA clips columns past N;
        # rows are never clipped per expert (the descriptor is the whole (M, N) matrix), so only a
        # warpgroup whose rows all belong to the expert uses it -- the expert's ragged last tile
        # takes the masked 16-byte stores instead.
        epi_layout = None
        tma_atom_c = None
        tma_c = None
        # Subtiled (``epi_subtile``): per output, four (rows, subtile) slots, 2 * (wg - 1) + buffer,
        # and a TMA box of one subtile (the reference's "epi_tile"); the SwiGLU epilogue's second
        # output, A in ``epi_out``, gets its own slots and store atom at half the width ("eo").
        tma_atom_eo = None
        tma_eo = None
        eo_layout = None
        if const_expr(self.subtiled()):
            epi_layout, tma_atom_c, tma_c = self.subtile_store(out, self.epi_subtile)
            if const_expr(len(self.SUBTILE_OUTPUTS) > 1):
                eo_layout, tma_atom_eo, tma_eo = self.subtile_store(epi_out,
                                                                    self.epi_subtile // self.SUBTILE_OUTPUTS[1])
        elif const_expr(self.uses_tma_store()):
            epi_layout = sm90_utils.make_smem_layout_epi(self.out_dtype, LayoutEnum.ROW_MAJOR,
                                                         (self.wg_rows(), bn), 2)  # (rows, bn, WG)
            tma_atom_c, tma_c = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileS2GOp(), out, cute.slice_(epi_layout, (None, None, 0)), (self.wg_rows(), bn))
        # B through TMA, one descriptor for all experts.
        # * varlen-M: B = the weights, seen as a 3-D (N, K, E) tensor with N contiguous; the tile of
        #   expert e sits at (n0, k0, e) and TMA zero-fills whatever lies past N or K.
        # * varlen-K: B = b (M, N), seen as (N, M); expert e's k-tiles start at row offsets[e]. Its
        #   last k-tile reads up to tile_k - 1 rows of the NEXT expert (TMA cannot stop at a
        #   per-expert row); those rows meet A rows that the producer zero-fills, so they add
        #   0 * b = 0 (for finite b; a NaN/Inf in one expert's rows of b can leak into the previous
        #   expert's gradient).
        # * varlen-M with ``b_k_major``: the weights are stored (E, N, K) (e.g. W2 (E, n, d) for
        #   dA = dY W2^T); the same (N, K, E) view with K contiguous, and WGMMA reads B K-major.
        if const_expr(self.varlen_k):
            n_dim = b.shape[1]
            b_view = cute.make_tensor(b.iterator, cute.make_layout((n_dim, b.shape[0]), stride=(1, n_dim)))
        else:
            n_dim = out.shape[1]
            k_dim = a.shape[1]
            num_experts = expert_offsets.shape[0] - 1
            b_stride = (k_dim, 1, n_dim * k_dim) if const_expr(self.b_k_major) else (1, n_dim, k_dim * n_dim)
            b_view = cute.make_tensor(b.iterator, cute.make_layout((n_dim, k_dim, num_experts), stride=b_stride))
        # With a cluster of cluster_m CTAs (neighbouring m-tiles of one expert, same n-tile, so the
        # same B tile), each CTA fetches 1/cluster_m of B and the TMA unit multicasts it into every
        # CTA of the cluster: B's traffic from L2 per tile drops by that factor.
        b_op = cpasync.CopyBulkTensorTileG2SMulticastOp() if const_expr(self.cluster_m > 1) else \
            cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_b, tma_b = cpasync.make_tiled_tma_atom(
            b_op, b_view, cute.slice_(sB_layout, (None, None, 0)), (bn, bk), num_multicast=self.cluster_m)
        # Contiguous A (varlen-M without gather): TMA as well. A tile starts at an arbitrary row
        # (the expert's first row + m_start), so the kernel offsets the coordinate tensor by that row.
        tma_atom_a = None
        tma_a = None
        if const_expr(not self.varlen_k and not self.gather):
            tma_atom_a, tma_a = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), a, cute.slice_(sA_layout, (None, None, 0)), (bm, bk))
        self.kernel(a, b, tma_atom_a, tma_a, tma_atom_b, tma_b, tma_atom_c, tma_c, tma_atom_eo, tma_eo, out, epi_out,
                    epi_in, row_in, row_out, gather_idx, expert_offsets, tile_offsets, tiled_mma, sA_layout, sB_layout,
                    epi_layout, eo_layout).launch(grid=(num_ctas, 1, 1), block=[PRODUCER_THREADS + CONSUMER_THREADS, 1, 1],
                                      cluster=[self.cluster_m, 1, 1],
                                      stream=stream)

    def subtile_store(self, dst: cute.Tensor, cols: int):
        """One output of the subtiled epilogue: four swizzled (rows, cols) staging slots (rows = one
        MMA warpgroup's) and the TMA store atom for ``dst`` whose box is one slot."""
        slots = sm90_utils.make_smem_layout_epi(self.out_dtype, LayoutEnum.ROW_MAJOR,
                                                (self.wg_rows(), cols), 4)  # (rows, cols, slot)
        atom, tma = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileS2GOp(), dst,
                                                cute.slice_(slots, (None, None, 0)), (self.wg_rows(), cols))
        return slots, atom, tma

    def subtile_slots(self, ptr: cute.Pointer, slots: cute.ComposedLayout, per_col: int):
        """One output's four staging slots (``subtile_store``'s layout), placed at ``ptr``: the
        (rows, cols, slot) tensor the stores read, and a (bm, bn) view of the same buffers to be
        partitioned like the accumulators, so that each accumulator element gets its address in
        the buffer of its subtile.

        Warpgroup wg stages subtile j in slot 2 * (wg - 1) + j % 2. The view sends tile row r to row
        r % rows of its warpgroup's slots and tile column n to column (n % S) // per_col of buffer
        (n // S) % 2 (a stride-0 mode over pairs of subtiles); with ``per_col`` = 2 (SwiGLU's A) a
        stride-0 mode of 2 sends the (gate, up) columns 2c, 2c + 1 both to A's column c."""
        bm, bn, _ = self.tile
        sub = self.epi_subtile
        row_mode, col_mode = cute.get(slots.outer, mode=[0]), cute.get(slots.outer, mode=[1])
        slot = self.wg_rows() * (sub // per_col)  # make_smem_layout_epi lays the slots out compactly
        col_shape = (col_mode.shape, 2, bn // (2 * sub))
        col_stride = (col_mode.stride, slot, 0)
        if per_col > 1:
            col_shape = (per_col,) + col_shape
            col_stride = (0,) + col_stride
        base = cute.recast_ptr(ptr, slots.inner, dtype=self.out_dtype)
        view = cute.make_layout(((row_mode.shape, 2), col_shape), stride=((row_mode.stride, 2 * slot), col_stride))
        return cute.make_tensor(base, slots.outer), cute.make_tensor(base, view)

    @cute.jit
    def tile_coords(self, t: Int32, n_tiles: Int32, m_tiles: Int32, tile_offsets: cute.Tensor,
                    num_experts: Int32, rank: Int32):
        """Linear tile index -> (expert, m_start inside the expert's rows or d, n_start).

        A tile index names a *unit* of ``cluster_m`` neighbouring m-tiles of one expert (one m-tile
        without clusters); the CTA of rank ``rank`` in its cluster takes the unit's m-tile ``rank``.
        ``tile_offsets`` (varlen-M) and ``m_tiles`` (varlen-K) count units, so a unit never
        straddles two experts; a CTA whose m-tile lies past the expert's rows still runs (it must
        fetch its share of B for its partner) and its epilogue stores nothing."""
        bm, bn, _ = self.tile
        n_tile = t % n_tiles
        rest = t // n_tiles
        expert = Int32(0)
        unit = Int32(0)
        if const_expr(self.varlen_k):
            unit = rest % m_tiles
            expert = rest // m_tiles
        else:
            expert = self.find_expert(tile_offsets, num_experts, rest)
            unit = rest - tile_offsets[expert]
        return expert, (unit * self.cluster_m + rank) * bm, n_tile * bn

    @cute.jit
    def tile_problem(self, t: Int32, n_tiles: Int32, m_tiles: Int32, tile_offsets: cute.Tensor,
                     expert_offsets: cute.Tensor, a_cols: Int32, rank: Int32):
        """Everything about tile t that both roles need (loaders and MMA warps decode the same tile
        sequence independently, so they must decode it identically): ``tile_coords``, the expert's
        grouped rows ``row0 : row0 + count``, and the tile's GEMM sizes (m_dim output rows, k_len
        reduction length): (count, K = a_cols) for varlen-M, (d = a_cols, count) for varlen-K."""
        num_experts = expert_offsets.shape[0] - 1
        expert, m_start, n_start = self.tile_coords(t, n_tiles, m_tiles, tile_offsets, num_experts, rank)
        row0 = expert_offsets[expert]
        count = expert_offsets[expert + 1] - row0
        m_dim = count
        k_len = a_cols
        if const_expr(self.varlen_k):
            m_dim = a_cols
            k_len = count
        return expert, m_start, n_start, row0, count, m_dim, k_len

    @cute.kernel
    def kernel(self, a: cute.Tensor, b: cute.Tensor, tma_atom_a, tma_a, tma_atom_b, tma_b, tma_atom_c, tma_c,
               tma_atom_eo, tma_eo, out: cute.Tensor, epi_out: cute.Tensor, epi_in: cute.Tensor, row_in: cute.Tensor,
               row_out: cute.Tensor, gather_idx: cute.Tensor,
               expert_offsets: cute.Tensor, tile_offsets: cute.Tensor, tiled_mma: cute.TiledMma,
               sA_layout: cute.ComposedLayout, sB_layout: cute.ComposedLayout, epi_layout, eo_layout):
        """One CTA: its place in the cluster, shared memory and the load pipeline, the tile space
        (``tile_space``), then one role per warpgroup: ``producer`` (warpgroup 0) or ``consumer``
        (the MMA warpgroups 1-2, mainloop + epilogue)."""
        tidx, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        num_ctas, _, _ = cute.arch.grid_dim()
        cm = self.cluster_m
        rank = Int32(0)  # my rank in the cluster: which m-tile of each unit is mine
        if const_expr(cm > 1):
            rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
            # From here on the scheduler walks units: "cta" = my cluster, "num_ctas" = clusters.
            cta = cta // cm
            num_ctas = num_ctas // cm
        wg = cute.arch.make_warp_uniform(tidx // 128)
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())

        # ---- Shared memory and the load pipeline ----------------------------------------------
        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(self.storage)
        if const_expr(not self.varlen_k):
            # The scheduler's expert table, built here from expert_offsets (no host-side pass): from
            # now on ``tile_offsets`` is this shared-memory copy; the argument is not read.
            table = storage.tiles.get_tensor(cute.make_layout(TABLE_EXPERTS + 1))
            if warp == 0:
                self.build_tile_table(expert_offsets, table)
            cute.arch.sync_threads()
            tile_offsets = table
        sA = storage.sA.get_tensor(sA_layout.outer, swizzle=sA_layout.inner)  # (bm, bk, S)
        sB = storage.sB.get_tensor(sB_layout.outer, swizzle=sB_layout.inner)  # (bn, bk, S)
        pipe = pipeline.PipelineCpAsync.create(
            barrier_storage=storage.barriers.data_ptr(),
            num_stages=self.stages,
            # full barrier: 128 cp.async arrivals + 1 arrive-with-byte-count from the TMA thread
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, PRODUCER_THREADS + 1),
            # empty barrier: every MMA thread that read the slot (one warpgroup when ping-ponging);
            # in a cluster, one lane per reading MMA warp of *every* CTA of the cluster (a slot is
            # refilled by the partners' multicasts too, so all of them must have read it)
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.empty_arrivals()),
            defer_sync=cm > 1,
        )
        if const_expr(cm > 1):  # the partners' barriers must be initialized before any remote arrive
            cute.arch.mbarrier_init_fence()
            cute.arch.cluster_arrive_relaxed()
            cute.arch.cluster_wait()

        # ---- The tile space (identical for both roles), then one role per warpgroup -------------
        n_dim, n_tiles, m_tiles, num_tiles = self.tile_space(a, b, out, tile_offsets, expert_offsets)
        sched = (cta, num_ctas, rank, n_tiles, m_tiles, num_tiles, tile_offsets, expert_offsets)
        if wg == 0:
            self.producer(a, gather_idx, tma_atom_a, tma_a, tma_atom_b, tma_b, sA, sB, pipe, sched, tidx, warp,
                          epi_in)
        else:
            self.consumer(a, out, (epi_out, epi_in, row_in, row_out), ((tma_atom_c, tma_c), (tma_atom_eo, tma_eo)),
                          tiled_mma, sA, sB, storage, (epi_layout, eo_layout), pipe, sched, n_dim, tidx, wg)
        if const_expr(cm > 1):
            # No CTA may exit while a partner can still arrive on its barriers or multicast into it.
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ---- Scheduler ---------------------------------------------------------------------------------
    @cute.jit
    def tile_space(self, a: cute.Tensor, b: cute.Tensor, out: cute.Tensor, tile_offsets: cute.Tensor,
                   expert_offsets: cute.Tensor):
        """(N, n-tiles, units along M per expert (varlen-K), all tiles): the linear tile space that
        the producer and the MMA warpgroups walk (``tile_problem`` decodes one index)."""
        bm, bn, _ = self.tile
        cm = self.cluster_m
        num_experts = expert_offsets.shape[0] - 1
        n_dim = b.shape[1] if const_expr(self.varlen_k) else out.shape[1]  # the GEMM's N
        n_tiles = (n_dim + bn - 1) // bn
        m_tiles = Int32(1)
        num_tiles = Int32(0)
        if const_expr(self.varlen_k):
            m_tiles = (a.shape[1] + bm * cm - 1) // (bm * cm)  # units of cm m-tiles over d
            num_tiles = num_experts * m_tiles * n_tiles
        else:
            num_tiles = tile_offsets[num_experts] * n_tiles
        return n_dim, n_tiles, m_tiles, num_tiles

    # ---- Producer --------------------------------------------------------------------------------
    @cute.jit
    def producer(self, a: cute.Tensor, gather_idx: cute.Tensor, tma_atom_a, tma_a, tma_atom_b, tma_b,
                 sA: cute.Tensor, sB: cute.Tensor, pipe, sched: tuple, tidx: Int32, warp: Int32, epi_in: cute.Tensor):
        """Warpgroup 0: loads only. For every tile of this CTA, fill the pipeline's slots with its
        k-tiles: B (and contiguous A) by TMA, gathered or ragged A rows by cp.async; with
        ``epi_prefetch``, also the L2 prefetch of the tile's epilogue input (``prefetch_epi_in``)."""
        cta, num_ctas, rank, n_tiles, m_tiles, num_tiles, tile_offsets, expert_offsets = sched
        bm, bn, bk = self.tile
        cm = self.cluster_m
        use_tma_a = not self.varlen_k and not self.gather
        cute.arch.setmaxregister_decrease(PRODUCER_REGS)
        copy_a = self.make_tiled_copy(not self.varlen_k, bm, PRODUCER_THREADS)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        a_coord = copy_a.get_slice(tidx).partition_S(cute.make_identity_tensor((bm, bk)))  # (CPY, M, K)
        a_rows = cute.make_rmem_tensor(cute.size(a_coord, mode=[1]), Int32)  # token of each of my rows
        # varlen-K: the rows of A^T change with every k-tile; each thread resolves the global rows
        # of its k positions one k-tile ahead, so the gather_idx loads' latency hides behind the
        # current k-tile's copies and the wait for the next slot instead of stalling the producer.
        k_rows = cute.make_rmem_tensor(cute.size(a_coord, mode=[2]), Int32)  # this k-tile
        k_rows_next = cute.make_rmem_tensor(cute.size(a_coord, mode=[2]), Int32)
        for t in cutlass.range(cta, num_tiles, num_ctas, unroll=1):
            expert, m_start, n_start, row0, count, m_dim, k_len = self.tile_problem(
                t, n_tiles, m_tiles, tile_offsets, expert_offsets, a.shape[1], rank)
            # (bn, bk, k-tiles) view of this tile's B, partitioned for the TMA unit
            if const_expr(self.varlen_k):
                gB = cute.local_tile(cute.domain_offset((0, row0), tma_b), (bn, bk), (n_start // bn, None))
            else:
                gB = cute.local_tile(tma_b[None, None, expert], (bn, bk), (n_start // bn, None))
            tBsB, tBgB = cpasync.tma_partition(tma_atom_b, rank, cute.make_layout(cm),
                                               cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
            if const_expr(not self.varlen_k and not use_tma_a):
                # Gathered A: the tile's rows are the same for every k-tile, so each thread reads
                # its rows' token indices once per tile into registers (-1 = past the expert).
                for i in cutlass.range_constexpr(cute.size(a_rows)):
                    mn = a_coord[0, i, 0][0]
                    a_rows[i] = -1
                    if mn < count - m_start:
                        a_rows[i] = gather_idx[row0 + m_start + mn]
            if const_expr(use_tma_a):
                # (bm, bk, k-tiles) view of a's rows row0 + m_start ... (rows past the expert only
                # feed output rows the epilogue masks; rows past M are zero-filled by TMA)
                gA = cute.local_tile(cute.domain_offset((row0 + m_start, 0), tma_a), (bm, bk), (0, None))
                tAsA, tAgA = cpasync.tma_partition(tma_atom_a, 0, cute.make_layout(1),
                                                   cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
            if const_expr(self.varlen_k):
                self.resolve_k_rows(a_coord, gather_idx, k_rows_next, row0, 0, count)
            k_tiles = (k_len + bk - 1) // bk
            for kt in cutlass.range(k_tiles, unroll=1):
                if const_expr(self.prefetches_epi_in()):
                    if kt == cutlass.max(k_tiles - self.epi_prefetch, 0):
                        self.prefetch_epi_in(epi_in, row0 + m_start, count - m_start, n_start, tidx)
                if const_expr(self.varlen_k):
                    k_rows.store(k_rows_next.load())
                    if (kt + 1) * bk < k_len:  # prefetch the next k-tile's rows
                        self.resolve_k_rows(a_coord, gather_idx, k_rows_next, row0, kt + 1, count)
                pipe.producer_acquire(state)  # wait until the MMA warps freed this slot
                if warp == 0:
                    # One thread announces the TMA bytes (the +1 arrival of the full barrier);
                    # the copies are issued by the whole warp (cute.copy elects one lane
                    # with elect.sync, which needs the full warp converged).
                    bar = pipe.producer_get_barrier(state)
                    if tidx == 0:
                        tx_rows = bn + (bm if const_expr(use_tma_a) else 0)
                        cute.arch.mbarrier_arrive_and_expect_tx(bar, tx_rows * bk * self.dtype.width // 8)
                    if const_expr(cm > 1):  # my share of B, into every CTA of the cluster
                        cute.copy(tma_atom_b, tBgB[None, kt], tBsB[None, state.index], tma_bar_ptr=bar,
                                  mcast_mask=cutlass.Int16((1 << cm) - 1))
                    else:
                        cute.copy(tma_atom_b, tBgB[None, kt], tBsB[None, state.index], tma_bar_ptr=bar)
                    if const_expr(use_tma_a):
                        cute.copy(tma_atom_a, tAgA[None, kt], tAsA[None, state.index], tma_bar_ptr=bar)
                if const_expr(self.varlen_k):  # A^T tile: the expert's rows (maybe gathered), zero past f_e
                    self.load_gathered_rows(copy_a, a, sA[None, None, state.index], k_rows, m_start, m_dim,
                                            rows_along_k=True)
                elif const_expr(not use_tma_a):  # gathered rows: cp.async with per-row addresses
                    self.load_gathered_rows(copy_a, a, sA[None, None, state.index], a_rows, kt * bk, k_len,
                                            rows_along_k=False)
                # zero-filled slots are ordinary st.shared: publish them to the async proxy
                cute.arch.fence_proxy("async.shared", space="cta")
                pipe.producer_commit(state)  # arrives when this thread's cp.async have landed
                state.advance()

    @cute.jit
    def prefetch_epi_in(self, epi_in: cute.Tensor, out_row0: Int32, rows_left: Int32, n_start: Int32, tidx: Int32):
        """``epi_prefetch``: bring this tile's part of the epilogue's input into L2 -- its rows
        ``out_row0 ...`` (at most ``rows_left``, one per producer thread) and the ``EPI_IN_COLS``
        input columns of each of its output columns -- with one bulk prefetch per row, so that the
        epilogue's loads find it in L2 instead of waiting on DRAM while the tensor cores idle. The
        values read are the same; only where they come from changes. Whole 16-byte units only (a
        ragged row end is left to the epilogue's own load)."""
        bm, bn, _ = self.tile
        width = epi_in.shape[1]  # input columns per row
        first = n_start * self.EPI_IN_COLS
        span = cutlass.min(bn * self.EPI_IN_COLS, width - first)  # this tile's input columns
        num_bytes = span * (epi_in.element_type.width // 8) // 16 * 16
        if num_bytes > 0:
            for r in cutlass.range(tidx, cutlass.min(bm, rows_left), PRODUCER_THREADS, unroll=1):
                prefetch_l2(epi_in.iterator + cute.crd2idx((out_row0 + r, first), epi_in.layout), num_bytes)

    # ---- Consumers: mainloop + epilogue ----------------------------------------------------------
    @cute.jit
    def consumer(self, a: cute.Tensor, out: cute.Tensor, epi: tuple, tma_stores: tuple, tiled_mma: cute.TiledMma,
                 sA: cute.Tensor, sB: cute.Tensor, storage, epi_layouts: tuple, pipe, sched: tuple, n_dim: Int32,
                 tidx: Int32, wg: Int32):
        """Warpgroups 1-2: for every tile of this CTA (or, ping-ponging, every other one), the WGMMA
        mainloop over its k-tiles, then the epilogue of this warpgroup's rows (``store_tile``).
        ``tma_stores``: the (atom, tensor) of the TMA store to ``out`` and to ``epi_out`` (None where
        unused); ``epi_layouts``: their staging buffers' layouts."""
        cta, num_ctas, rank, n_tiles, m_tiles, num_tiles, tile_offsets, expert_offsets = sched
        bm, bn, bk = self.tile
        cute.arch.setmaxregister_increase(CONSUMER_REGS)
        ctid = tidx - PRODUCER_THREADS  # 0..255 among the MMA threads
        mma_tid = ctid % 128 if const_expr(self.pingpong) else ctid  # my index inside the tiled MMA
        thr_mma = tiled_mma.get_slice(mma_tid - mma_tid % 128)  # my warpgroup's slice for A and B
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        tCcC = tiled_mma.get_slice(mma_tid).partition_C(cute.make_identity_tensor((bm, bn)))
        acc = cute.make_rmem_tensor(tCcC.shape, cutlass.Float32)
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        num_k_blocks = cute.size(tCrA, mode=[2])
        read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        # The epilogue buffers: sC = this warpgroup's rows; tile_view = the tile's buffer (both
        # warpgroups' rows, or mine when ping-ponging) seen as (bm, bn), to be partitioned like
        # the accumulators.
        rows = self.wg_rows()
        epi_layout = epi_layouts[0]
        if const_expr(self.subtiled()):
            # Per output, four swizzled (rows, cols) slots (``subtile_slots``): sC and tCsC are tuples,
            # one entry per output of ``SUBTILE_OUTPUTS``.
            sC = ()
            tCsC = ()
            offset = 0  # the outputs' slots one after the other in the sC region
            for k in cutlass.range_constexpr(len(self.SUBTILE_OUTPUTS)):
                slots_k, view_k = self.subtile_slots(storage.sC.data_ptr() + offset, epi_layouts[k],
                                                     self.SUBTILE_OUTPUTS[k])
                sC = sC + (slots_k,)
                tCsC = tCsC + (tiled_mma.get_slice(mma_tid).partition_C(view_k),)
                offset = offset + cute.cosize(epi_layouts[k].outer)
        elif const_expr(self.uses_tma_store()):
            # Swizzled slots in the TMA's layout: slot wg - 1 holds this warpgroup's rows.
            # Cooperative: tile row r lives in slot r // 64, row r % 64 (the (rows, WG) modes
            # grouped as one row mode); ping-pong: my slot is my whole tile.
            sC_slots = storage.sC.get_tensor(epi_layout.outer, swizzle=epi_layout.inner)  # (rows, bn, WG)
            sC = sC_slots[None, None, wg - 1]
            tile_view = sC
            if const_expr(not self.pingpong):
                tile_view = cute.make_tensor(sC_slots.iterator, cute.group_modes(
                    cute.select(sC_slots.layout, mode=[0, 2, 1]), 0, 2))  # ((rows, WG), bn) = (bm, bn)
            tCsC = tiled_mma.get_slice(mma_tid).partition_C(tile_view)
        elif const_expr(self.transpose_out):
            # The transposed store's staging tile: column-major, m contiguous, one extra 16-byte
            # chunk per column (``epilogue_wg_transposed``). One (bm, bn) tile shared by the two
            # warpgroups (each writes and reads only its own rows), or one per warpgroup when
            # ping-ponging.
            m_pitch = transposed_m_pitch(self.tile, self.out_dtype.width // 8)
            sT_both = cute.make_tensor(storage.sC.data_ptr(), cute.make_layout(
                (2, bm, bn), stride=(bn * m_pitch, 1, m_pitch)))  # (WG, m, n)
            sC = sT_both[wg - 1 if const_expr(self.pingpong) else 0, None, None]  # (bm, bn), m contiguous
            tCsC = tiled_mma.get_slice(mma_tid).partition_C(sC)
        else:
            # Padded row-major buffers (one extra 16-byte chunk per row: conflict-free writes).
            epi_pitch = bn + CHUNK_BYTES * 8 // self.out_dtype.width
            sC_both = cute.make_tensor(storage.sC.data_ptr(), cute.make_layout(
                (2, rows, bn), stride=(rows * epi_pitch, epi_pitch, 1)))  # (WG, rows, cols)
            sC = sC_both[wg - 1, None, None]
            tile_view = cute.make_tensor(sC_both[wg - 1 if const_expr(self.pingpong) else 0, None, None].iterator,
                                         cute.make_layout((bm, bn), stride=(epi_pitch, 1)))
            tCsC = tiled_mma.get_slice(mma_tid).partition_C(tile_view)
        first = cta
        step = num_ctas
        if const_expr(self.pingpong):  # the CTA's tiles alternate between the two warpgroups
            first = cta + (wg - 1) * num_ctas
            step = 2 * num_ctas
        cta_tiles = (num_tiles - cta + num_ctas - 1) // num_ctas  # this CTA's tiles (ping-pong order)
        for t in cutlass.range(first, num_tiles, step, unroll=1):
            if const_expr(self.pingpong):
                # Mainloops take turns in the CTA's tile order: wait until the other warpgroup has
                # waited on every slot of the previous tile. (An mbarrier wait only tells two
                # phases apart, so a warpgroup must not wait on a slot more than one fill ahead.)
                if t > cta:
                    cute.arch.barrier(barrier_id=ORDER_BARRIER + wg - 1, number_of_threads=CONSUMER_THREADS)
                # The other warpgroup consumes the slots of the CTA's previous tile: step over them
                # (the producer fills the slots in the CTA's tile order). In a cluster, t and the
                # k-tile count are the same in both CTAs (t counts units of the cluster; k_other
                # does not depend on the rank), so both CTAs give each slot fill to the same
                # warpgroup, whose warps release it in both (``empty_arrivals``).
                if t - num_ctas >= cta:
                    k_other = self.tile_problem(t - num_ctas, n_tiles, m_tiles, tile_offsets, expert_offsets,
                                                a.shape[1], rank)[6]
                    for _ in cutlass.range((k_other + bk - 1) // bk, unroll=1):
                        read.advance()
                        release.advance()
            expert, m_start, n_start, row0, count, m_dim, k_len = self.tile_problem(
                t, n_tiles, m_tiles, tile_offsets, expert_offsets, a.shape[1], rank)
            out_row0 = row0 + m_start  # varlen-M: the expert's rows of out
            if const_expr(self.varlen_k):
                out_row0 = expert * m_dim + m_start  # varlen-K: expert e's (d, N) block of out
            k_tiles = (k_len + bk - 1) // bk
            # -- mainloop: acc = the tile's product over its k-tiles; one k-tile of WGMMAs stays in
            # flight and the previous slot is freed once its WGMMAs are done. (Inline on purpose:
            # ``read`` and ``release`` advance across tiles in this loop; moved into a helper method,
            # the DSL carried them differently and the generated PTX changed.)
            acc.fill(0.0)
            for kt in cutlass.range(k_tiles, unroll=1):
                pipe.consumer_wait(read)
                cute.arch.fence_proxy("async.shared", space="cta")  # cp.async data -> async proxy
                warpgroup.fence()
                for kb in cutlass.range_constexpr(num_k_blocks):
                    cute.gemm(tiled_mma, acc, tCrA[None, None, kb, read.index], tCrB[None, None, kb, read.index], acc)
                warpgroup.commit_group()
                warpgroup.wait_group(1)  # the previous k-tile's WGMMAs are done: free its slot
                if kt > 0:
                    self.release_slot(pipe, release)
                    release.advance()
                read.advance()
            if const_expr(self.pingpong):  # my mainloop has waited on all its slots: the other's turn
                if (t - cta) // num_ctas < cta_tiles - 1:
                    cute.arch.barrier_arrive(barrier_id=ORDER_BARRIER + 2 - wg, number_of_threads=CONSUMER_THREADS)
            warpgroup.wait_group(0)
            if k_tiles > 0:
                self.release_slot(pipe, release)
                release.advance()
            stage_at = tCsC  # where my accumulators go in the epilogue buffer
            if const_expr(self.lean_epilogue()):
                stage_at = self.staging_view(tiled_mma, mma_tid, tile_view)
            self.store_tile(acc, stage_at, tCcC, out, epi, tma_stores, sC, wg, ctid, expert, m_start, n_start,
                            out_row0, m_dim, n_dim)
        if const_expr(self.uses_tma_store() or self.subtiled()):
            if ctid % 128 < 32:  # the shared memory must outlive the last bulk store's reads
                cute.arch.cp_async_bulk_wait_group(0, read=True)

    @cute.jit
    def staging_view(self, tiled_mma: cute.TiledMma, mma_tid: Int32, tile_view: cute.Tensor):
        """The lean epilogue's ``tCsC``, derived anew for every tile: my accumulators' places in the
        tile's epilogue buffer (``tile_view``). My index passes through a warp shuffle from my own
        lane (an identity the compiler cannot see through), so the swizzled addresses are computed
        here, after the mainloop, instead of being hoisted out of the tile loop into registers that
        the accumulators need (``lean_epilogue``). One shuffle per tile."""
        me = cute.arch.shuffle_sync(mma_tid, cute.arch.lane_idx())
        return tiled_mma.get_slice(me).partition_C(tile_view)

    @cute.jit
    def store_tile(self, acc: cute.Tensor, tCsC, tCcC: cute.Tensor, out: cute.Tensor, epi: tuple,
                   tma_stores: tuple, sC, wg: Int32, ctid: Int32, expert: Int32, m_start: Int32,
                   n_start: Int32, out_row0: Int32, m_dim: Int32, n_dim: Int32):
        """This warpgroup's rows of the tile, out of the accumulators: the transposed varlen-K store,
        the subtiled TMA store (plain or SwiGLU; ``sC`` and ``tCsC`` are then tuples, one entry per
        output), the TMA bulk store, or the ``epilogue_wg`` hook (plain store / fused SwiGLU / dSwiGLU)."""
        if const_expr(self.transpose_out):  # varlen-K into (E, N, d): expert e's rows e*N ...
            self.epilogue_wg_transposed(acc, tCsC, out, sC, wg, ctid, expert * n_dim + n_start, m_start,
                                        m_dim - m_start, n_dim - n_start)
        elif const_expr(self.subtiled()):
            self.epilogue_wg_tma_subtiled(acc, tCsC, tma_stores, (out, epi[0]), sC, wg, ctid, out_row0,
                                          m_dim - m_start, n_start, n_dim - n_start)
        elif const_expr(self.uses_tma_store()):
            self.epilogue_wg_tma(acc, tCsC, tma_stores[0], out, sC, wg, ctid, out_row0,
                                 m_dim - m_start, n_start, n_dim - n_start)
        else:
            self.epilogue_wg(acc, tCsC, tCcC, out, epi, sC, wg, ctid, out_row0, m_dim - m_start, n_start,
                             n_dim - n_start)

    @cute.jit
    def build_tile_table(self, expert_offsets: cute.Tensor, table: cute.Tensor):
        """``table[e]`` = sum over j < e of ceil(f_j / unit rows), for e = 0 .. E: the first scheduler
        unit (``cluster_m`` m-tiles) of each expert, and ``table[E]`` = all units. One warp: lane l sums
        the units of a contiguous chunk of experts, an inclusive warp scan (5 shuffles) turns the
        chunk sums into chunk starts, and each lane writes its chunk's running sums."""
        unit_rows = self.tile[0] * self.cluster_m
        num_experts = expert_offsets.shape[0] - 1
        lane = cute.arch.lane_idx()
        per_lane = (num_experts + 31) // 32
        lo = cutlass.min(lane * per_lane, num_experts)
        hi = cutlass.min(lo + per_lane, num_experts)
        chunk = Int32(0)
        for e in cutlass.range(lo, hi, unroll=1):
            chunk += (expert_offsets[e + 1] - expert_offsets[e] + unit_rows - 1) // unit_rows
        upto = chunk  # inclusive scan over the lanes
        for i in cutlass.range_constexpr(5):
            other = cute.arch.shuffle_sync_up(upto, offset=1 << i)
            if lane >= (1 << i):
                upto = upto + other
        run = upto - chunk
        for e in cutlass.range(lo, hi, unroll=1):
            table[e] = run
            run += (expert_offsets[e + 1] - expert_offsets[e] + unit_rows - 1) // unit_rows
        if lane == 31:
            table[num_experts] = upto

    def empty_arrivals(self) -> int:
        """Arrivals that free a pipeline slot: every MMA thread that read it (both warpgroups, or
        the one warpgroup whose tile it holds when ping-ponging), or with a cluster one lane per
        reading MMA warp per CTA of the cluster (8 x cluster_m cooperative, 4 x cluster_m ping-pong).

        Ping-pong in a cluster relies on both CTAs handing a slot to the *same* warpgroup: the
        scheduler's "CTA" is the cluster (``kernel``), so both CTAs walk the same unit sequence
        t = cluster, cluster + clusters, ...; warpgroup wg takes the units at even / odd positions
        of it in both; ``read`` / ``release`` step over the other warpgroup's units by their
        k-tile count, which depends only on the unit (K for varlen-M, the expert's rows for
        varlen-K), not on the CTA's rank; and the producers fill the slots in that same order. So
        slot i's n-th fill is read by the same warpgroup in both CTAs, whose 4 warps each arrive
        once per CTA. The ORDER_BARRIER turns are per CTA and only delay a warpgroup's waits."""
        readers = CONSUMER_THREADS // 2 if self.pingpong else CONSUMER_THREADS  # threads that read a slot
        if self.cluster_m > 1:
            return readers // 32 * self.cluster_m
        return readers

    @cute.jit
    def release_slot(self, pipe, state):
        """The MMA warps are done reading a slot: tell the producer(s) that may refill it (called by
        the warps that read it: both warpgroups, or the slot's warpgroup when ping-ponging)."""
        if const_expr(self.cluster_m == 1):
            pipe.consumer_release(state)
        else:  # lane r of each MMA warp arrives on the slot's empty barrier in the CTA of rank r
            lane = cute.arch.lane_idx()
            if lane < self.cluster_m:
                pipe.sync_object_empty.arrive(state.index, lane)

    @cute.jit
    def resolve_k_rows(self, a_coord: cute.Tensor, gather_idx: cute.Tensor, rows: cute.Tensor, row0: Int32,
                       kt: Int32, count: Int32):
        """varlen-K: ``rows[j]`` = the global row of A for this thread's k position j of k-tile ``kt``
        (the expert's row ``row0 + k``, through ``gather_idx`` when gathered), -1 past its f_e rows."""
        bk = self.tile[2]
        for j in cutlass.range_constexpr(cute.size(rows)):
            k = kt * bk + a_coord[0, 0, j][1]
            rows[j] = -1
            if k < count:
                rows[j] = gather_idx[row0 + k] if const_expr(self.gather) else row0 + k

    @cute.jit
    def load_gathered_rows(self, tiled_copy: cute.TiledCopy, g2d: cute.Tensor, s_stage: cute.Tensor,
                           rows: cute.Tensor, col0: Int32, col_limit: Int32, rows_along_k: cutlass.Constexpr):
        """One A tile from pre-resolved global rows: 16-byte cp.async per (row, chunk), zeros where
        the row is past the expert (``rows[.] < 0``) or the chunk is past ``col_limit``.

        varlen-M (K-major tile): my copies' mn positions are the rows (``rows[i]``), k the columns.
        varlen-K (``rows_along_k``, M-major A^T tile): my copies' k positions are the rows
        (``rows[j]``), mn (a slice of d) the columns."""
        tidx, _, _ = cute.arch.thread_idx()
        thr_copy = tiled_copy.get_slice(tidx)
        t_smem = thr_copy.partition_D(s_stage)  # (CPY, CPY_M, CPY_K)
        t_coord = thr_copy.partition_S(cute.make_identity_tensor((cute.size(s_stage, mode=[0]),
                                                                  cute.size(s_stage, mode=[1]))))
        g_chunks = cute.logical_divide(g2d, (None, CHUNK))  # (rows, (8, cols/8))
        for i in cutlass.range_constexpr(cute.size(t_smem, mode=[1])):
            for j in cutlass.range_constexpr(cute.size(t_smem, mode=[2])):
                row = rows[j] if const_expr(rows_along_k) else rows[i]
                col = col0 + t_coord[0, i, j][0 if const_expr(rows_along_k) else 1]
                dst = t_smem[None, i, j]
                if row >= 0 and col < col_limit:
                    src = g_chunks[row, (None, col // CHUNK)]
                    cute.copy(tiled_copy, cute.make_tensor(src.iterator, cute.make_layout(dst.shape)), dst)
                else:
                    dst.fill(0)

    @cute.jit
    def epilogue_wg(self, acc: cute.Tensor, tCsC: cute.Tensor, tCcC: cute.Tensor, out: cute.Tensor, epi: tuple,
                    sC: cute.Tensor, wg: Int32, ctid: Int32, out_row0: Int32, rows_left: Int32, n_start: Int32,
                    cols_left: Int32):
        """One MMA warpgroup stores its rows (64, or the whole tile when ping-ponging): registers ->
        padded smem -> 16-byte masked global stores.

        The epilogue *hook* of the production kernel. A fused epilogue is a subclass that overrides
        this method only; it gets ``tCcC`` (each accumulator's (row, col) in the tile) and the
        tensors ``epi = (epi_out, epi_in, row_in, row_out)``: a second 16-bit output, a 16-bit input
        with the output's rows, an fp32 value per output row and an fp32 (rows, n-tiles) output
        (placeholders when unused, as here; see ``SwiGLUEpilogue`` and ``DSwiGLUEpilogue``)."""
        bm, bn, _ = self.tile
        self.stage_tile(acc, tCsC, wg)
        self.copy_out_rows(sC, bn, out, out_row0, n_start, rows_left, cols_left, wg, ctid)

    @cute.jit
    def epilogue_wg_tma(self, acc: cute.Tensor, tCsC: cute.Tensor, tma_store: tuple, out: cute.Tensor,
                        sC: cute.Tensor, wg: Int32, ctid: Int32, out_row0: Int32, rows_left: Int32, n_start: Int32,
                        cols_left: Int32):
        """The plain store, asynchronous: registers -> swizzled smem -> one TMA bulk store per warpgroup.

        The MMA warps only write shared memory and go straight back to the next tile's mainloop;
        the TMA unit drains the buffer to global memory while they multiply (the stores of the
        shared-memory copy-out in ``epilogue_wg`` keep the warps busy until the data have left the
        SM, which on short-K problems costs as long as the multiply). Before a buffer is refilled,
        the thread that issued its last bulk store waits until that store has *read* it."""
        tma_atom_c, tma_c = tma_store
        bm, bn, _ = self.tile
        rows = self.wg_rows()
        row_off = self.wg_row_offset(wg)
        first_warp = ctid % 128 < 32  # the warp that issues (and so must wait for) the bulk stores
        # Phase 1: my buffer is free once my previous bulk store has read it.
        if first_warp:
            cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)
        # Phase 2: registers -> shared memory through the tile_value hook; the generic-proxy writes
        # are then made visible to the TMA unit (async proxy).
        r_out = cute.make_rmem_tensor_like(acc, self.out_dtype)
        for i in cutlass.range_constexpr(cute.size(acc)):
            r_out[i] = self.tile_value(acc[i])
        cute.autovec_copy(r_out, tCsC)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)
        # Phase 3: a full warpgroup tile -> one bulk store (columns past N clipped by TMA); the
        # expert's ragged last rows -> masked 16-byte stores from the same buffer.
        if row_off + rows <= rows_left:
            if first_warp:
                gC = cute.local_tile(cute.domain_offset((out_row0 + row_off, n_start), tma_c), (rows, bn), (0, 0))
                tCs, tCg = cpasync.tma_partition(tma_atom_c, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2),
                                                 cute.group_modes(gC, 0, 2))
                cute.copy(tma_atom_c, tCs, tCg)
                cute.arch.cp_async_bulk_commit_group()
        else:
            self.copy_out_rows(sC, bn, out, out_row0, n_start, rows_left, cols_left, wg, ctid)

    @cute.jit
    def epilogue_wg_tma_subtiled(self, acc: cute.Tensor, tCsC: tuple, tma_stores: tuple, dsts: tuple,
                                 sC_slots: tuple, wg: Int32, ctid: Int32, out_row0: Int32, rows_left: Int32,
                                 n_start: Int32, cols_left: Int32):
        """The TMA store, subtiled (``epi_subtile`` = S columns): my (64, bn) rows leave as bn / S
        subtiles of (64, S) through two staging buffers that take turns.

        One loop for every output of ``SUBTILE_OUTPUTS`` (``tCsC``, ``tma_stores``, ``dsts`` and
        ``sC_slots`` hold one entry per output, ``out`` first): the plain store sends ``out``; the
        SwiGLU epilogue sends H to ``out`` and A = SwiGLU(H) to ``epi_out``, whose subtile j is
        (64, S / 2), the columns of H's subtile j. What a subtile holds is the ``stage_subtile`` hook.

        As the reference Hopper epilogues (CUTLASS sm90 TMA epilogue, the CuTe-DSL dense GEMM's
        ``epi_tile`` loop): per subtile j, wait until buffer j % 2 is free, write the subtile's
        values into it, fence them to the async proxy, and one thread issues the bulk stores of
        (64, S) (one per output, one commit group per subtile). Waiting for "at most one bulk group
        still reading" (not zero) lets the stores of subtile j - 1, from the other buffers, run while
        subtile j is written. The buffers need 4 x 64 x S elements per output of full width instead
        of 2 x 64 x (bn + pad): the rest becomes pipeline stages.

        Ragged rows (the expert's last tile): the same loop, but each subtile leaves by masked
        16-byte stores from its buffers (``copy_out_rows`` on each (64, S / d) slot), and phase 1
        waits for *every* bulk store: no store is committed in such a tile, so the newest pending
        one may belong to the previous tile and read the very buffer about to be refilled."""
        bm, bn, _ = self.tile
        sub = self.epi_subtile
        outputs = self.SUBTILE_OUTPUTS  # tile columns per column of each output: (1,) or (1, 2)
        rows = self.wg_rows()
        row_off = self.wg_row_offset(wg)
        first_warp = ctid % 128 < 32  # the warp that issues (and so must wait for) the bulk stores
        full = row_off + rows <= rows_left  # all my rows belong to the expert: bulk stores
        # My accumulators and their staging addresses, split along the fragment's value mode: with
        # WGMMA's ((2, 2, bn / 8), 1, 1) fragment, each run of S / 2 values covers S / 8 column
        # groups of 8, i.e. exactly one subtile: ((values of a subtile, subtile), 1, 1).
        acc_sub = cute.logical_divide(acc, (sub // 2,))
        smem_sub = ()
        g_sub = ()  # per output: (rows, S / d, subtile) view of my rows of its TMA tensor
        for k in cutlass.range_constexpr(len(outputs)):
            smem_sub = smem_sub + (cute.logical_divide(tCsC[k], (sub // 2,)),)
            g_sub = g_sub + (cute.local_tile(cute.domain_offset((out_row0 + row_off, n_start // outputs[k]),
                                                                tma_stores[k][1]),
                                             (rows, sub // outputs[k]), (0, None)),)
        for j in cutlass.range_constexpr(bn // sub):
            # this subtile's buffer of every output: (rows, S / d)
            s_bufs = tuple(sC_slots[k][None, None, 2 * (wg - 1) + j % 2] for k in range(len(outputs)))
            # Phase 1: buffer j % 2 is free (its last bulk stores have read it).
            if first_warp:
                if full:
                    cute.arch.cp_async_bulk_wait_group(1, read=True)
                else:
                    cute.arch.cp_async_bulk_wait_group(0, read=True)
            cute.arch.barrier(barrier_id=wg, number_of_threads=128)
            # Phase 2: subtile j's values -> its buffers (the ``stage_subtile`` hook), then visible
            # to the TMA unit.
            self.stage_subtile(acc_sub[(None, j), None, None],
                               tuple(smem_sub[k][(None, j), None, None] for k in range(len(outputs))))
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier(barrier_id=wg, number_of_threads=128)
            # Phase 3: one bulk store of (rows, S / d) per output (TMA clips columns past N) and one
            # commit group for the subtile, or masked stores.
            if full:
                if first_warp:
                    for k in cutlass.range_constexpr(len(outputs)):
                        atom = tma_stores[k][0]
                        tCs, tCg = cpasync.tma_partition(atom, 0, cute.make_layout(1),
                                                         cute.group_modes(s_bufs[k], 0, 2),
                                                         cute.group_modes(g_sub[k][None, None, j], 0, 2))
                        cute.copy(atom, tCs, tCg)
                    cute.arch.cp_async_bulk_commit_group()
            else:
                for k in cutlass.range_constexpr(len(outputs)):
                    cols = sub // outputs[k]
                    self.copy_out_rows(s_bufs[k], cols, dsts[k], out_row0,
                                       n_start // outputs[k] + j * cols, rows_left, cols_left // outputs[k] - j * cols,
                                       wg, ctid)

    @cute.jit
    def stage_subtile(self, acc_j: cute.Tensor, smem_j: tuple):
        """Phase 2 of the subtiled epilogue, the hook of the fused epilogues: subtile j's accumulators
        -> ``out_dtype`` registers (``tile_value``) -> ``out``'s staging buffer (``smem_j[0]``: this
        thread's addresses in it). Returns the converted registers (the SwiGLU epilogue builds A
        from them)."""
        r_out = cute.make_rmem_tensor_like(acc_j, self.out_dtype)
        for i in cutlass.range_constexpr(cute.size(acc_j)):
            r_out[i] = self.tile_value(acc_j[i])
        cute.autovec_copy(r_out, smem_j[0])
        return r_out

    @cute.jit
    def copy_out_rows(self, sC: cute.Tensor, cols: cutlass.Constexpr[int], dst: cute.Tensor, dst_row0: Int32,
                      dst_col0: Int32, rows_left: Int32, cols_left: Int32, wg: Int32, ctid: Int32):
        """This warpgroup's staged (rows, cols) tile -> ``dst[dst_row0 + row_off + m, dst_col0 + c]``, one
        16-byte chunk per thread per step, masked to the expert's rows and the matrix's columns."""
        half = self.wg_rows()
        lt = ctid % 128  # thread index inside the warpgroup
        row_off = self.wg_row_offset(wg)  # first tile row owned by this warpgroup
        elems = CHUNK_BYTES * 8 // self.out_dtype.width
        chunks_per_row = cols // elems
        steps = half * chunks_per_row // 128
        if const_expr(self.lean_epilogue()):  # a rolled loop: no addresses hoisted (``lean_epilogue``)
            for it in cutlass.range(steps, unroll=1):
                self.copy_out_chunk(sC, dst, it * 128 + lt, chunks_per_row, dst_row0, dst_col0, row_off, rows_left,
                                    cols_left)
        else:
            for it in cutlass.range_constexpr(steps):
                self.copy_out_chunk(sC, dst, it * 128 + lt, chunks_per_row, dst_row0, dst_col0, row_off, rows_left,
                                    cols_left)

    @cute.jit
    def copy_out_chunk(self, sC: cute.Tensor, dst: cute.Tensor, c: Int32, chunks_per_row: cutlass.Constexpr[int],
                       dst_row0: Int32, dst_col0: Int32, row_off: Int32, rows_left: Int32, cols_left: Int32):
        """Chunk ``c`` (row-major over the staged rows' 16-byte chunks) of ``copy_out_rows``: staged row m,
        columns q : q + 8 (16-bit; 4 for fp32) -> ``dst[dst_row0 + row_off + m, dst_col0 + q]``, if tile row
        row_off + m is below ``rows_left`` and q below ``cols_left``."""
        elems = CHUNK_BYTES * 8 // self.out_dtype.width
        m = c // chunks_per_row
        q = (c % chunks_per_row) * elems
        if row_off + m < rows_left and q < cols_left:
            src = cute.local_tile(sC, (1, elems), (m, q // elems))
            cute.autovec_copy(src, cute.local_tile(dst, (1, elems), (dst_row0 + row_off + m, (dst_col0 + q) // elems)))

    @cute.jit
    def stage_tile(self, acc: cute.Tensor, tCsC: cute.Tensor, wg: Int32):
        """Registers -> this warpgroup's part of the padded staging tile (rows, or columns for the
        transposed store), through the ``tile_value`` hook."""
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)  # previous tile's copy-out is done
        # Convert in registers, then one vectorized copy into this thread's slots of the padded tile
        # (row-major: pairs of adjacent columns -> 32-bit shared stores for 16-bit outputs; the
        # transposed store's column-major tile takes one 16-bit store per value).
        r_out = cute.make_rmem_tensor_like(acc, self.out_dtype)
        for i in cutlass.range_constexpr(cute.size(acc)):
            r_out[i] = self.tile_value(acc[i])
        cute.autovec_copy(r_out, tCsC)
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)

    @cute.jit
    def epilogue_wg_transposed(self, acc: cute.Tensor, tCsC: cute.Tensor, out: cute.Tensor, sC: cute.Tensor,
                               wg: Int32, ctid: Int32, out_row0: Int32, m_start: Int32, rows_left: Int32,
                               cols_left: Int32):
        """varlen-K stored transposed: tile element (m, n) goes to ``out[out_row0 + n, m_start + m]``.

        Used for dW2 = (dO_e^T A'_e)^T: the kernel reduces with the gathered dO as its A operand
        (only A can be gathered), and this store writes the (n, d) orientation the layer wants, so
        no separate transpose pass over E*n*d elements is needed.

        1. Stage: the accumulators go into a *column-major* tile ``sC`` (m contiguous; the pitch
           has one spare 16-byte chunk, so the 32 lanes' 16-bit writes of one register -- 8 rows m
           x 4 column pairs n -- land in 16 different banks).
        2. Copy out: each thread moves one 16-byte run of 8 consecutive m of one column n, from
           shared memory to row n of out. A warp covers whole columns (this warpgroup's 64 or 128
           rows m are 128 or 256 contiguous bytes of out), so every warp store writes full
           128-byte lines: coalesced, where a row-major staging tile would give each lane its own
           line (a warp store touching 32 lines).
        """
        bm, bn, _ = self.tile
        half = self.wg_rows()
        lt = ctid % 128
        row_off = self.wg_row_offset(wg)
        elems = CHUNK_BYTES * 8 // self.out_dtype.width  # consecutive m per 16-byte store
        runs_per_col = half // elems  # this warpgroup's rows of one column n, in 16-byte runs
        self.stage_tile(acc, tCsC, wg)
        for it in cutlass.range_constexpr(half * bn // elems // 128):
            c = it * 128 + lt
            n = c // runs_per_col
            m = row_off + (c % runs_per_col) * elems  # first row of this run, inside the tile
            if m < rows_left and n < cols_left:  # d is a multiple of 8: whole runs
                src = cute.local_tile(sC[None, n], (elems,), (m // elems,))
                dst = cute.local_tile(out[out_row0 + n, None], (elems,), ((m_start + m) // elems,))
                cute.autovec_copy(src, dst)


def transposed_m_pitch(tile: tuple[int, int, int], out_bytes: int) -> int:
    """Elements between two columns of the transposed store's column-major staging tile: the tile's
    bm rows and one spare 16-byte chunk (conflict-free 16-bit writes, ``epilogue_wg_transposed``)."""
    return tile[0] + CHUNK_BYTES // out_bytes


def transposed_staging_elems(tile: tuple[int, int, int], pingpong: bool, out_bytes: int) -> int:
    """Elements of the transposed varlen-K store's staging: a column-major (bm, bn) tile
    (``transposed_m_pitch``), shared by the two warpgroups or one per warpgroup (ping-pong)."""
    return (2 if pingpong else 1) * tile[1] * transposed_m_pitch(tile, out_bytes)


def subtile_staging_elems(rows: int, epi_subtile: int, outputs: tuple[int, ...] = (1,)) -> int:
    """Elements of the subtiled epilogue's staging buffers: per output (``SUBTILE_OUTPUTS``: tile
    columns per column of the output), two (rows, epi_subtile / d) buffers per MMA warpgroup."""
    return sum(2 * 2 * rows * (epi_subtile // d) for d in outputs)  # (warpgroups, buffers, rows, columns)


def ws_stages(tile: tuple[int, int, int], out_bytes: int, smem_bytes: int = SMEM_BYTES, pingpong: bool = False,
              epi_subtile: int | None = None, subtile_outputs: tuple[int, ...] = (1,), tma_store: bool = True,
              transpose_out: bool = False) -> int:
    """Stages that fit next to the two warpgroups' epilogue buffers (16-bit operands; each buffer is
    a whole tile when ping-ponging; with ``epi_subtile``, two (64, epi_subtile / d) buffers per
    warpgroup and output, ``subtile_outputs`` = the epilogue's ``SUBTILE_OUTPUTS``: (1,) for the
    plain store, (1, 2) for SwiGLU's H and A). A lean kernel (``lean_epilogue``, the ping-pong
    128 x 192 tile) with the TMA store (``tma_store``) allocates its buffers without the row padding.
    ``transpose_out``: the transposed varlen-K store's column-major staging (``transposed_staging_elems``)
    where it is larger."""
    bm, bn, bk = tile
    per_stage = (bm + bn) * bk * 2
    reserved = 2048 + 4 * (TABLE_EXPERTS + 1)  # barriers and alignment, the expert tile table
    epi = epilogue_smem_bytes(tile, out_bytes) * (2 if pingpong else 1)
    if lean_tile(tile, pingpong) and tma_store:
        epi = 2 * (bm if pingpong else bm // 2) * bn * out_bytes
    if epi_subtile is not None:
        epi = subtile_staging_elems(bm // 2, epi_subtile, subtile_outputs) * out_bytes
    if transpose_out:
        epi = max(epi, transposed_staging_elems(tile, pingpong, out_bytes) * out_bytes)
    return (smem_bytes - reserved - epi) // per_stage
