"""Grouped GEMM on Hopper, step 2 of the ladder: the v1 kernel with a shared-memory epilogue and wider tiles.

What changes from ``v1`` (and why, paper Section 3 / Appendix B "IO"):

* **Epilogue through shared memory.** v1 stores each accumulator element straight from registers:
  a WGMMA accumulator fragment scatters a thread's values over 16 rows, so the stores are 2-byte
  scalars and the write traffic is badly coalesced; on the down-projection (short K, wide N) that
  store dominates. Here the converted tile is first written to shared memory (a padded row-major
  tile, so the fragment writes are bank-conflict free), then every thread copies whole 16-byte
  row chunks to global memory, masked by the expert's valid rows and the matrix's columns. The
  expert's ragged last tile is still masked, never padded.
* **Epilogue hook.** ``Epilogue.tile_value`` is the one place that turns an fp32 accumulator into
  the stored value; the MoE layer subclasses it for SwiGLU / dSwiGLU / row scaling
  without touching the mainloop.
* **Tile shape is a parameter** (128 x 128 or 128 x 256, with as many stages as fit).
"""

from __future__ import annotations

from sonic_learn.fast._cute import import_cutlass
from sonic_learn.fast.grouped_gemm.v1 import CHUNK, THREADS, GroupedGemmV1

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402
from cutlass import Int32  # noqa: E402

CHUNK_BYTES = 16  # one vectorized global store


class GroupedGemmSm90(GroupedGemmV1):
    """GroupedGemmV1's mainloop + a shared-memory-staged, coalesced, masked epilogue."""

    def tile_value(self, acc_value):
        """Epilogue hook: fp32 accumulator value -> stored value (identity + dtype conversion here)."""
        return acc_value.to(self.out_dtype)

    @cute.jit
    def epilogue(self, acc: cute.Tensor, tCcC: cute.Tensor, out: cute.Tensor, smem_base: cute.Pointer,
                 out_row0: Int32, rows_left: Int32, n_start: Int32, cols_left: Int32):
        bm, bn, _ = self.tile
        tidx, _, _ = cute.arch.thread_idx()
        elems = CHUNK_BYTES * 8 // self.out_dtype.width  # elements per 16-byte chunk
        pitch = bn + elems  # one extra chunk per row: fragment writes hit 32 distinct banks
        sC = cute.make_tensor(cute.recast_ptr(smem_base, dtype=self.out_dtype),
                              cute.make_layout((bm, bn), stride=(pitch, 1)))  # (bm, bn)
        # Step 1: every warpgroup is done reading A/B tiles, so their shared memory can be reused.
        cute.arch.sync_threads()
        # Step 2: registers -> shared memory, through the epilogue hook.
        for i in cutlass.range_constexpr(cute.size(acc)):
            m, n = tCcC[i]
            sC[m, n] = self.tile_value(acc[i])
        cute.arch.sync_threads()
        # Step 3: shared -> global, one 16-byte chunk per thread per step, rows masked to the expert.
        chunks_per_row = bn // elems
        for it in cutlass.range_constexpr(bm * chunks_per_row // THREADS):
            c = it * THREADS + tidx
            m = c // chunks_per_row
            q = (c % chunks_per_row) * elems
            if m < rows_left and q < cols_left:
                src = cute.local_tile(sC, (1, elems), (m, q // elems))
                dst = cute.local_tile(out, (1, elems), (out_row0 + m, (n_start + q) // elems))
                cute.autovec_copy(src, dst)


def epilogue_smem_bytes(tile: tuple[int, int, int], out_bytes: int) -> int:
    bm, bn, _ = tile
    return bm * (bn + CHUNK_BYTES // out_bytes) * out_bytes


# ================================================================================================
# Step 3: warp specialization + a persistent tile scheduler
# ================================================================================================
