"""Fast top-k on Hopper: a bitonic register kernel and a radix-select kernel, written in CuTe-DSL.

What this teaches (paper Section 4, "the router's top-K"; reference: ``sonic_learn.reference.topk``):

* **Bitonic top-k (SonicMoE's kernel).** A row of N scores is spread over a small group of
  threads (1..32 lanes of one warp). Each value is turned into one *key* that also carries its
  column, so a single integer max/min compares values and breaks ties at once. Every thread sorts
  its registers in chunks with a bitonic network, keeps a running top-k, and the lanes of a row
  then merge their top-k lists with warp shuffles. Nothing goes through shared memory: the row is
  read once from HBM and the k winners are written once.
* **Radix select (the classic algorithm; ``torch.topk`` is one too, with other digit widths: see
  ``sonic_learn.reference.topk``).** One warp per row builds 8-bit
  digit histograms in shared memory, narrows digit by digit to the exact k-th largest key, and
  a final collect pass gathers the winners. Same answer, more passes and synchronisation.

Where the bitonic kernel's time goes (the design that follows from it). Memory traffic is small
(2 bytes per score read), so at large T the kernel is also bounded by the *integer ALU pipe* (16
lanes per SM sub-partition, half the rate of the FP32 pipes), which runs every compare-exchange
(``VIMNMX``) and most of the key arithmetic. So it is built to issue few ALU instructions per score:

* the lane split: each lane reads ``LANE_BYTES`` (128 bytes = 64 bf16) of the row. Per row, the
  min/max count grows with the lanes, since each lane sorts its own chunks and every lane repeats
  each butterfly merge: at N = 128, k = 8 it is 1248 with 4 lanes and 1120 with 2;
* the key: ``primitives.pack_key16`` builds a 16-bit value's key with 3 ALU instructions (mask, PRMT, or)
  and one multiply-add on the FMA pipe, instead of ~6 ALU instructions for the textbook formula;
* the column in the key is counted from the lane's first column, a compile-time constant folded
  into that multiply-add; each lane adds its offset once, to its k winners.

What the design bought, and what limits it now (the overlap of loads with the sorting, not the
ALU alone: the compiler issues only a few of a lane's 16-byte loads up front and sinks the rest
into the sorting, to save registers), is measured by ``benchmarks/topk.py`` against ``torch.topk``
and a plain copy of the same bytes; the numbers live in ``benchmarks/results/topk_<GPU>.json`` and
the docs' Benchmarks page.

The key (both kernels; its device functions are in ``sonic_learn.fast.primitives``) — the
reference's "pack the column into the low mantissa bits":
for bf16/fp16 a value's 16 bits, moved to the top of an int32, are exactly its float32 bits. We
map them to an *order-preserving signed integer* first (negative floats get their magnitude bits
flipped, -0.0 becomes +0.0), then put the inverted column in the low bits::

    key = ordered(bits) << 16 | (0xFFFF - col)    # int32 for bf16/fp16

Comparing keys as integers (not as floats) keeps +-inf and subnormals exact and can never make a
NaN out of an infinity; the larger key always means "larger value, or equal value at a lower
column". Unpacking gives back the value's bits, except that -0.0 and +0.0 share a key (they tie):
the kernel re-reads a zero winner from ``x``, so the returned values are bit-for-bit the inputs. float32 needs all 32 bits for the
value, so its keys are int64 (the same formula, shifted 16 more bits): exact too, where the
reference's float32 packing is a documented approximation, so for float32 the fast bitonic
kernel agrees with the reference's (exact) ``radix_topk``.

Contract (same as the reference): ``x`` is a 2-D CUDA tensor (rows, N) of bf16/fp16/fp32, values
come out sorted descending with ``values == x.gather(-1, indices)``, ties go to the lower index
(-0.0 and +0.0 tie, as torch compares them), indices are int64, softmax scores are float32.
Supported sizes: ``8 <= N <= 4096`` with ``N % 8 == 0``, and ``1 <= k <= min(16, N)`` (bitonic;
k is rounded up to a power of two inside the kernel) or ``1 <= k <= min(128, N)`` (radix).
Anything else raises ``ValueError`` before any launch (``sonic_learn.reference.topk`` handles
every size). Strided or misaligned inputs are copied to a contiguous, 16-byte-aligned tensor first.

Value checks: like the reference, the public functions reject NaN (top-k) or NaN and +-inf (the
softmax scores) by default, ``check_finite=True``. That check costs an extra read and a
device-to-host sync; callers that already know their data is clean (the MoE layer, benchmarks)
pass ``check_finite=False``. On that path a NaN crashes nothing: it is ordered by its bits like
any other key (a positive NaN ranks above +inf, as in ``torch.topk``), but the result is outside
the contract.

Every kernel is compiled once per (kernel, dtype, N, k, epilogue), with the row count dynamic,
cached, and called through TVM-FFI (torch tensors go straight in; the current torch stream is
used). ``benchmarks/topk.py`` also measures the host time per call, split into the argument
checks, the two output allocations and the TVM-FFI call.
"""

from __future__ import annotations

import math

import torch

