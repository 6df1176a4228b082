"""The fused MoE epilogues of the production grouped GEMM (``ws.GroupedGemmWS``'s ``epilogue_wg`` hook).

* ``SwiGLUEpilogue``: the up-projection stores H and A = SwiGLU(H) from the same registers.
* ``DSwiGLUEpilogue``: the reduced-memory backward's dH kernel: dA' = dO W2^T never leaves the
  registers; the epilogue loads H and the row's score and stores dH, A' = s*A and dS partials.
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass
from sonic_learn.fast.grouped_gemm.sm90 import CHUNK_BYTES
from sonic_learn.fast.grouped_gemm.v1 import CHUNK
from sonic_learn.fast.grouped_gemm.ws import GroupedGemmWS
from sonic_learn.fast.primitives import dswiglu, swiglu_parts

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
from cutlass import Int32, const_expr  # noqa: E402

class SwiGLUEpilogue(GroupedGemmWS):
    """The up-projection with SwiGLU fused into its epilogue (paper Section 3, forward).

    The GEMM computes H = X_gathered @ W1 with W1's columns interleaved (gate = even column,
    up = odd column). A WGMMA accumulator fragment holds pairs of *adjacent* columns of one row in
    neighbouring registers, so every thread owns whole (gate, up) pairs: it can form
    A[r, j] = up * silu(gate) without talking to any other thread. The epilogue therefore
    (1) stores H as usual (it is cached for the backward) and (2) writes A (P, n) -- ``epi_out``
    -- from the same registers, staged through the same shared-memory buffer. A is computed
    from the *rounded* H values, exactly like ``moe_kernels.SwiGLUForward`` on the stored H, so the
    fused and unfused forwards agree bit for bit and the backward (which recomputes A from H)
    sees the same A. The separate SwiGLU pass, its re-read of H and its launch disappear.

    Two store paths: by default (``epilogue_wg``) H and then A go out of one padded whole-tile
    buffer by 16-byte stores, which keep the MMA warps busy until the data have left the SM. With
    ``epi_subtile`` = S, the production kernel's subtiled TMA epilogue runs instead
    (``epilogue_wg_tma_subtiled``, with ``stage_subtile`` below): each (64, S) subtile of H and
    its (64, S / 2) subtile of A leave by TMA bulk stores (to ``out`` and ``epi_out``) from two
    small pairs of staging buffers, and the freed shared memory becomes pipeline stages.
    """

    TMA_STORE = False  # the whole-tile path: its own stores (two outputs) from the padded buffer
    SUBTILE_OUTPUTS = (1, 2)  # subtiled: H to ``out`` (S columns per subtile), A to ``epi_out`` (S / 2)

    @cute.jit
    def epilogue_wg(self, acc: cute.Tensor, tCsC: cute.Tensor, tCcC: cute.Tensor, out: cute.Tensor, epi: tuple,
                    sC: cute.Tensor, wg: Int32, ctid: Int32, out_row0: Int32, rows_left: Int32, n_start: Int32,
                    cols_left: Int32):
        bm, bn, _ = self.tile
        half = self.wg_rows()
        row_off = self.wg_row_offset(wg)
        # Phase 1: H, exactly as the plain epilogue.
        self.stage_tile(acc, tCsC, wg)
        self.copy_out_rows(sC, bn, out, out_row0, n_start, rows_left, cols_left, wg, ctid)
        # Phase 2: A = up * silu(gate) for this thread's column pairs, into the same buffer
        # (re-laid out as (64, bn/2) rows) once every thread has finished copying H out.
        a_cols = bn // 2
        a_pitch = a_cols + CHUNK_BYTES * 8 // self.out_dtype.width
        sA = cute.make_tensor(sC.iterator, cute.make_layout((half, a_cols), stride=(a_pitch, 1)))
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)
        for i in cutlass.range_constexpr(cute.size(acc) // 2):
            m, n = tCcC[2 * i]  # the gate column (even); 2 * i + 1 is its up column
            g = acc[2 * i].to(self.out_dtype).to(cutlass.Float32)  # the rounded H values
            u = acc[2 * i + 1].to(self.out_dtype).to(cutlass.Float32)
            sA[m - row_off, n // 2] = swiglu_parts(g, u)[2].to(self.out_dtype)  # as SwiGLUForward
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)
        self.copy_out_rows(sA, a_cols, epi[0], out_row0, n_start // 2, rows_left, cols_left // 2, wg, ctid)

    @cute.jit
    def stage_subtile(self, acc_j: cute.Tensor, smem_j: tuple):
        """Phase 2 of the subtiled epilogue for SwiGLU: subtile j of H, then the matching subtile of A.

        ``acc_j`` holds this thread's accumulators of the subtile, (gate, up) pairs in neighbouring
        values (2i, 2i + 1: one row, columns 2c and 2c + 1); ``smem_j`` = this thread's addresses in
        H's and A's staging buffers, where both values of a pair map to A's column c."""
        # H: rounded to the output dtype and staged, exactly as the plain store (reference: h = x W1).
        h = GroupedGemmWS.stage_subtile(self, acc_j, smem_j)
        # A = up * silu(gate) from the *rounded* H values, as the whole-tile path and SwiGLUForward
        # (reference: ``swiglu``, gate = h[:, 0::2], up = h[:, 1::2]); one A value per pair.
        s_a = smem_j[1]
        for i in cutlass.range_constexpr(cute.size(acc_j) // 2):
            g = h[2 * i].to(cutlass.Float32)
            u = h[2 * i + 1].to(cutlass.Float32)
            s_a[2 * i] = swiglu_parts(g, u)[2].to(self.out_dtype)
        return h


PREFETCH = 16  # H loads in flight per thread in the dSwiGLU epilogue (16 x 8 bytes = 32 registers)


class DSwiGLUEpilogue(GroupedGemmWS):
    """The reduced-memory backward's dH kernel (paper Appendix C): one GEMM, everything else in its epilogue.

    The GEMM is dA' = dO[token of row] @ W2^T (gathered dO, W2 read K-major, N = n). Instead of
    storing dA', the epilogue takes each thread's accumulators (rounded to the 16-bit dtype, as the
    unfused path stores dA') and, with H loaded for the same rows and the row's score s:

    * recomputes A = up * silu(gate) from H (never cached), per (gate, up) pair;
    * dS partial = sum over the tile's columns of dA' * A: the 4 lanes of a quad hold one row's
      columns, so a 2-step shuffle finishes the tile's part; the quad's first lane writes it to
      ``row_out[row, n_tile]`` (deterministic: the host sums the n-tiles in a fixed order);
    * A' = s * A, the dW2 operand, is staged in shared memory and stored like any output (``out``);
    * dH = dSwiGLU(H, s * dA') goes straight from registers to ``epi_out`` (P, 2n): a thread's two
      neighbouring accumulator columns j, j+1 are H columns 2j .. 2j+3, one 8-byte load of H and
      one 8-byte store of dH, and a quad covers a whole 32-byte sector.

    The arithmetic is ``moe_kernels.SwiGLUBackward``'s (the same helpers, ``swiglu_parts`` and
    ``dswiglu``), so dH and A' match the unfused pass's (tested: within 1 ulp, almost all
    bit-equal; the compiler may contract a multiply-add differently in the two kernels). Tensors: ``epi_in`` = H (P, 2n), ``row_in`` = the score of each
    grouped row (P,) fp32, ``row_out`` = (P, ceil(n / tile_n)) fp32.
    """

    TMA_STORE = False  # its own stores (A' from the padded buffer, dH straight from registers)
    SUBTILE_OUTPUTS = ()  # ignores epi_subtile: keeps the whole-tile buffer
    EPI_IN_COLS = 2  # reads H: a (gate, up) pair of columns per column of dA' (``epi_prefetch``)

    @cute.jit
    def epilogue_wg(self, acc: cute.Tensor, tCsC: cute.Tensor, tCcC: cute.Tensor, out: cute.Tensor, epi: tuple,
                    sC: cute.Tensor, wg: Int32, ctid: Int32, out_row0: Int32, rows_left: Int32, n_start: Int32,
                    cols_left: Int32):
        dh, h, row_scores, ds_part = epi
        bm, bn, _ = self.tile
        row_off = self.wg_row_offset(wg)
        dtype = self.out_dtype
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)  # previous tile's copy-out is done
        # The accumulator fragment of a WGMMA (PTX layout): index i = v0 + 2 * v1 + 4 * q (+ bn / 2
        # per further 64-row block) holds row r0 + 8 * v1 and column 8 * q + 2 * (lane % 4) + v0. So
        # (i, i + 1) for even i are two neighbouring columns of one row.
        # A thread holds 2 rows per 64-row MMA block (2 blocks when one warpgroup owns the whole tile):
        # row slot r of pair p is p % 2 + 2 * (p // (bn / 4)), and slot r's first accumulator is
        # index 2 * (r % 2) + (bn / 2) * (r // 2).
        slots = 2 * (cute.size(acc) // (bn // 2))
        dots = cute.make_rmem_tensor((slots,), cutlass.Float32)
        dots.fill(0.0)
        scores = cute.make_rmem_tensor((slots,), cutlass.Float32)  # s of each of the thread's rows
        for r in cutlass.range_constexpr(slots):
            m, _ = tCcC[2 * (r % 2) + (bn // 2) * (r // 2)]
            scores[r] = row_scores[out_row0 + m] if m < rows_left else cutlass.Float32(0.0)
        # H is read in groups of PREFETCH pairs: all loads of a group are issued before any is used,
        # so PREFETCH loads are in flight at once instead of one load latency per pair.
        pairs = cute.size(acc) // 2
        rh = cute.make_rmem_tensor(cute.make_layout((PREFETCH, 1, 4), stride=(4, 4, 1)), dtype)  # pairs contiguous  # gate_j, up_j, gate_j+1, up_j+1 per pair
        for grp in cutlass.range_constexpr(pairs // PREFETCH):
            for k in cutlass.range_constexpr(PREFETCH):  # phase 1: issue the group's loads
                m, j = tCcC[2 * (grp * PREFETCH + k)]  # tile row, first of two tile columns (even)
                if m < rows_left and j < cols_left:
                    cute.autovec_copy(cute.local_tile(h, (1, 4), (out_row0 + m, (n_start + j) // 2)),
                                      rh[k, None, None])
            for k in cutlass.range_constexpr(PREFETCH):  # phase 2: the math, dH store, A' staging
                p = grp * PREFETCH + k
                i = 2 * p
                m, j = tCcC[i]
                slot = p % 2 + 2 * (p // (bn // 4))
                if m < rows_left and j < cols_left:
                    s = scores[slot]
                    rdh = cute.make_rmem_tensor((1, 4), dtype)
                    for v in cutlass.range_constexpr(2):
                        g = rh[k, 0, 2 * v].to(cutlass.Float32)
                        u = rh[k, 0, 2 * v + 1].to(cutlass.Float32)
                        sig, silu, act = swiglu_parts(g, u)  # A, recomputed from H
                        grad = acc[i + v].to(dtype).to(cutlass.Float32)  # dA', rounded as when stored
                        dots[slot] = dots[slot] + grad * act  # dS partial: <dA', A>
                        grad = grad * s  # dA = s * dA'
                        act = act * s  # A' = s * A
                        dgate, dup = dswiglu(g, u, sig, silu, grad)
                        rdh[0, 2 * v] = dgate.to(dtype)
                        rdh[0, 2 * v + 1] = dup.to(dtype)
                        sC[m - row_off, j + v] = act.to(dtype)
                    cute.autovec_copy(rdh, cute.local_tile(dh, (1, 4), (out_row0 + m, (n_start + j) // 2)))
        # dS: finish each row's tile sum across its quad, one write per (row, n-tile).
        lane = cute.arch.lane_idx()
        for r in cutlass.range_constexpr(slots):
            d = dots[r]
            d = d + cute.arch.shuffle_sync_bfly(d, offset=1)
            d = d + cute.arch.shuffle_sync_bfly(d, offset=2)
            m, _ = tCcC[2 * (r % 2) + (bn // 2) * (r // 2)]
            if lane % 4 == 0 and m < rows_left:
                ds_part[out_row0 + m, n_start // bn] = d
        # A' = s * A: the staged tile goes out like any output tile.
        cute.arch.barrier(barrier_id=wg, number_of_threads=128)
        self.copy_out_rows(sC, bn, out, out_row0, n_start, rows_left, cols_left, wg, ctid)