from sonic_learn import _checks, contracts
from sonic_learn._deprecated import renamed
from sonic_learn.fast._cute import compile_options, compiled, cutlass_dtype, import_cutlass, launch

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402  (after the arch is pinned by import_cutlass)
from cutlass import Float32, Int32, Int64, Uint32, const_expr  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from sonic_learn.fast.primitives import (  # noqa: E402  (the keys and warp scans, shared with fast.routing)
    IDX_BITS, IDX_MASK, lane_bins_and_keys_above, pack_key, pack_key16, radix_key, to_ordered, unpack_key,
    value_word, warp_exclusive_sum)

__all__ = [
    "bitonic_topk",
    "radix_topk",
    "softmax_topk",
    "topk_softmax",
    "MAX_N",
    "MAX_K_BITONIC",
    "MAX_K_RADIX",
    "STEPS",
]
__getattr__ = renamed(__name__, globals(), {"EPILOGUES": "BITONIC_EPILOGUES"})  # one name, one meaning

# ---------------------------------------------------------------------------------------------
# Supported range (checked on the host before any launch)
# ---------------------------------------------------------------------------------------------
MIN_N = 8  # one 16-byte vector of bf16
MAX_N = 4096  # the row must fit in the registers of one warp
N_MULTIPLE = 8  # rows are read in 16-byte vectors (8 x bf16/fp16, 4 x fp32)
MAX_K_BITONIC = 16  # each lane keeps a sorted top-k list in registers
MAX_K_RADIX = 128  # the winners are staged in shared memory, k slots per row

THREADS_PER_CTA = 128
# Bitonic: bytes of a row each lane reads, by element width in bits (fewer lanes per row = fewer
# compare-exchanges per row; see BitonicTopK and benchmarks/topk.py's lane-split sweep).
LANE_BYTES = {16: 128, 32: 64}

def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _raw_int_type(dtype):
    """The signed integer type with the same width as ``dtype`` (to read a float's bits)."""
    return cutlass.Int16 if dtype.width == 16 else Int32


# ---------------------------------------------------------------------------------------------
# Sorting networks on register arrays (descending = largest key first)
# ---------------------------------------------------------------------------------------------
@cute.jit
def _compare_exchange(a: cute.Tensor, i: cutlass.Constexpr[int], j: cutlass.Constexpr[int], descending: cutlass.Constexpr[bool]):
    """Put the larger of a[i], a[j] first (descending) or last (ascending)."""
    hi = cutlass.max(a[i], a[j])
    lo = cutlass.min(a[i], a[j])
    if const_expr(descending):
        a[i], a[j] = hi, lo
    else:
        a[i], a[j] = lo, hi


@cute.jit
def _bitonic_merge(a: cute.Tensor, n: cutlass.Constexpr[int], descending: cutlass.Constexpr[bool]):
    """Sort a *bitonic* sequence a[0:n] (n a power of two): log2(n) half-cleaner stages."""
    half = n // 2
    while const_expr(half >= 1):
        for i in cutlass.range_constexpr(n):
            if const_expr((i & half) == 0):
                _compare_exchange(a, i, i + half, descending)
        half = half // 2


def _odd_even_merge_sort_pairs(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network on n wires (n a power of two), as (lower, upper) pairs.

    Plain Python, run at trace time. Sorted runs of length p are merged pairwise (p = 1, 2, 4, ...);
    each merge compares wires k apart (k = p, p/2, ..., 1) within one pair of runs. It needs fewer
    compare-exchanges than a bitonic sort: 19 instead of 24 for 8 wires, 63 instead of 80 for 16.
    """
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):  # same pair of runs
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@cute.jit
def _sort_descending(a: cute.Tensor, n: cutlass.Constexpr[int]):
    """Sort a[0:n] descending in registers with the odd-even merge sort network (fully unrolled)."""
    for lower, upper in _odd_even_merge_sort_pairs(n):
        _compare_exchange(a, lower, upper, True)


@cute.jit
def _merge_topk(best: cute.Tensor, other: cute.Tensor, k: cutlass.Constexpr[int]):
    """best, other: both sorted descending, length k. Leave the top k of their union in ``best``.

    Pairing best[i] with other[k-1-i] and keeping the larger gives the k largest of the 2k keys
    as a bitonic sequence; one bitonic merge sorts it.
    """
    for i in cutlass.range_constexpr(k):
        best[i] = cutlass.max(best[i], other[k - 1 - i])
    _bitonic_merge(best, k, True)


# ---------------------------------------------------------------------------------------------
# Shared loading step: a CTA tile of rows, each row spread over `lanes_per_row` lanes
# ---------------------------------------------------------------------------------------------
class _RowTileLoader:
    """Reads `rows_per_cta` rows per CTA with 16-byte vector loads into registers.

    Lane j of a row owns the 16-byte chunks j, j + lanes_per_row, j + 2 * lanes_per_row, ...
    (so neighbouring lanes read neighbouring bytes: coalesced). The row is padded in registers to
    `n_padded` columns with -inf, which can never win a top-k against a real column.
    """

    def __init__(self, dtype, N: int, n_padded: int, lanes_per_row: int):
        self.dtype = dtype
        self.N = N
        self.n_padded = n_padded
        self.lanes_per_row = lanes_per_row
        self.vec = 128 // dtype.width  # elements per 16-byte load
        self.rows_per_cta = THREADS_PER_CTA // lanes_per_row
        self.per_thread = n_padded // lanes_per_row
        assert self.per_thread % self.vec == 0

    def tiled_copy(self):
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
        threads = cute.make_ordered_layout((self.rows_per_cta, self.lanes_per_row), order=(1, 0))
        values = cute.make_layout((1, self.vec))
        return cute.make_tiled_copy_tv(atom, threads, values)

    @cute.jit
    def load(self, mX: cute.Tensor, tiled_copy: cute.TiledCopy, tidx: Int32, bidx: Int32):
        """Return (registers holding this lane's slice, their (row, col) coordinates, row)."""
        tile = (self.rows_per_cta, self.n_padded)
        gX = cute.local_tile(mX, tile, (bidx, 0))
        cX = cute.local_tile(cute.make_identity_tensor(mX.shape), tile, (bidx, 0))
        thr_copy = tiled_copy.get_slice(tidx)
        tXgX = thr_copy.partition_S(gX)
        tXcX = thr_copy.partition_S(cX)
        tXrX = cute.make_rmem_tensor_like(tXgX)
        tXrX.fill(-self.dtype.inf)
        row = tXcX[0][0]
        num_rows = mX.shape[0]
        for c in cutlass.range_constexpr(cute.size(tXgX, mode=[2])):
            chunk_col = tXcX[(0, 0), 0, c][1]
            if row < num_rows and chunk_col < self.N:
                cute.copy(tiled_copy, tXgX[None, None, c], tXrX[None, None, c])
        return tXrX, tXcX, row


# ---------------------------------------------------------------------------------------------
# The bitonic ladder: step 1, the simplest kernel with the same answer
# ---------------------------------------------------------------------------------------------
# Each step of the top-k ladder gives the same (values, indices); ``bitonic_topk(..., step=...)``
# picks one and ``python -m sonic_learn.fast.topk`` validates and times them all.
STEPS = {
    "rowwise": "one thread per row: read the row element by element, keep a sorted top-k by insertion",
    "bitonic": "+ a row over 1-32 lanes with 16-byte loads, sorting networks on packed keys, warp-shuffle merges",
}


class RowwiseTopK:
    """Step 1 of the ladder: one thread owns one row.

    It reads the row one element at a time and keeps the k best keys seen so far, sorted, in
    registers: a new key larger than the k-th replaces it and bubbles up (k - 1 compare-exchanges).
    The keys are the bitonic kernel's (``primitives``: value order, the lower column wins a tie, as
    int64 for every dtype), so the answer is the same. What it lacks is what makes step 2 fast:
    neighbouring threads read addresses N elements apart (no coalescing, one element per load), and
    a row's work is not shared by any other thread.
    """

    def __init__(self, dtype, N: int, k: int):
        self.dtype = dtype
        self.width = dtype.width
        self.N = N
        self.k = k

    @cute.jit
    def __call__(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor, stream):
        num_ctas = cute.ceil_div(mX.shape[0], THREADS_PER_CTA)
        self.kernel(mX, mOut, mIdx).launch(grid=[num_ctas, 1, 1], block=[THREADS_PER_CTA, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        row = bidx * THREADS_PER_CTA + tidx
        if row < mX.shape[0]:
            # Step 1: an empty list; the sentinel is below every key (keys are >= -2**47).
            best = cute.make_rmem_tensor(self.k, Int64)
            for j in cutlass.range_constexpr(self.k):
                best[j] = Int64(-(2**62))
            # Step 2: every element of the row, in column order: its key, and the insertion.
            raw = cute.make_rmem_tensor(1, self.dtype)
            for col in cutlass.range(self.N, unroll=1):
                raw[0] = mX[row, col]
                bits = cute.recast_tensor(raw, _raw_int_type(self.dtype))[0]
                word = Int32(bits) << (32 - self.width)  # the value's bits, top-aligned (as value_word)
                key = (Int64(to_ordered(word, self.width)) << IDX_BITS) | Int64(IDX_MASK - col)
                if key > best[self.k - 1]:
                    best[self.k - 1] = key
                    for j in cutlass.range_constexpr(self.k - 1, 0, -1):
                        _compare_exchange(best, j - 1, j, True)
            # Step 3: unpack the columns; the values are re-read from x (exact, -0.0 included).
            for j in cutlass.range_constexpr(self.k):
                col = IDX_MASK - Int32(best[j] & Int64(IDX_MASK))
                mOut[row, j] = mX[row, col]
                mIdx[row, j] = Int64(col)


# ---------------------------------------------------------------------------------------------
# Bitonic top-k kernel (SonicMoE's algorithm), step 2 of the ladder
# ---------------------------------------------------------------------------------------------
BITONIC_EPILOGUES = ("values", "softmax_topk", "topk_softmax", "topk_softmax_normalized")


class BitonicTopK:
    """Register-only bitonic top-k of each row; optional fused softmax epilogue.

    Compile-time parameters: dtype, N, k, epilogue (and ``lane_bytes``, the bytes of a row per
    lane, default ``LANE_BYTES``). Runtime: the number of rows.
    Outputs: ``out`` (rows, k) in the input dtype ("values") or float32 (softmax epilogues),
    ``idx`` (rows, k) int64.
    """

    def __init__(self, dtype, N: int, k: int, epilogue: str = "values", lane_bytes: int | None = None):
        assert epilogue in BITONIC_EPILOGUES
        lane_bytes = LANE_BYTES[dtype.width] if lane_bytes is None else lane_bytes
        self.dtype = dtype
        self.width = dtype.width
        self.N = N
        self.k = k
        self.epilogue = epilogue
        self.kp = _next_pow2(k)  # the merge network needs a power of two
        self.key_type = Int32 if dtype.width == 16 else Int64
        n_pow2 = max(_next_pow2(N), 8)
        vec = 128 // dtype.width
        # Work per lane: at least kp keys and one 16-byte vector; aim for `lane_bytes` of the row
        # per lane, but never more than 32 lanes per row. Per row, the compare-exchanges grow with
        # the lanes (each lane sorts its chunks, then every lane repeats each butterfly merge):
        # for bf16, N = 128, k = 8 it is 4 lanes x 312 min/max = 1248, 2 lanes x 560 = 1120.
        per_thread = max(self.kp, vec, min(n_pow2, lane_bytes // (dtype.width // 8)))
        per_thread = min(max(per_thread, n_pow2 // 32), n_pow2)
        self.loader = _RowTileLoader(dtype, N, n_pow2, n_pow2 // per_thread)

    @cute.jit
    def __call__(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor, stream):
        tiled_copy = self.loader.tiled_copy()
        num_ctas = cute.ceil_div(mX.shape[0], self.loader.rows_per_cta)
        self.kernel(mX, mOut, mIdx, tiled_copy).launch(
            grid=[num_ctas, 1, 1], block=[THREADS_PER_CTA, 1, 1], stream=stream
        )

    @cute.jit
    def pack_keys(self, dst: cute.Tensor, words: cute.Tensor, coords: cute.Tensor, g: cutlass.Constexpr[int]):
        """dst[j] = key of the lane's element g * kp + j, its column counted from the lane's first
        column: a compile-time constant (an immediate in the multiply-add). A lane's row columns
        grow with these local ones, so ties among its own keys already go to the lower column; the
        lane's offset is applied once, to its kp winners, in step 3."""
        for j in cutlass.range_constexpr(self.kp):
            i = g * self.kp + j
            local_col = coords[i][1] - coords[0][1]
            if const_expr(self.width == 16):
                dst[j] = pack_key16(words[i // 2], i % 2, IDX_MASK - local_col)
            else:
                dst[j] = pack_key(value_word(words, i, self.width), local_col)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor, tiled_copy: cute.TiledCopy):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lanes = self.loader.lanes_per_row
        kp = self.kp

        # Step 1 (reference: "pad the row to a power of two"): read this lane's slice of the row.
        tXrX, tXcX, row = self.loader.load(mX, tiled_copy, tidx, bidx)
        words = cute.recast_tensor(tXrX, Int32)

        # Step 2 (reference: "pack the column into the key, sort chunks, fold them"): per lane,
        # sort chunks of kp keys with a sorting network and fold each into a running top-kp.
        # (Cost per new chunk of 8 keys: 19 compare-exchanges to sort it, 8 max + 12 compare-
        # exchanges to fold it: ~9 integer min/max per element, plus 3 ALU instructions per key.)
        best = cute.make_rmem_tensor(kp, self.key_type)
        chunk = cute.make_rmem_tensor(kp, self.key_type)
        for g in cutlass.range_constexpr(self.loader.per_thread // kp):
            if const_expr(g == 0):
                self.pack_keys(best, words, tXcX, g)
                _sort_descending(best, kp)
            else:
                self.pack_keys(chunk, words, tXcX, g)
                _sort_descending(chunk, kp)
                _merge_topk(best, chunk, kp)

        # Step 3 (reference: the last folds, across lanes): butterfly over the lanes of the row.
        # The keys so far hold the column relative to the lane's first column; subtracting that
        # offset from the kp winners makes them row columns (0xFFFF - col), comparable across lanes.
        # After log2(lanes) rounds every lane of the row holds the row's sorted top-kp keys.
        if const_expr(lanes > 1):
            lane_col = self.key_type(tXcX[0][1])
            for j in cutlass.range_constexpr(kp):
                best[j] = best[j] - lane_col
        offset = 1
        while const_expr(offset < lanes):
            for j in cutlass.range_constexpr(kp):
                chunk[j] = cute.arch.shuffle_sync_bfly(best[kp - 1 - j], offset=offset)
            for j in cutlass.range_constexpr(kp):
                best[j] = cutlass.max(best[j], chunk[j])
            _bitonic_merge(best, kp, True)
            offset = offset * 2

        # Step 4 (reference: "unpack"): the k winners' value words and columns.
        win_word = cute.make_rmem_tensor(kp, Int32)
        win_col = cute.make_rmem_tensor(kp, Int32)
        for j in cutlass.range_constexpr(kp):
            win_word[j], win_col[j] = unpack_key(best[j], self.width)

        # Step 5: the epilogue, then the stores.
        if const_expr(self.epilogue == "values"):
            self.store_values(mX, mOut, mIdx, row, tidx % lanes, win_word, win_col)
        else:
            scores = self.softmax_scores(tXrX, win_word)
            self.store_scores(mX, mOut, mIdx, row, tidx % lanes, scores, win_col)

    def store_plan(self):
        """Split the k output slots into groups of `width` contiguous slots, one vector store each.

        Lane l of the row stores the groups l, l + lanes, ... so every store instruction does
        useful work on all lanes (instead of k scalar stores each done by one lane).
        """
        lanes = self.loader.lanes_per_row
        per_lane = -(-self.k // lanes)
        width = 1
        while self.k % (width * 2) == 0 and width < per_lane:
            width *= 2
        groups = self.k // width
        return width, groups, -(-groups // lanes)

    @cute.jit
    def gather_group(self, frag: cute.Tensor, src: cute.Tensor, lane: Int32, r: cutlass.Constexpr[int]):
        """frag[v] = src[q * width + v] for this lane's group q = r * lanes + lane (a select chain:
        registers cannot be indexed by a runtime value)."""
        width, groups, _ = self.store_plan()
        lanes = self.loader.lanes_per_row
        for v in cutlass.range_constexpr(width):
            frag[v] = src[r * lanes * width + v]
        for l in cutlass.range_constexpr(1, lanes):
            q = r * lanes + l
            if const_expr(q < groups):
                if lane == l:
                    for v in cutlass.range_constexpr(width):
                        frag[v] = src[q * width + v]

    @cute.jit
    def store_values(self, mX, mOut, mIdx, row, lane, win_word, win_col):
        width, groups, rounds = self.store_plan()
        lanes = self.loader.lanes_per_row
        raw_type = _raw_int_type(self.dtype)
        out_groups = cute.zipped_divide(mOut, (1, width))  # ((1, width), (rows, groups))
        idx_groups = cute.zipped_divide(mIdx, (1, width))
        for r in cutlass.range_constexpr(rounds):
            q = r * lanes + lane
            if row < mX.shape[0] and q < groups:
                word = cute.make_rmem_tensor(width, Int32)
                col = cute.make_rmem_tensor(width, Int32)
                self.gather_group(word, win_word, lane, r)
                self.gather_group(col, win_col, lane, r)
                bits = cute.make_rmem_tensor(width, raw_type)
                cols = cute.make_rmem_tensor(width, Int64)
                for v in cutlass.range_constexpr(width):
                    bits[v] = raw_type(word[v] >> (32 - self.width))
                    cols[v] = Int64(col[v])
                values = cute.recast_tensor(bits, self.dtype)
                for v in cutlass.range_constexpr(width):
                    if word[v] == 0:  # +0.0 or -0.0 (the key made them tie): take the sign from x
                        values[v] = mX[row, col[v]]
                cute.autovec_copy(values, out_groups[(0, None), (row, q)])
                cute.autovec_copy(cols, idx_groups[(0, None), (row, q)])

    @cute.jit
    def softmax_scores(self, tXrX: cute.Tensor, win_word: cute.Tensor) -> cute.Tensor:
        """float32 router scores of the k winners, computed in registers."""
        lanes = self.loader.lanes_per_row
        log2_e = math.log2(math.e)
        win = cute.recast_tensor(win_word, Float32)  # for bf16 the top-aligned word IS the float32
        values = cute.make_rmem_tensor(self.kp, Float32)
        for j in cutlass.range_constexpr(self.kp):
            if const_expr(self.width == 16 and self.dtype != cutlass.BFloat16):
                half = cute.make_rmem_tensor(1, cutlass.Int16)
                half[0] = cutlass.Int16(win_word[j] >> 16)
                values[j] = Float32(cute.recast_tensor(half, self.dtype)[0])
            else:
                values[j] = win[j]
        top1 = values[0]  # the row maximum
        scores = cute.make_rmem_tensor(self.kp, Float32)
        denom = Float32(0.0)
        for j in cutlass.range_constexpr(self.k):
            scores[j] = cute.math.exp2((values[j] - top1) * log2_e, fastmath=True)
            denom = denom + scores[j]  # Mixtral: softmax over the k selected logits
        if const_expr(self.epilogue == "topk_softmax"):
            # Qwen: softmax over all N logits; the sum of exp runs over this lane's slice, then
            # over the lanes of the row. Padding holds -inf, which adds exp(-inf) = 0.
            partial = Float32(0.0)
            for i in cutlass.range_constexpr(cute.size(tXrX)):
                partial = partial + cute.math.exp2((Float32(tXrX[i]) - top1) * log2_e, fastmath=True)
            denom = cute.arch.warp_reduction_sum(partial, threads_in_group=lanes)
        # ("topk_softmax_normalized": p_j / sum_k p_k == e_j / sum_k e_j, the sum over the k winners.)
        inv = Float32(1.0) / denom
        for j in cutlass.range_constexpr(self.k):
            scores[j] = scores[j] * inv
        return scores

    @cute.jit
    def store_scores(self, mX, mOut, mIdx, row, lane, scores, win_col):
        width, groups, rounds = self.store_plan()
        lanes = self.loader.lanes_per_row
        out_groups = cute.zipped_divide(mOut, (1, width))
        idx_groups = cute.zipped_divide(mIdx, (1, width))
        for r in cutlass.range_constexpr(rounds):
            q = r * lanes + lane
            if row < mX.shape[0] and q < groups:
                vals = cute.make_rmem_tensor(width, Float32)
                col = cute.make_rmem_tensor(width, Int32)
                self.gather_group(vals, scores, lane, r)
                self.gather_group(col, win_col, lane, r)
                cols = cute.make_rmem_tensor(width, Int64)
                for v in cutlass.range_constexpr(width):
                    cols[v] = Int64(col[v])
                cute.autovec_copy(vals, out_groups[(0, None), (row, q)])
                cute.autovec_copy(cols, idx_groups[(0, None), (row, q)])


# ---------------------------------------------------------------------------------------------
# Radix-select top-k kernel (the classic algorithm)
# ---------------------------------------------------------------------------------------------
RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
WARPS_PER_CTA = THREADS_PER_CTA // 32


class RadixTopK:
    """Radix select, one warp per row: digit histograms in shared memory, then a collect pass.

    Reference steps: (1) order-preserving unsigned keys; (2) for each 8-bit digit, from the most
    significant: histogram the keys that still match the decided prefix, find the digit bin that
    holds the k-th largest key, fix that digit; (3) collect: every key above the k-th is a winner,
    and among keys equal to it the lowest columns fill the remaining slots; (4) sort the k winners.
    """

    def __init__(self, dtype, N: int, k: int):
        self.dtype = dtype
        self.width = dtype.width
        self.N = N
        self.k = k
        vec = 128 // dtype.width
        n_padded = max(N, 32 * vec)
        n_padded = -(-n_padded // (32 * vec)) * (32 * vec)  # whole 16-byte chunks for all lanes
        self.loader = _RowTileLoader(dtype, N, n_padded, 32)
        self.num_passes = dtype.width // RADIX_BITS

    @cute.jit
    def __call__(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor, stream):
        tiled_copy = self.loader.tiled_copy()
        num_ctas = cute.ceil_div(mX.shape[0], WARPS_PER_CTA)
        self.kernel(mX, mOut, mIdx, tiled_copy).launch(
            grid=[num_ctas, 1, 1], block=[THREADS_PER_CTA, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mOut: cute.Tensor, mIdx: cute.Tensor, tiled_copy: cute.TiledCopy):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        warp = tidx // 32
        vec = self.loader.vec
        per_thread = self.loader.per_thread

        smem = cutlass.memory.SmemAllocator()
        hist_all = smem.allocate_tensor(Int32, cute.make_layout((RADIX_BINS, WARPS_PER_CTA)), byte_alignment=16)
        stage_key_all = smem.allocate_tensor(Uint32, cute.make_layout((self.k, WARPS_PER_CTA)), byte_alignment=16)
        stage_col_all = smem.allocate_tensor(Int32, cute.make_layout((self.k, WARPS_PER_CTA)), byte_alignment=16)
        hist = hist_all[None, warp]
        stage_key = stage_key_all[None, warp]
        stage_col = stage_col_all[None, warp]

        # Step 1: read the row (one warp) and note which register slots are real columns.
        tXrX, tXcX, row = self.loader.load(mX, tiled_copy, tidx, bidx)
        words = cute.recast_tensor(tXrX, Int32)

        # Step 2: narrow to the k-th largest key, one 8-bit digit per pass (MSB first).
        prefix = Uint32(0)  # digits decided so far
        decided = Uint32(0)  # mask of the decided bits
        k_left = Int32(self.k)  # how many winners are still to be found below `prefix`
        for p in cutlass.range_constexpr(self.num_passes):
            shift = 32 - RADIX_BITS * (p + 1)  # keys are top-aligned: 16-bit values use the top two digits
            # 2a. clear this warp's histogram
            for b in cutlass.range_constexpr(RADIX_BINS // 32):
                hist[b * 32 + lane] = Int32(0)
            cute.arch.sync_warp()
            # 2b. count the keys that still match the prefix, by their next digit
            for i in cutlass.range_constexpr(per_thread):
                key = radix_key(value_word(words, i, self.width), self.width)
                if tXcX[i][1] < self.N and (key & decided) == prefix:
                    digit = Int32((key >> shift) & Uint32(RADIX_BINS - 1))
                    cute.arch.atomic_add((hist.iterator + digit).llvm_ptr, Int32(1))
            cute.arch.sync_warp()
            # 2c. find the bin holding the k-th largest: lane l owns bins 8l..8l+7; count the keys
            #     in higher bins (higher lanes first, then higher bins of this lane).
            per_lane = RADIX_BINS // 32
            counts, above = lane_bins_and_keys_above(hist, lane, RADIX_BINS)
            found = Int32(0)
            digit_here = Int32(0)
            above_here = Int32(0)
            for b in cutlass.range_constexpr(per_lane - 1, -1, -1):
                if found == 0 and above < k_left and above + counts[b] >= k_left:
                    found = Int32(1)
                    digit_here = lane * per_lane + b
                    above_here = above
                above = above + counts[b]
            owner_mask = cute.arch.vote_ballot_sync(found != 0)
            owner = cute.arch.popc((owner_mask & -owner_mask) - 1)  # index of the (single) set bit
            digit = cute.arch.shuffle_sync(digit_here, owner)
            k_left = k_left - cute.arch.shuffle_sync(above_here, owner)
            prefix = prefix | (Uint32(digit) << shift)
            decided = decided | (Uint32(RADIX_BINS - 1) << shift)
            cute.arch.sync_warp()  # everyone has read the histogram before the next pass clears it
        kth = prefix  # the exact k-th largest key; k_left of the keys equal to it are winners

        # Step 3: collect, walking the row in column order one 16-byte chunk per lane at a time.
        #   taken = key > kth, or key == kth and fewer than k_left equal keys come before it.
        equal_before = Int32(0)  # equal keys in earlier chunks
        taken_before = Int32(0)  # winners in earlier chunks (= their staging slot)
        for c in cutlass.range_constexpr(per_thread // vec):
            n_equal = Int32(0)
            for v in cutlass.range_constexpr(vec):
                i = c * vec + v
                if tXcX[i][1] < self.N and radix_key(value_word(words, i, self.width), self.width) == kth:
                    n_equal = n_equal + 1
            equal_excl, equal_total = warp_exclusive_sum(n_equal, lane)
            equal_rank = equal_before + equal_excl
            taken = cute.make_rmem_tensor(vec, Int32)
            n_taken = Int32(0)
            for v in cutlass.range_constexpr(vec):
                i = c * vec + v
                key = radix_key(value_word(words, i, self.width), self.width)
                take = Int32(0)
                if tXcX[i][1] < self.N:
                    if key > kth:
                        take = Int32(1)
                    elif key == kth:
                        if equal_rank < k_left:
                            take = Int32(1)
                        equal_rank = equal_rank + 1
                taken[v] = take
                n_taken = n_taken + take
            taken_excl, taken_total = warp_exclusive_sum(n_taken, lane)
            slot = taken_before + taken_excl
            for v in cutlass.range_constexpr(vec):
                i = c * vec + v
                if taken[v] != 0:
                    stage_key[slot] = radix_key(value_word(words, i, self.width), self.width)
                    stage_col[slot] = tXcX[i][1]
                    slot = slot + 1
            equal_before = equal_before + equal_total
            taken_before = taken_before + taken_total
        cute.arch.sync_warp()

        # Step 4: sort the k winners. Staging is in column order, so a winner's output position is
        # (#winners with a larger key) + (#equal winners staged before it).
        if row < mX.shape[0]:
            for j in cutlass.range(lane, self.k, 32):
                my_key = stage_key[j]
                rank = Int32(0)
                for m in cutlass.range(self.k):
                    other = stage_key[m]
                    if other > my_key or (other == my_key and m < j):
                        rank = rank + 1
                col = stage_col[j]
                mOut[row, rank] = mX[row, col]  # re-read the exact value (keeps -0.0), as x.gather
                mIdx[row, rank] = Int64(col)


# ---------------------------------------------------------------------------------------------
# Compile (once per variant) and launch
# ---------------------------------------------------------------------------------------------
def compile_kernel(kind: str, dtype: torch.dtype, N: int, k: int, epilogue: str = "values", *,
                   extra_options: str = "", lane_bytes: int | None = None):
    """Compile one kernel variant for sm_90a with fake tensors (no GPU needed); not cached.

    ``kind`` is "rowwise" (step 1 of the bitonic ladder, values only), "bitonic" or "radix". The row count is a symbolic integer, so the compiled function
    serves every number of rows. Returns the TVM-FFI callable ``f(x, out, idx)``. ``lane_bytes``
    (bitonic only) overrides the lane split, ``LANE_BYTES``: the benchmark sweeps it.
    """
    cdtype = cutlass_dtype(dtype)
    if kind == "bitonic":
        op = BitonicTopK(cdtype, N, k, epilogue, lane_bytes)
    elif kind == "rowwise":
        assert epilogue == "values"
        op = RowwiseTopK(cdtype, N, k)
    elif kind == "radix":
        assert epilogue == "values"
        op = RadixTopK(cdtype, N, k)
    else:
        raise ValueError(f"kind must be 'rowwise', 'bitonic' or 'radix', got {kind!r}")
    out_dtype = cdtype if epilogue == "values" else Float32
    rows = cute.sym_int()
    x = make_fake_compact_tensor(cdtype, (rows, N), stride_order=(1, 0), assumed_align=16)
    out = make_fake_compact_tensor(out_dtype, (rows, k), stride_order=(1, 0), assumed_align=16)
    idx = make_fake_compact_tensor(Int64, (rows, k), stride_order=(1, 0), assumed_align=16)
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(op, x, out, idx, stream, options=compile_options(extra=extra_options))


# ---------------------------------------------------------------------------------------------
# Public API (same names and contract as sonic_learn.reference.topk)
# ---------------------------------------------------------------------------------------------
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_inputs(name: str, x: object, k: object, max_k: int, kernel: str, check_finite: object,
                  allow_inf: bool) -> torch.Tensor:
    """Validate before any launch; return x as a row-major, 16-byte-aligned tensor. ``check_finite``
    rejects NaN (and inf unless ``allow_inf``) like the reference: an extra read and a host sync."""
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    x = _checks.check_tensor(name, x)
    _checks.check_ndim(name, x, 2, "(rows, N)")
    _checks.check_dtype(name, x, _DTYPES)
    n = x.shape[1]
    if n < MIN_N or n > MAX_N or n % N_MULTIPLE != 0:
        raise ValueError(
            f"{name}.shape[1] (N) must be a multiple of {N_MULTIPLE} in [{MIN_N}, {MAX_N}] for the "
            f"fast {kernel} kernel, got {n}; use sonic_learn.reference.topk for other sizes"
        )
    _checks.check_int_range("k", k, 1, min(max_k, n), f"the fast {kernel} kernel supports k <= {max_k} and k <= N = {n}")
    _checks.check_cuda(name, x)
    if check_finite:
        contracts.check_finite_values(name, x, allow_inf=allow_inf)
    # The kernels read rows in 16-byte chunks: copy strided or misaligned inputs first.
    if not x.is_contiguous() or x.data_ptr() % 16 != 0:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    return x


def _run(kind: str, x: torch.Tensor, k: int, epilogue: str):
    rows, n = x.shape
    out_dtype = x.dtype if epilogue == "values" else torch.float32
    out = torch.empty((rows, k), dtype=out_dtype, device=x.device)
    idx = torch.empty((rows, k), dtype=torch.int64, device=x.device)
    if rows > 0:
        launch(compiled(compile_kernel, kind, x.dtype, n, k, epilogue), x.device, x, out, idx)  # on the current torch stream
    return out, idx


def bitonic_topk(x: torch.Tensor, k: int, *, check_finite: bool = True,
                 step: str = "bitonic") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``x`` (rows, N) with the register bitonic kernel.

    Returns ``(values, indices)``: values (rows, k) in x's dtype, sorted descending, exactly
    ``x.gather(-1, indices)``; indices (rows, k) int64; ties go to the lower column.
    ``check_finite`` rejects NaN like the reference (an extra read and a device-to-host sync).
    ``step`` picks the step of the ladder (``STEPS``): ``"rowwise"`` (step 1, one thread per row)
    or ``"bitonic"`` (step 2, the default); both give the same result.
    """
    _checks.check_choice("step", step, tuple(STEPS))
    x = _check_inputs("x", x, k, MAX_K_BITONIC, "bitonic", check_finite, allow_inf=True)
    return _run(step, x, k, "values")


def radix_topk(x: torch.Tensor, k: int, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``x`` (rows, N) by radix select (one warp per row). Same contract as
    :func:`bitonic_topk`, with k up to ``MAX_K_RADIX``."""
    x = _check_inputs("x", x, k, MAX_K_RADIX, "radix", check_finite, allow_inf=True)
    return _run("radix", x, k, "values")


def softmax_topk(logits: torch.Tensor, k: int, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral-style routing scores: top-k of the logits, then softmax over the k selected.

    Returns ``(scores, indices)``: scores (rows, k) float32 summing to 1 per row, in the order of
    the top-k logits; indices (rows, k) int64. Fused into the bitonic kernel's epilogue.
    """
    logits = _check_inputs("logits", logits, k, MAX_K_BITONIC, "bitonic", check_finite, allow_inf=False)
    return _run("bitonic", logits, k, "softmax_topk")


def topk_softmax(
    logits: torch.Tensor, k: int, normalize: bool = False, *, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-style routing scores: softmax over all N logits, then the top-k probabilities
    (renormalized to sum to 1 when ``normalize``). Returns ``(scores fp32, indices int64)``."""
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    logits = _check_inputs("logits", logits, k, MAX_K_BITONIC, "bitonic", check_finite, allow_inf=False)
    return _run("bitonic", logits, k, "topk_softmax_normalized" if normalize else "topk_softmax")


# ---------------------------------------------------------------------------------------------
# python -m sonic_learn.fast.topk: validate every step of the ladder, then time it
# ---------------------------------------------------------------------------------------------
def _ladder_problems():
    from sonic_learn.fast.ladder import Problem

    def scores(T, E, seed):  # built only when the problem runs (on the GPU); rounding to bf16 makes ties
        return lambda: (torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).cuda(),)

    return [Problem(f"router top-k, bf16: T={T}, E={E}, K=8", scores(T, E, i))
            for i, (T, E) in enumerate([(4096, 64), (65536, 128), (65536, 256)])]


def _same_topk(got, want) -> None:
    (values, indices), (want_values, want_indices) = got, want
    assert torch.equal(indices, want_indices), "indices differ from the reference"
    assert torch.equal(values, want_values), "values differ from the reference"


if __name__ == "__main__":
    from sonic_learn.fast.ladder import Step, climb
    from sonic_learn.reference import topk as reference

    raise SystemExit(climb(
        "fast top-k (the bitonic ladder)",
        [Step(name, adds, lambda x, name=name: bitonic_topk(x, 8, check_finite=False, step=name))
         for name, adds in STEPS.items()],
        reference=lambda x: reference.radix_topk(x, 8), agree=_same_topk, problems=_ladder_problems()))
