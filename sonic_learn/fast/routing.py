"""Fast routing on Hopper: routing metadata in CuTe-DSL, and token rounding without a full sort.

Same names and contracts as ``sonic_learn.reference.routing`` (the "routing metadata" SonicMoE's
kernels consume; paper Section 5 / Algorithm 4 "token rounding"); the ``Routing`` and
``RoutingMetadata`` types are the reference's own.

**Metadata (CuTe-DSL, four small kernels launched by one compiled call, no host sync).**
The pairs are cut into *tiles*: one warp owns ``chunks_per_tile * 256`` consecutive pairs.

1. ``histogram`` (reference step 1, ``bincount``): each warp counts its tile's experts with
   shared-memory integer atomics (deterministic: integer adds commute) and writes the column
   ``tile_counts[:, tile]``.
2. ``scan_tiles`` (the per-tile half of step 2): one warp per expert turns its row of
   ``tile_counts`` into an exclusive prefix over tiles, in place, and writes ``f_e`` = the total.
3. ``offsets`` (step 2, the exclusive cumsum): one warp scans ``f`` into ``expert_offsets``.
4. ``scatter`` (steps 3-5, the *stable* grouping): each warp walks its tile in pair order, 32
   pairs at a time. ``match.any.sync`` finds the lanes holding the same expert; a lane's rank among
   them (``popc(peers & lanemask_lt)``) plus the expert's running row counter (in shared memory,
   started at ``offsets[e] + rows of e in earlier tiles``) is its row. Pairs of one expert thus
   get rows in pair order, exactly like the reference's stable sort. The warp writes
   ``row_of_pair[p]``, ``pair_of_row[row]`` and ``gather_idx[row]`` directly: no sort, no inverse
   permutation pass.

E and P are known on the host from the shapes, so every buffer is allocated without reading the
device. The kernels are compiled once per *expert bucket* (the next power of two >= E, at least
32; it only sizes the shared-memory counters) with all lengths dynamic.

**Token rounding (Algorithm 4) without sorting the (T, E) score matrix: two CuTe kernels.**
The reference ranks all T tokens of every expert (two stable sorts of a (T, E) matrix). But only
an expert's *last tile* changes: with f_e token-choice picks and the rounded count ``rounded_e``,

* ``rounded_e < f_e`` (rounded down): expert e keeps all but its ``d_e = f_e - rounded_e`` worst
  picks (d_e < tile_m);
* ``rounded_e > f_e`` (rounded up): expert e keeps all its picks plus the ``r_e = rounded_e - f_e``
  best non-picked tokens (r_e < tile_m).

Both are "the r best of one expert's candidates" for some r < tile_m, with the key = the score
(up, candidates = non-picks) or the negated score (down, candidates = picks). So per expert we
only need the r-th best key (a *threshold*) and the tie rule at it, never a sorted column:

1. ``BoundaryKeysKernel`` turns the (T, E) ranking scores (the router probabilities p[t, e],
   softmax over all E, see the reference) into one contiguous row of *key words* per
   expert, ``keys[e, t]`` (E, T) int32: the float32 bits of ``p[t, e]`` with bit 31 set at the
   token-choice picks (p is >= +0.0, so bit 31 is free and the other bits order like p). It moves 32 x 32 tiles through shared memory, so reads and writes stay coalesced, and
   also writes the (T, E) uint8 pick mask ``keep``.
2. ``BoundarySelectKernel``, one CTA per expert: the rounding rule (``round_counts``'s integer
   math; the stochastic uniforms are drawn by torch exactly as the reference draws them) gives
   delta_e; then a **radix select** over the row finds the |delta_e|-th largest selection key,
   8 bits per pass (up to 4 passes of a shared-memory histogram over the row, each keeping only
   the keys that match the digits fixed so far; it stops once a digit's bin is taken whole), and
   a final pass in token order flips ``keep`` for every key above the threshold and for the
   right tokens among those equal to it: the lowest tokens for up (a lower token ranks higher in
   the reference), the highest for down (the highest token ranks lowest). Tie ranks come from warp ballots plus per-warp totals; the scan is
   skipped when every tied key is taken (the usual case with distinct scores). An expert with
   delta_e = 0 exits at once; the others store at most tile_m - 1 bytes.

Both kernels run from one compiled call (``TokenRoundingKernels``: one host launch, no sync).
Cost: every pass reads one row of T keys (L2-resident; in the layer's fused call the row is first
copied into shared memory when T <= 48 Ki, and the passes read it there), so the selection is
O(T) per expert with no sort and no (T, E)-wide temporaries besides the keys and the mask.
What stays torch: the probabilities p and the weights (the reference's formulas, so the compared
floats are bit-identical: a ``softmax`` and a ``scatter``, in place when autograd is off; differentiable
through one autograd node, ``TokenRoundingScores``, see below),
the stochastic draw (``torch.rand`` on the device, from the given generator),
the device-side counts of ``routing.rounding`` (a few (T, E) and (E,) reductions), and the
token-sorted triples from the (T, E) mask: ``nonzero`` by default (it sizes the output by the data
dependent P: one host sync), or, with ``pad_to_bound=True`` (what the MoE layer uses),
``nonzero_static`` sized by the host bound ``reference.routing.max_pairs``, with no sync at all,
plus the padding's ids (a ``remainder`` into int32 per column) and the score gather. Float64
logits give float64 scores, which do not fit the 32-bit key words: they take a torch-op selection
(``torch.topk`` with k = min(tile_m - 1, T) over (E, T) keys for the threshold, ``cumsum`` for the
tie ranks), the design this module used before the kernels.

**Launches of the router step, and why there are several.** With ``fused_glue=False`` (the glue
between the CuTe calls as torch ops, the readable variant) the layer's token-rounding router
(``fast.moe.route_layer``) issues 34 launches, 30 torch ops and 4 CuTe calls (10 kernels);
``tests/test_router_launches.py`` counts them on the CPU, phase by phase, and fails if the count
changes:

* the router GEMM (cuBLAS) and its float32 cast (2; the reference rounds the logits to x's dtype
  first, so a float32-output GEMM would change them);
* the bitonic top-k kernel, its experts' int32 copy (the kernels' index type; torch's gather and
  scatter take int64), and the counts-only histogram (one compiled call of three kernels);
* the (T, E) ``softmax`` (the ranking key p) and the token-choice weights (a gather and a softmax
  over K; ``topk_softmax`` gathers from p itself), then the weights written over p in place
  (3: the picks' p saved by a ``gather``, the ``scatter_`` of w, and after the triples' weights are
  read, the ``scatter_`` that puts p back for the backward; a (T, E) copy would move T*E values);
* the two token-rounding kernels (one compiled call);
* the counts of ``routing.rounding`` (``_rounding_stats``: one (3, E) reduction, 5 launches, and 3
  for the tokens left with no expert, a reduction over the other axis of the mask);
* the padded triples (``_padded_triples``: ``nonzero_static`` and 5 elementwise launches) and
  their weights (an ``index_select`` at the flat indices t * E + e and a ``where`` for the padding);
* the metadata kernels (one compiled call of four), the padded rows' initialization (3) and the
  token offsets (an ``arange`` and a ``searchsorted``).

The CuTe calls are separate because each step needs a grid-wide result of the one before: the
counts f_e need every token's top-k, the boundary select needs every f_e and the whole key row of
its expert, the token-sorted triples need the final mask of every expert, and the metadata needs
every pair's expert. Fusing them would take grid-wide barriers (cooperative launches) or one CTA
doing all the work. The torch ops between them keep the scores bit-identical to the reference's
(the softmaxes, the gather, the scatter, the score gather of the triples), or are reductions and
compactions that need the whole mask (the counts, the ``nonzero_static``); none reads the device
on the host, so the host issues the whole step ahead of the GPU.

**The backward of the scores: one autograd node.** Recorded op by op, the scores' graph costs the
backward 10 launches with ``softmax_topk`` (one node per op: the padding's ``where``, the triples'
gather, the weights' scatter, the token-choice gather and softmax, the ranking key's softmax, and
the sum of the logits' two gradients). The router computes p and the token-choice weights as
values and hands them, with the triples' flat indices, to ``TokenRoundingScores``, whose forward
runs the same ops (the same bits) and whose backward runs 9 launches with ``softmax_topk``: the
padding sent to a spare entry (``where``, and the int64 copy ``index_copy_`` takes), the triples'
gradient into (T, E) (``zeros``, ``index_copy_``: a scatter without atomics), the picks' part
(``gather``) and the rest (``scatter_``), the two softmax backwards, the picks' part added
(``scatter_add_``); with ``topk_softmax`` (the weights are p itself) 5: the softmax backward of the
whole (T, E) gradient. The arithmetic is autograd's (``softmax_topk``: on the reference's graph, the
same bits; ``topk_softmax``: one softmax backward where the reference adds two, another rounding);
both glues of the layer read their weights through it. On the GPU (float32 logits, ``softmax_topk``
or ``topk_softmax`` without ``normalize``, K <= 32) those ops are one kernel,
``ScoresBackwardKernel``: a warp per token reads the token's pairs (its gradients, at
``token_offsets[t]``), finds which are picks with shuffles and ballots, forms the two row sums and
writes the token's row of dlogits once: no (T, E) gradient is built, zeroed or scattered. Same
formulas; its sums add the same products in another order, so the gradient may differ from the
torch ops' in the last bits (``tests/test_fused_router_glue.py`` bounds it against float64 by
twice the reference's own error); both glues get the same bits.

**The layer's default: the glue as kernels (``fused_glue=True``; checked on the CPU with torch
stand-ins for the kernels, on the GPU by ``tests/test_fused_router_glue.py``: the same routing, output
and gradients bit for bit; the benchmark ``benchmarks/token_rounding.py`` times both).** The padded triples, the counts
of ``routing.rounding`` and the token offsets come from ``PaddedTriplesKernel`` (count, scan and
write over tiles of tokens) inside the token-rounding compiled call, and the scatter kernel writes
the padded metadata's padding entries itself. The triples' weights come out of the same write
kernel: the keys kernel writes each pick's slot into its keep byte (1 + j for the token's j-th
pick) and the select kernel marks the pairs it adds (``ADDED_BYTE``), so for every kept pair the
write kernel copies w[t, j] or p[t, e], the reference's ``pair_weights`` bit for bit, and
``TokenRoundingScores``' forward runs no op. 10 launches (6 torch, 4 CuTe calls of 13 kernels;
15 before the weights moved into the kernel: the picks' p saved, w written over p, the weights'
``index_select`` and padding ``where``, p put back). What stays torch then is what autograd must
see or what the reference rounds: the router GEMM and its cast, the softmax and the token-choice
weights (gather, softmax over K) and the experts' int32 copy. The four CuTe calls stay apart for
the grid-wide reasons above, and because the torch ops between them (the int32 copy, the softmax,
the weights) feed the next one.

**Exact agreement with the reference.** The expert indices are integers (the bitonic kernel and the
reference's radix select agree exactly, ties to the lower expert). The scores are computed from
those indices with the reference's formulas (torch ops), so they are bit-identical, stay
differentiable, and the rankings of token rounding compare exactly the same floats. The
stochastic rounding draws its E uniforms exactly as the reference does (``torch.rand(E,
float64, generator)``), so the same generator state gives the same routing.
"""

from __future__ import annotations

import functools

import torch

from sonic_learn import _checks, contracts
from sonic_learn._deprecated import renamed
from sonic_learn.contracts import ROUNDING_MODES, SCORINGS, Routing, RoutingMetadata  # noqa: F401
from sonic_learn.fast._cute import compile_options, compiled, import_cutlass, launch
from sonic_learn.reference import routing as _ref

cutlass = import_cutlass()
import cutlass.cute as cute  # noqa: E402  (after the arch is pinned by import_cutlass)
from cutlass import Float64, Int32, Int64, Uint8, Uint32, const_expr  # noqa: E402
from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream  # noqa: E402

from sonic_learn.fast import topk as _fast_topk  # noqa: E402
from sonic_learn.fast.primitives import (  # noqa: E402
    lane_bins_and_keys_above, warp_exclusive_max, warp_exclusive_scan, warp_exclusive_sum, warp_sum)

__all__ = [
    "Routing",
    "RoutingMetadata",
    "build_metadata",
    "topk_routing",
    "round_counts",
    "token_rounding",
    "layer_token_rounding",
    "compile_metadata_kernel",
    "compile_token_rounding_kernels",
    "compile_token_rounding_triples_kernels",
    "TokenRoundingKernels",
    "TokenRoundingTriplesKernels",
    "MAX_EXPERTS",
    "SELECTIONS",
]
__getattr__ = renamed(__name__, globals(), {"CHUNK": "CHUNK_PAIRS"})  # one name, one meaning

# ---------------------------------------------------------------------------------------------
# Kernel geometry
# ---------------------------------------------------------------------------------------------
WARPS_PER_CTA = 4
THREADS_PER_CTA = 32 * WARPS_PER_CTA
UNROLL = 8  # 32-pair groups a lane loads before using them (hides global-load latency)
CHUNK_PAIRS = 32 * UNROLL  # pairs per chunk; a warp's tile is chunks_per_tile chunks
TARGET_TILES = 1024  # keep the tile_counts buffer (E x tiles) and the tile scan small
MIN_BUCKET = 32
MAX_EXPERTS = 2048  # shared memory: WARPS_PER_CTA x bucket int32 counters (32 KiB at the max)
MAX_PAIRS = 2**31 - 1  # rows and pairs are int32 inside the kernels
FULL_MASK = 0xFFFFFFFF


def _expert_bucket(num_experts: int) -> int:
    """The compiled variant serving E experts: the next power of two >= E (at least 32)."""
    return max(MIN_BUCKET, 1 << (num_experts - 1).bit_length())


def _tiling(num_pairs: int) -> tuple[int, int]:
    """(chunks_per_tile, num_tiles) for P pairs: ~TARGET_TILES warps, at least one chunk each."""
    chunks = -(-num_pairs // CHUNK_PAIRS)
    chunks_per_tile = max(1, -(-chunks // TARGET_TILES))
    return chunks_per_tile, -(-chunks // chunks_per_tile)


# ---------------------------------------------------------------------------------------------
# The metadata kernels
# ---------------------------------------------------------------------------------------------
class RoutingMetadataKernel:
    """Histogram -> per-tile scan -> offsets -> stable scatter (see the module docstring).

    Compile-time: ``bucket`` (shared-memory counters per warp, >= E), ``scatter`` (False = stop
    after counts and offsets, for token rounding) and ``fill_padding`` (opt-in, a padded routing:
    the scatter also writes the padding entries of the row arrays, ``_launch_metadata``'s three
    torch initializations). Runtime: P, E, the tile count, chunks_per_tile.
    """

    def __init__(self, bucket: int, scatter: bool = True, fill_padding: bool = False):
        self.bucket = bucket
        self.scatter = scatter
        self.fill_padding = fill_padding

    @cute.jit
    def __call__(
        self,
        mExpert: cute.Tensor,  # (P,) int32 expert of each pair
        mToken: cute.Tensor,  # (P,) int32 token of each pair
        mTileCounts: cute.Tensor,  # (E, num_tiles) int32 scratch: counts, then prefixes
        mCounts: cute.Tensor,  # (E,) out: f_e
        mOffsets: cute.Tensor,  # (E+1,) out: exclusive cumsum of f
        mGather: cute.Tensor,  # (P,) out: token of each row
        mPairOfRow: cute.Tensor,  # (P,) out
        mRowOfPair: cute.Tensor,  # (P,) out
        chunks_per_tile: Int32,
        stream,
    ):
        num_experts = mCounts.shape[0]
        tile_ctas = cute.ceil_div(mTileCounts.shape[1], WARPS_PER_CTA)
        block = [THREADS_PER_CTA, 1, 1]
        self.histogram_kernel(mExpert, mTileCounts, chunks_per_tile).launch(
            grid=[tile_ctas, 1, 1], block=block, stream=stream
        )
        self.scan_tiles_kernel(mTileCounts, mCounts).launch(
            grid=[cute.ceil_div(num_experts, WARPS_PER_CTA), 1, 1], block=block, stream=stream
        )
        self.offsets_kernel(mCounts, mOffsets).launch(grid=[1, 1, 1], block=[32, 1, 1], stream=stream)
        if const_expr(self.scatter):
            self.scatter_kernel(
                mExpert, mToken, mTileCounts, mOffsets, mGather, mPairOfRow, mRowOfPair, chunks_per_tile
            ).launch(grid=[tile_ctas, 1, 1], block=block, stream=stream)

    @cute.jit
    def _load_chunk(self, mExpert: cute.Tensor, chunk_start: Int32, lane: Int32, num_experts: Int32):
        """Experts of one chunk (lane l holds pairs chunk_start + 32u + l); -1 past the end or for
        an id outside [0, E) (such pairs are skipped: never an out-of-bounds write)."""
        ids = cute.make_rmem_tensor(UNROLL, Int32)
        num_pairs = mExpert.shape[0]
        for u in cutlass.range_constexpr(UNROLL):
            p = chunk_start + u * 32 + lane
            e = Int32(-1)
            if p < num_pairs:
                e = mExpert[p]
            if e >= num_experts:
                e = Int32(-1)
            if e < 0:
                e = Int32(-1)
            ids[u] = e
        return ids

    # -- Phase 1: per-tile histogram (reference step 1) ----------------------------------------
    @cute.kernel
    def histogram_kernel(self, mExpert: cute.Tensor, mTileCounts: cute.Tensor, chunks_per_tile: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        warp = tidx // 32
        tile = bidx * WARPS_PER_CTA + warp
        num_experts = mTileCounts.shape[0]

        smem = cutlass.memory.SmemAllocator()
        hist_all = smem.allocate_tensor(Int32, cute.make_layout((self.bucket, WARPS_PER_CTA)), byte_alignment=16)
        hist = hist_all[None, warp]  # this warp's counters, one per expert
        for e in cutlass.range(lane, num_experts, 32):
            hist[e] = Int32(0)
        cute.arch.sync_warp()

        tile_start = tile * chunks_per_tile * CHUNK_PAIRS
        for c in cutlass.range(chunks_per_tile):
            ids = self._load_chunk(mExpert, tile_start + c * CHUNK_PAIRS, lane, num_experts)
            for u in cutlass.range_constexpr(UNROLL):
                if ids[u] >= 0:
                    cute.arch.atomic_add((hist.iterator + ids[u]).llvm_ptr, Int32(1))
        cute.arch.sync_warp()

        if tile < mTileCounts.shape[1]:
            for e in cutlass.range(lane, num_experts, 32):
                mTileCounts[e, tile] = hist[e]

    # -- Phase 2: per expert, exclusive prefix over tiles, and f_e (reference step 1's total) ----
    @cute.kernel
    def scan_tiles_kernel(self, mTileCounts: cute.Tensor, mCounts: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        e = bidx * WARPS_PER_CTA + tidx // 32
        if e < mCounts.shape[0]:
            row = mTileCounts[e, None]  # (num_tiles,) counts of expert e, tile by tile
            total = warp_exclusive_scan(row, row, mTileCounts.shape[1], lane, UNROLL)
            if lane == 0:
                mCounts[e] = total

    # -- Phase 3: expert offsets (reference step 2) ---------------------------------------------
    @cute.kernel
    def offsets_kernel(self, mCounts: cute.Tensor, mOffsets: cute.Tensor):
        lane = cute.arch.lane_idx()
        num_experts = mCounts.shape[0]
        total = warp_exclusive_scan(mCounts, mOffsets, num_experts, lane, UNROLL)
        if lane == 0:
            mOffsets[num_experts] = total

    # -- Phase 4: stable scatter (reference steps 3-5) -------------------------------------------
    @cute.kernel
    def scatter_kernel(
        self,
        mExpert: cute.Tensor,
        mToken: cute.Tensor,
        mTilePrefix: cute.Tensor,
        mOffsets: cute.Tensor,
        mGather: cute.Tensor,
        mPairOfRow: cute.Tensor,
        mRowOfPair: cute.Tensor,
        chunks_per_tile: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        warp = tidx // 32
        tile = bidx * WARPS_PER_CTA + warp
        num_experts = mTilePrefix.shape[0]

        smem = cutlass.memory.SmemAllocator()
        next_all = smem.allocate_tensor(Int32, cute.make_layout((self.bucket, WARPS_PER_CTA)), byte_alignment=16)
        next_row = next_all[None, warp]  # next free grouped row of each expert, for this tile
        if tile < mTilePrefix.shape[1]:
            for e in cutlass.range(lane, num_experts, 32):
                next_row[e] = mOffsets[e] + mTilePrefix[e, tile]
        cute.arch.sync_warp()

        below = cute.arch.lanemask_lt()
        above = cute.arch.lanemask_gt()
        tile_start = tile * chunks_per_tile * CHUNK_PAIRS
        num_pairs = mExpert.shape[0]
        for c in cutlass.range(chunks_per_tile):
            chunk_start = tile_start + c * CHUNK_PAIRS
            ids = self._load_chunk(mExpert, chunk_start, lane, num_experts)
            tokens = cute.make_rmem_tensor(UNROLL, Int32)
            for u in cutlass.range_constexpr(UNROLL):
                p = chunk_start + u * 32 + lane
                t = Int32(0)
                if p < num_pairs:
                    t = mToken[p]
                tokens[u] = t
            for u in cutlass.range_constexpr(UNROLL):
                p = chunk_start + u * 32 + lane
                e = ids[u]
                # Lanes with the same expert, and this lane's rank among them (pair order).
                peers = cute.arch.match_sync(FULL_MASK, e)
                rank = Int32(cute.arch.popc(peers & below))
                base = Int32(0)
                if e >= 0:
                    base = next_row[e]
                cute.arch.sync_warp()  # every lane has read its counter before any is advanced
                if e >= 0:
                    row = base + rank
                    mRowOfPair[p] = row
                    mPairOfRow[row] = p
                    mGather[row] = tokens[u]
                    if (peers & above) == Uint32(0):  # the last lane of the group advances e's counter
                        next_row[e] = base + Int32(cute.arch.popc(peers))
                if const_expr(self.fill_padding):
                    # A padding pair maps to its own row, and a row past the true P (no real pair
                    # writes one) reads token 0 for pair r: p stands for both indices here.
                    if p < num_pairs:
                        if e < 0:
                            mRowOfPair[p] = p
                        if p >= mOffsets[num_experts]:
                            mGather[p] = Int32(0)
                            mPairOfRow[p] = p
                cute.arch.sync_warp()


# ---------------------------------------------------------------------------------------------
# Compile (once per variant) and launch
# ---------------------------------------------------------------------------------------------
def compile_metadata_kernel(bucket: int, scatter: bool = True, fill_padding: bool = False, *, extra_options: str = ""):
    """Compile the metadata kernels for sm_90a from fake tensors (no GPU needed); not cached.

    ``bucket`` is a power of two in [32, MAX_EXPERTS] bounding E. All lengths (P, E, tiles) are
    symbolic, so one compile serves every routing with E <= bucket. Returns the TVM-FFI callable
    ``f(expert, token, tile_counts, counts, offsets, gather_idx, pair_of_row, row_of_pair,
    chunks_per_tile)``.
    """
    if bucket < MIN_BUCKET or bucket > MAX_EXPERTS or bucket & (bucket - 1):
        raise ValueError(f"bucket must be a power of two in [{MIN_BUCKET}, {MAX_EXPERTS}], got {bucket}")
    if fill_padding and not scatter:
        raise ValueError("fill_padding=True needs scatter=True (the scatter kernel writes the padding)")
    op = RoutingMetadataKernel(bucket, scatter, fill_padding)

    def vec():
        return make_fake_compact_tensor(Int32, (cute.sym_int(),), assumed_align=4)

    tile_counts = make_fake_compact_tensor(Int32, (cute.sym_int(), cute.sym_int()), stride_order=(1, 0), assumed_align=4)
    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    return cute.compile(
        op, vec(), vec(), tile_counts, vec(), vec(), vec(), vec(), vec(), Int32(1), stream,
        options=compile_options(extra=extra_options),
    )


@functools.lru_cache(maxsize=None)
def _unused_rows(device: torch.device) -> tuple[torch.Tensor, ...]:
    """Placeholders for the three row arrays of the counts-only variant (saves three allocations)."""
    return tuple(torch.empty(1, dtype=torch.int32, device=device) for _ in range(3))


def _launch_metadata(expert_idx: torch.Tensor, token_idx: torch.Tensor | None, num_experts: int, scatter: bool,
                     padded: bool = False, fused_glue: bool = False):
    """Run the kernels on validated, int32, contiguous CUDA inputs; no host sync.

    Returns (counts, offsets, gather_idx, pair_of_row, row_of_pair); the last three are None when
    ``scatter`` is False. ``padded``: the pairs past the true P have the out-of-range expert E
    (padding, skipped by the kernels), so the row arrays are initialized first: a row r past
    expert_offsets[E] gets gather_idx 0 and pair_of_row r, a padding pair p gets row_of_pair p.
    Padding rows and padding pairs map to each other, never to a real pair or row (a kernel that
    walks every row, like the standard backward's gather-scale-dot, then writes padding entries only).
    ``fused_glue`` (with ``padded``): the scatter kernel writes those padding entries
    itself, instead of three torch initializations.
    """
    device = expert_idx.device
    P, E = expert_idx.numel(), num_experts
    i32 = torch.int32
    alloc = torch.empty if P > 0 else torch.zeros  # the kernels write every count and offset
    counts = alloc(E, dtype=i32, device=device)
    offsets = alloc(E + 1, dtype=i32, device=device)
    fill_in_kernel = scatter and padded and fused_glue
    if scatter:
        if padded and not fill_in_kernel:
            ids = torch.arange(P, dtype=i32, device=device)  # (P,) padding rows <-> padding pairs
            rows = [torch.zeros(P, dtype=i32, device=device), ids, ids.clone()]  # gather, pair_of_row, row_of_pair
        else:
            rows = [torch.empty(P, dtype=i32, device=device) for _ in range(3)]  # gather, pair_of_row, row_of_pair
    else:
        rows = _unused_rows(device)  # never touched by the counts-only variant
    if P > 0:
        chunks_per_tile, num_tiles = _tiling(P)
        tile_counts = torch.empty(E, num_tiles, dtype=i32, device=device)  # (E, tiles) scratch
        tokens = token_idx if token_idx is not None else expert_idx  # read only when scattering
        launch(compiled(compile_metadata_kernel, _expert_bucket(E), scatter, fill_in_kernel), device,
               expert_idx, tokens, tile_counts, counts, offsets, *rows, chunks_per_tile)  # current stream
    return (counts, offsets, *rows) if scatter else (counts, offsets, None, None, None)


# ---------------------------------------------------------------------------------------------
# Token rounding kernels (Algorithm 4, steps 2-4): keys per expert row, then a boundary select
# ---------------------------------------------------------------------------------------------
PACK_TILE = 32  # the pack kernel moves 32 tokens x 32 experts per CTA through shared memory
PACK_WARPS = 8
SELECT_WARPS = 16
SELECT_THREADS = 32 * SELECT_WARPS
SELECT_UNROLL = 16  # keys a thread loads before using them (hides the load latency)
RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
# Shared-memory capacities (keys) for staging an expert's key row in the select kernel, 4 bytes a
# key: the smallest that holds T is compiled (steps of 8 Ki keys keep the CTAs per SM high; 48 Ki
# keys = 192 KiB of the 227 KiB a Hopper CTA may use); longer rows are read from global memory.
SELECT_STAGE_KEYS = tuple(8192 * i for i in range(1, 7))
ROUNDING_CODES = {"down": 0, "up": 1, "nearest": 2, "stochastic": 3}  # the select kernel's `mode`
PICK_BIT = -(2**31)  # bit 31 of a key word (as int32): set = a token-choice pick
# The fused call's keep bytes (``pick_slots``): 1 + j at the token's j-th token-choice pick (j < K),
# ADDED_BYTE at a non-pick the select kernel added, 0 elsewhere; so the triples' write kernel knows
# where each kept pair's weight is (w[t, j] or p[t, e]) without a second look at the picks.
ADDED_BYTE = 255
MAX_SLOT_K = ADDED_BYTE - 1  # the largest K whose pick slots a keep byte can name


@cute.jit
def rounding_delta(mCounts: cute.Tensor, mUniform: cute.Tensor, e: Int32, mode: Int32, tile_m: Int64,
                   T: Int32) -> Int32:
    """rounded_e - f_e for expert e: the rounding rule of ``reference.routing.round_counts`` in int64
    like the reference (``mUniform[e]``, the stochastic draw, is read only in that mode)."""
    f = Int64(mCounts[e])
    floor_f = (f // tile_m) * tile_m
    rem = f - floor_f
    ceil_f = floor_f
    if rem > Int64(0):
        ceil_f = floor_f + tile_m
    go_up = Int32(0)
    if mode == ROUNDING_CODES["up"]:
        if rem > Int64(0):
            go_up = Int32(1)
    if mode == ROUNDING_CODES["nearest"]:
        if rem * Int64(2) > tile_m:  # strict: exact halves round down
            go_up = Int32(1)
    if mode == ROUNDING_CODES["stochastic"]:
        if mUniform[e] * Float64(tile_m) < Float64(rem):
            go_up = Int32(1)
    rounded = floor_f
    if go_up != 0:
        rounded = ceil_f
    if rounded > Int64(T):
        rounded = Int64(T)  # an expert cannot take more than T tokens
    return Int32(rounded - f)


class BoundaryKeysKernel:
    """Step 3 of the fast token rounding: per-expert rows of keys, and the token-choice mask.

    Reads the (T, E) score matrix (float32 bits) and the (T, K) token-choice experts; writes

    * ``keys`` (E, T) int32: ``keys[e, t]`` = the bits of ``scores[t, e]`` with bit 31 set when
      (t, e) is a token-choice pick. Scores are >= +0.0, so bit 31 is free and the other 31 bits
      order like the scores;
    * ``keep`` (T, E) uint8: 1 at the picks (the select kernel then flips the boundary pairs);
      with ``pick_slots`` (the fused call) 1 + j at the token's j-th pick, which tells the triples'
      write kernel that the pair's weight is w[t, j].

    One CTA moves a 32 x 32 tile through shared memory (padded rows: no bank conflicts), so both
    the (T, E) read and the (E, T) write touch whole 128-byte lines.
    """

    def __init__(self, pick_slots: bool = False):
        self.pick_slots = pick_slots

    @cute.jit
    def __call__(self, mScores: cute.Tensor, mExperts: cute.Tensor, mKeys: cute.Tensor, mKeep: cute.Tensor, stream):
        grid = [cute.ceil_div(mScores.shape[0], PACK_TILE), cute.ceil_div(mScores.shape[1], PACK_TILE), 1]
        self.kernel(mScores, mExperts, mKeys, mKeep).launch(grid=grid, block=[32 * PACK_WARPS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        mScores: cute.Tensor,  # (T, E) int32: float32 bits of the scores
        mExperts: cute.Tensor,  # (T, K) int32: token-choice experts
        mKeys: cute.Tensor,  # (E, T) int32 out
        mKeep: cute.Tensor,  # (T, E) uint8 out
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bx, by, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        warp = tidx // 32
        T, E = mScores.shape[0], mScores.shape[1]
        K = mExperts.shape[1]
        t0 = bx * PACK_TILE
        e0 = by * PACK_TILE

        smem = cutlass.memory.SmemAllocator()
        # tile[i, j] = word of (token t0 + i, expert e0 + j); rows padded to 33 words
        tile = smem.allocate_tensor(Int32, cute.make_layout((PACK_TILE, PACK_TILE), stride=(PACK_TILE + 1, 1)),
                                    byte_alignment=16)
        if const_expr(self.pick_slots):  # slot[i, j] = 1 + the pick's position in the token's row, else 0
            slot = smem.allocate_tensor(Int32, cute.make_layout((PACK_TILE, PACK_TILE), stride=(PACK_TILE + 1, 1)),
                                        byte_alignment=16)

        # (a) scores in, row by row: lane j reads expert e0 + j (coalesced along E).
        for m in cutlass.range_constexpr(PACK_TILE // PACK_WARPS):
            i = warp + m * PACK_WARPS
            t = t0 + i
            e = e0 + lane
            word = Int32(0)
            if t < T and e < E:
                word = mScores[t, e]
            tile[i, lane] = word
            if const_expr(self.pick_slots):
                slot[i, lane] = Int32(0)
        cute.arch.sync_threads()

        # (b) mark the picks of these 32 tokens that fall into these 32 experts (distinct per token).
        for idx in cutlass.range(tidx, PACK_TILE * K, 32 * PACK_WARPS):
            i = idx // K
            t = t0 + i
            if t < T:
                j = mExperts[t, idx - i * K] - e0
                if j >= 0 and j < PACK_TILE:
                    tile[i, j] = tile[i, j] | Int32(PICK_BIT)
                    if const_expr(self.pick_slots):
                        slot[i, j] = idx - i * K + 1
        cute.arch.sync_threads()

        # (c) keys out, one expert row at a time: lane i writes token t0 + i (coalesced along T).
        for m in cutlass.range_constexpr(PACK_TILE // PACK_WARPS):
            j = warp + m * PACK_WARPS
            t = t0 + lane
            e = e0 + j
            if t < T and e < E:
                mKeys[e, t] = tile[lane, j]
        # (d) the pick mask, in the (T, E) layout of (a).
        for m in cutlass.range_constexpr(PACK_TILE // PACK_WARPS):
            i = warp + m * PACK_WARPS
            t = t0 + i
            e = e0 + lane
            if t < T and e < E:
                if const_expr(self.pick_slots):
                    mKeep[t, e] = Uint8(slot[i, lane])
                else:
                    mKeep[t, e] = Uint8((tile[i, lane] >> 31) & 1)


class BoundarySelectKernel:
    """Steps 2 and 4 of the fast token rounding: one CTA per expert e.

    1. The rounding rule of ``reference.routing.round_counts`` (integer math; the stochastic
       draw ``u_e`` comes in from torch) gives ``rounded_e`` and ``delta_e = rounded_e - f_e``.
       ``delta_e == 0``: the CTA is done.
    2. Candidates and selection keys (larger = taken first), from the key row ``keys[e, :]``:
       up (delta_e > 0): the non-picks, key = score bits; down (delta_e < 0): the picks,
       key = 0x7FFFFFFF - score bits (the worst pick is dropped first). Keys are 31-bit, >= 0.
    3. Radix select of the r = |delta_e|-th largest key: up to four 8-bit digit passes over the
       row, each a shared-memory histogram of the keys matching the digits fixed so far (lanes
       with the same digit add their count with one atomic, found with ``match.any``); warp 0
       finds the bin holding the r-th key. After the passes ``thr`` is that key exactly,
       ``need`` of the keys equal to it are taken and ``ties`` is how many equal it. A pass whose
       bin is taken whole (its count is exactly the ``need`` left, the usual case once a few
       digits are fixed) ends the select early: every key >= the digits fixed so far (lower bits
       zero) is taken, so ``thr`` = that prefix and ``ties`` = ``need``.
    4. Collect, in token order: every key > thr, and among keys == thr the reference's tie rule:
       the ``need`` lowest tokens (up: a lower token ranks higher) or the ``need`` highest
       (down: the highest token ranks lowest). Ranks among ties come from a block scan
       (warp ballots + per-warp totals); when every tie is taken (ties == need, the usual
       case) the scan is skipped. Each taken token flips ``keep[t, e]`` (up: 0 -> 1, down:
       1 -> 0): at most |delta_e| < tile_m byte stores per expert.

    ``stage_keys`` (compile time; 0 = off, the default): a CTA with delta_e != 0 first copies its
    row's selection keys (T <= stage_keys) into shared memory with one pass over global memory
    that also builds the first radix histogram; every later pass of steps 3 and 4 reads shared
    memory instead of the row in global memory (L2).
    """

    def __init__(self, stage_keys: int = 0, added_byte: int = 1):
        self.stage_keys = stage_keys
        self.added_byte = added_byte  # the keep byte of an added pair (ADDED_BYTE with pick slots)

    @cute.jit
    def __call__(self, mKeys: cute.Tensor, mCounts: cute.Tensor, mUniform: cute.Tensor, mKeep: cute.Tensor,
                 mode: Int32, tile_m: Int64, stream):
        self.kernel(mKeys, mCounts, mUniform, mKeep, mode, tile_m).launch(
            grid=[mKeys.shape[0], 1, 1], block=[SELECT_THREADS, 1, 1], stream=stream
        )

    @cute.jit
    def _load_keys(self, row: cute.Tensor, T: Int32, base: Int32, tidx: Int32, up: Int32,
                   from_words: cutlass.Constexpr[bool]):
        """Selection keys of tokens base + u * SELECT_THREADS + tidx (u < SELECT_UNROLL); -1 for a
        non-candidate or past the end. ``row``: the expert's (T,) key words in global memory
        (``from_words``), or its selection keys staged in shared memory."""
        keys = cute.make_rmem_tensor(SELECT_UNROLL, Int32)
        for u in cutlass.range_constexpr(SELECT_UNROLL):
            t = base + u * SELECT_THREADS + tidx
            key = Int32(-1)
            if t < T:
                if const_expr(from_words):
                    word = row[t]
                    if up != 0:
                        if word >= 0:  # not a pick
                            key = word
                    else:
                        if word < 0:  # a pick: invert its score so the worst ranks first
                            key = Int32(0x7FFFFFFF) - (word & Int32(0x7FFFFFFF))
                else:
                    key = row[t]
            keys[u] = key
        return keys

    @cute.jit
    def _count_digits(self, hist: cute.Tensor, keys: cute.Tensor, shift: cutlass.Constexpr[int], decided: Int32,
                      prefix: Int32, below):
        """One radix pass over a thread's loaded keys: the keys matching the digits fixed so far
        (``key & decided == prefix``) add 1 to ``hist`` at their digit ``(key >> shift) & 255``."""
        for u in cutlass.range_constexpr(SELECT_UNROLL):
            key = keys[u]
            digit = Int32(-1)  # -1: not counted in this pass
            if key >= 0 and (key & decided) == prefix:
                digit = (key >> shift) & Int32(RADIX_BINS - 1)
            # Scores crowd into few bins (the top digit is mostly the exponent): one atomic per
            # distinct digit of the warp, by its lowest lane, adding the group's size (match.any),
            # instead of up to 32 colliding atomics.
            peers = cute.arch.match_sync(FULL_MASK, digit)
            if digit >= 0 and (peers & below) == Uint32(0):
                cute.arch.atomic_add((hist.iterator + digit).llvm_ptr, Int32(cute.arch.popc(peers)))

    @cute.kernel
    def kernel(
        self,
        mKeys: cute.Tensor,  # (E, T) int32 key words (BoundaryKeysKernel)
        mCounts: cute.Tensor,  # (E,) int32 f_e
        mUniform: cute.Tensor,  # (E,) float64 u_e (read only when mode is stochastic)
        mKeep: cute.Tensor,  # (T, E) uint8 in/out: the picks, then the kept pairs
        mode: Int32,
        tile_m: Int64,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        e, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        warp = tidx // 32
        T = mKeys.shape[1]

        smem = cutlass.memory.SmemAllocator()
        hist = smem.allocate_tensor(Int32, cute.make_layout(RADIX_BINS), byte_alignment=16)
        warp_ties = smem.allocate_tensor(Int32, cute.make_layout(SELECT_WARPS), byte_alignment=16)
        found = smem.allocate_tensor(Int32, cute.make_layout(4), byte_alignment=16)  # digit, above, in bin
        row = mKeys[e, None]  # (T,) the key words of expert e, in global memory
        if const_expr(self.stage_keys > 0):
            staged = smem.allocate_tensor(Int32, cute.make_layout(self.stage_keys), byte_alignment=16)

        # 1. The rounding rule (reference _round_counts_rule), in int64 like the reference.
        delta = rounding_delta(mCounts, mUniform, e, mode, tile_m, T)  # |delta| < tile_m

        if delta != 0:  # uniform over the CTA
            up = Int32(0)
            need = -delta
            if delta > 0:
                up = Int32(1)
                need = delta
            step = SELECT_THREADS * SELECT_UNROLL
            below = cute.arch.lanemask_lt()

            # 2. (stage_keys) The row's selection keys into shared memory, with one read of the
            # row in global memory that also counts the first radix pass; the passes below and
            # the collect read shared memory.
            src = row
            from_words = const_expr(self.stage_keys == 0)
            if const_expr(self.stage_keys > 0):
                if tidx < RADIX_BINS:
                    hist[tidx] = Int32(0)
                cute.arch.sync_threads()
                for base in cutlass.range(0, T, step):
                    keys = self._load_keys(row, T, base, tidx, up, True)
                    for u in cutlass.range_constexpr(SELECT_UNROLL):
                        t = base + u * SELECT_THREADS + tidx
                        if t < T:
                            staged[t] = keys[u]
                    self._count_digits(hist, keys, 32 - RADIX_BITS, Int32(0), Int32(0), below)  # pass 0
                src = staged

            # 3. Radix select: fix the key of the need-th largest, 8 bits per pass.
            prefix = Int32(0)
            decided = Int32(0)
            ties = Int32(0)
            for p in cutlass.range_constexpr(32 // RADIX_BITS):
                if ties != need:  # else the last bin was taken whole: keys >= prefix (uniform over the CTA)
                    shift = 32 - RADIX_BITS * (p + 1)
                    if const_expr(p > 0 or self.stage_keys == 0):  # (staged: pass 0 counted while staging)
                        if tidx < RADIX_BINS:
                            hist[tidx] = Int32(0)
                        cute.arch.sync_threads()
                        for base in cutlass.range(0, T, step):
                            keys = self._load_keys(src, T, base, tidx, up, from_words)
                            self._count_digits(hist, keys, shift, decided, prefix, below)
                    cute.arch.sync_threads()
                    if warp == 0:
                        # lane l owns bins 8l..8l+7; keys in higher bins = higher lanes, then higher bins
                        per_lane = RADIX_BINS // 32
                        counts, above = lane_bins_and_keys_above(hist, lane, RADIX_BINS)
                        for b in cutlass.range_constexpr(per_lane - 1, -1, -1):
                            if above < need and above + counts[b] >= need:  # exactly one (lane, bin)
                                found[0] = lane * per_lane + b
                                found[1] = above
                                found[2] = counts[b]
                            above = above + counts[b]
                    cute.arch.sync_threads()
                    prefix = prefix | (found[0] << shift)
                    decided = decided | (Int32(RADIX_BINS - 1) << shift)
                    need = need - found[1]
                    ties = found[2]
            thr = prefix  # need (>= 1) of the `ties` keys equal to thr are taken (all of them if stopped early)
            keep_value = Uint8(0)  # down removes a pick (-> 0)
            if up != 0:
                keep_value = Uint8(self.added_byte)  # up adds a non-pick (0 -> 1, or ADDED_BYTE)

            # 4. Collect in token order.
            if ties == need:  # every key >= thr is taken: no ranks needed
                for base in cutlass.range(0, T, step):
                    keys = self._load_keys(src, T, base, tidx, up, from_words)
                    for u in cutlass.range_constexpr(SELECT_UNROLL):
                        if keys[u] >= thr:
                            mKeep[base + u * SELECT_THREADS + tidx, e] = keep_value
            else:
                first = Int32(0)  # up: the lowest `need` tied tokens; down: the highest `need`
                if up == 0:
                    first = ties - need
                seen = Int32(0)  # tied keys in earlier sub-blocks
                for base in cutlass.range(0, T, step):
                    keys = self._load_keys(src, T, base, tidx, up, from_words)
                    for u in cutlass.range_constexpr(SELECT_UNROLL):
                        key = keys[u]
                        tied = cute.arch.vote_ballot_sync(key == thr)
                        if lane == 0:
                            warp_ties[warp] = Int32(cute.arch.popc(tied))
                        cute.arch.sync_threads()
                        rank = seen + Int32(cute.arch.popc(Uint32(tied) & below))
                        for w in cutlass.range_constexpr(SELECT_WARPS):
                            n_w = warp_ties[w]
                            if w < warp:
                                rank = rank + n_w
                            seen = seen + n_w
                        take = Int32(0)
                        if key > thr:
                            take = Int32(1)
                        if key == thr:
                            if rank >= first and rank < first + need:
                                take = Int32(1)
                        if take != 0:
                            mKeep[base + u * SELECT_THREADS + tidx, e] = keep_value
                        cute.arch.sync_threads()  # warp_ties is rewritten by the next sub-block


class TokenRoundingKernels:
    """Both token-rounding kernels behind one compiled call (one host launch, two kernels in order
    on the stream): ``BoundaryKeysKernel`` then ``BoundarySelectKernel`` (``stage_keys``: its
    shared-memory row capacity, 0 = none; ``pick_slots``: the keep bytes name the pick slots and
    the added pairs, for the fused call's triples)."""

    def __init__(self, stage_keys: int = 0, pick_slots: bool = False):
        self.keys_op = BoundaryKeysKernel(pick_slots)
        self.select_op = BoundarySelectKernel(stage_keys, ADDED_BYTE if pick_slots else 1)

    @cute.jit
    def __call__(self, mScores: cute.Tensor, mExperts: cute.Tensor, mKeys: cute.Tensor, mKeep: cute.Tensor,
                 mCounts: cute.Tensor, mUniform: cute.Tensor, mode: Int32, tile_m: Int64, stream):
        self.keys_op(mScores, mExperts, mKeys, mKeep, stream)
        self.select_op(mKeys, mCounts, mUniform, mKeep, mode, tile_m, stream)


KEEP_WORD = 16  # bytes of the (T, E) keep mask one lane reads with one vector load
WORDS_IN_FLIGHT = 2  # keep words a lane loads before using them (hides the load latency)
TRIPLES_BYTE_SLACK = 32 * WORDS_IN_FLIGHT * KEEP_WORD  # int32 byte offsets a warp step may reach past T * E


class PaddedTriplesKernel:
    """``fused_glue=True`` (the layer's default): step 5 of the fast token rounding, padded, and the counts of
    ``routing.rounding``, as kernels instead of ~14 torch launches. Three kernels over *tiles* of
    consecutive tokens (one warp per tile, like the metadata kernels' pair tiles).

    The kept pairs in nonzero's order (token order, then expert order) are exactly the nonzero
    bytes of the (T, E) ``keep`` mask read as one flat array: byte f = t * E + e. A tile of tokens
    [t0, t1) is the contiguous byte range [t0 * E, t1 * E), so a warp streams it in 16-byte words
    (one vector load per lane, ``WORDS_IN_FLIGHT`` loads in flight per lane, 512 bytes per warp
    per word step), whatever E is; words that straddle two tiles are read by both and masked.

    1. ``count``: per tile, the pairs (kept bytes) and the tokens left with no expert (the tile's
       tokens minus those holding a *first* kept byte: one whose previous kept byte lies before its
       token's first byte; a warp max-scan passes the last kept byte from lane to lane).
    2. ``scan`` (one warp): the tiles' exclusive prefix of pairs (in place), the totals, and the
       rounding counts: kept = the total, added / dropped = the positive / negative parts of
       ``rounding_delta`` (the select kernel's own rule) summed over experts, dropped tokens = the
       sum of the tiles' empty tokens; ``token_offsets[T]`` = P.
    3. ``write``: every warp streams its bytes again from its tile's prefix; a lane's kept bytes
       go to consecutive positions after the kept bytes of the lanes below it (a warp prefix sum of
       the per-lane counts), and each writes ``token_idx`` = t, ``expert_idx`` = e, ``pair_index``
       = f = t * E + e (where the backward puts the weight's gradient), ``is_pair`` = 1 and the
       pair's weight ``pair_scores``: the keep byte names where it is (``pick_slots``): 1 + j, a
       token-choice pick, has w[t, j] (``tc_scores``), ``ADDED_BYTE``, a pair the rounding added,
       has p[t, e] (the (T, E) scores the selection ranked), so the weights are the reference's
       ``pair_weights`` bit for bit (copies, no arithmetic); the byte that starts a token writes
       ``token_offsets[t]``. Then the whole grid fills the padding [P, bound) with token T,
       expert E, pair_index 0, is_pair 0 and weight 0.

    Separate kernels because each needs a grid-wide result of the one before (every tile's count
    before any tile's offset)."""

    @cute.jit
    def __call__(self, mKeep: cute.Tensor, mCounts: cute.Tensor, mUniform: cute.Tensor, mode: Int32, tile_m: Int64,
                 mTilePairs: cute.Tensor, mTileEmpty: cute.Tensor, mTokenIdx: cute.Tensor, mExpertIdx: cute.Tensor,
                 mPairIndex: cute.Tensor, mIsPair: cute.Tensor, mTokenOffsets: cute.Tensor, mStats: cute.Tensor,
                 tokens_per_tile: Int32, mScores: cute.Tensor, mTcScores: cute.Tensor, mPairScores: cute.Tensor,
                 stream):
        tile_ctas = cute.ceil_div(mTilePairs.shape[0], WARPS_PER_CTA)
        block = [THREADS_PER_CTA, 1, 1]
        self.count_kernel(mKeep, mTilePairs, mTileEmpty, tokens_per_tile).launch(
            grid=[tile_ctas, 1, 1], block=block, stream=stream)
        self.scan_kernel(mTilePairs, mTileEmpty, mCounts, mUniform, mode, tile_m, mTokenOffsets, mStats).launch(
            grid=[1, 1, 1], block=[32, 1, 1], stream=stream)
        self.write_kernel(mKeep, mTilePairs, mStats, mTokenIdx, mExpertIdx, mPairIndex, mIsPair, mTokenOffsets,
                          tokens_per_tile, mScores, mTcScores, mPairScores).launch(
            grid=[tile_ctas, 1, 1], block=block, stream=stream)

    @cute.jit
    def _tile_bytes(self, tile: Int32, tokens_per_tile: Int32, T: Int32, E: Int32):
        """(tokens, lo, hi, last word): a tile's token count, its bytes [lo, hi) of the flat keep
        mask and the end (exclusive) of the 16-byte words that hold them."""
        t0 = tile * tokens_per_tile
        t1 = cutlass.min(t0 + tokens_per_tile, T)
        return t1 - t0, t0 * E, t1 * E, cute.ceil_div(t1 * E, KEEP_WORD)

    @cute.jit
    def _load_words(self, mKeep: cute.Tensor, first_word: Int32, last_word: Int32, lane: Int32):
        """The keep bytes of words first_word + 32 v + lane (v < WORDS_IN_FLIGHT) as (4, v) uint32:
        one 16-byte vector load per whole word, byte loads for the mask's last, partial word,
        zeros past ``last_word`` (exclusive)."""
        num_bytes = mKeep.shape[0] * mKeep.shape[1]
        flat = cute.make_tensor(mKeep.iterator, cute.make_layout(num_bytes))  # byte f = t * E + e
        raw = cute.make_rmem_tensor((KEEP_WORD, WORDS_IN_FLIGHT), Uint8)
        raw.fill(0)
        for v in cutlass.range_constexpr(WORDS_IN_FLIGHT):
            w = first_word + v * 32 + lane
            if w < last_word:
                if (w + 1) * KEEP_WORD <= num_bytes:
                    cute.autovec_copy(cute.local_tile(flat, (KEEP_WORD,), (w,)), raw[None, v])
                else:
                    for j in cutlass.range_constexpr(KEEP_WORD):
                        if w * KEEP_WORD + j < num_bytes:
                            raw[j, v] = flat[w * KEEP_WORD + j]
        return cute.recast_tensor(raw, Uint32)  # (4, WORDS_IN_FLIGHT): byte j of a word = bits 8(j%4).. of word j//4

    @cute.jit
    def _word_bits(self, words: cute.Tensor, v: cutlass.Constexpr[int], start: Int32, lo: Int32, hi: Int32):
        """(kept, valid): 16-bit masks over the bytes start + j of word v, valid = inside [lo, hi)
        (this tile's bytes), kept = valid and nonzero."""
        kept = Int32(0)
        for j in cutlass.range_constexpr(KEEP_WORD):
            if ((words[j // 4, v] >> (8 * (j % 4))) & Uint32(0xFF)) != Uint32(0):
                kept = kept | Int32(1 << j)
        first = cutlass.max(cutlass.min(lo - start, Int32(KEEP_WORD)), Int32(0))
        end = cutlass.max(cutlass.min(hi - start, Int32(KEEP_WORD)), Int32(0))
        valid = ((Int32(1) << end) - Int32(1)) & ~((Int32(1) << first) - Int32(1))
        return kept & valid, valid

    # -- 1. pairs and empty tokens per tile ----------------------------------------------------
    @cute.kernel
    def count_kernel(self, mKeep: cute.Tensor, mTilePairs: cute.Tensor, mTileEmpty: cute.Tensor,
                     tokens_per_tile: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        tile = bidx * WARPS_PER_CTA + tidx // 32
        T, E = mKeep.shape[0], mKeep.shape[1]
        if tile < mTilePairs.shape[0]:  # uniform over the warp
            tokens, lo, hi, last_word = self._tile_bytes(tile, tokens_per_tile, T, E)
            pairs = Int32(0)  # this lane's kept bytes
            firsts = Int32(0)  # this lane's kept bytes that are their token's first
            last_kept = Int32(-1)  # the warp's last kept byte so far (-1: none)
            for first_word in cutlass.range(lo // KEEP_WORD, last_word, 32 * WORDS_IN_FLIGHT):
                words = self._load_words(mKeep, first_word, last_word, lane)
                for v in cutlass.range_constexpr(WORDS_IN_FLIGHT):
                    start = (first_word + v * 32 + lane) * KEEP_WORD
                    kept, _ = self._word_bits(words, v, start, lo, hi)
                    pairs = pairs + Int32(cute.arch.popc(kept))
                    # The last kept byte of this word, and the last one before it (lower lanes, earlier words).
                    mine = Int32(-1)
                    for j in cutlass.range_constexpr(KEEP_WORD):
                        if (kept >> j) & 1 != 0:
                            mine = start + j
                    before, warp_last = warp_exclusive_max(mine, lane, Int32(-1))
                    prev = cutlass.max(before, last_kept)
                    last_kept = cutlass.max(warp_last, last_kept)
                    if kept != 0:
                        e = start - (start // E) * E  # expert of byte `start`
                        for j in cutlass.range_constexpr(KEEP_WORD):
                            if (kept >> j) & 1 != 0:
                                if prev < start + j - e:  # no kept byte since the token's first byte
                                    firsts = firsts + 1
                                prev = start + j
                            e = e + 1
                            if e == E:
                                e = Int32(0)
            _, tile_pairs = warp_exclusive_sum(pairs, lane)
            _, tile_firsts = warp_exclusive_sum(firsts, lane)
            if lane == 0:
                mTilePairs[tile] = tile_pairs
                mTileEmpty[tile] = tokens - tile_firsts

    # -- 2. tile offsets, P, and the rounding counts (one warp) ---------------------------------
    @cute.kernel
    def scan_kernel(self, mTilePairs: cute.Tensor, mTileEmpty: cute.Tensor, mCounts: cute.Tensor,
                    mUniform: cute.Tensor, mode: Int32, tile_m: Int64, mTokenOffsets: cute.Tensor,
                    mStats: cute.Tensor):
        lane = cute.arch.lane_idx()
        num_tiles = mTilePairs.shape[0]
        T = mTokenOffsets.shape[0] - 1
        kept = warp_exclusive_scan(mTilePairs, mTilePairs, num_tiles, lane, UNROLL)  # tile starts, in place
        empty = warp_exclusive_scan(mTileEmpty, mTileEmpty, num_tiles, lane, UNROLL)  # (only the total is used)
        added = Int32(0)
        dropped = Int32(0)
        for e in cutlass.range(lane, mCounts.shape[0], 32):
            delta = rounding_delta(mCounts, mUniform, e, mode, tile_m, T)
            if delta > 0:
                added = added + delta
            else:
                dropped = dropped - delta
        _, added_total = warp_exclusive_sum(added, lane)
        _, dropped_total = warp_exclusive_sum(dropped, lane)
        if lane == 0:  # RoundingStats' order: kept, dropped, added pairs, dropped tokens
            mStats[0] = Int64(kept)
            mStats[1] = Int64(dropped_total)
            mStats[2] = Int64(added_total)
            mStats[3] = Int64(empty)
            mTokenOffsets[T] = kept

    # -- 3. the triples, word by word, then the padding -----------------------------------------
    @cute.kernel
    def write_kernel(self, mKeep: cute.Tensor, mTileStart: cute.Tensor, mStats: cute.Tensor, mTokenIdx: cute.Tensor,
                     mExpertIdx: cute.Tensor, mPairIndex: cute.Tensor, mIsPair: cute.Tensor,
                     mTokenOffsets: cute.Tensor, tokens_per_tile: Int32, mScores: cute.Tensor, mTcScores: cute.Tensor,
                     mPairScores: cute.Tensor):
        # mScores (T, E) and mTcScores (T, K): float32 bits as int32; mPairScores (bound,) the same
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = cute.arch.lane_idx()
        tile = bidx * WARPS_PER_CTA + tidx // 32
        T, E = mKeep.shape[0], mKeep.shape[1]
        num_tiles = mTileStart.shape[0]
        flat_scores = cute.make_tensor(mScores.iterator, cute.make_layout(T * E))  # p of byte f = t * E + e
        if tile < num_tiles:  # uniform over the warp
            _, lo, hi, last_word = self._tile_bytes(tile, tokens_per_tile, T, E)
            running = mTileStart[tile]  # the position of the tile's first kept byte
            for first_word in cutlass.range(lo // KEEP_WORD, last_word, 32 * WORDS_IN_FLIGHT):
                words = self._load_words(mKeep, first_word, last_word, lane)
                for v in cutlass.range_constexpr(WORDS_IN_FLIGHT):
                    start = (first_word + v * 32 + lane) * KEEP_WORD
                    kept, valid = self._word_bits(words, v, start, lo, hi)
                    # This lane's kept bytes follow those of the lower lanes (nonzero's order).
                    before, word_total = warp_exclusive_sum(Int32(cute.arch.popc(kept)), lane)
                    pos = running + before
                    if valid != 0:
                        t = start // E  # token and expert of byte `start`, then byte by byte
                        e = start - t * E
                        for j in cutlass.range_constexpr(KEEP_WORD):
                            if e == 0 and (valid >> j) & 1 != 0:  # the first byte of token t
                                mTokenOffsets[t] = pos
                            if (kept >> j) & 1 != 0:
                                mTokenIdx[pos] = t
                                mExpertIdx[pos] = e
                                mPairIndex[pos] = start + j
                                mIsPair[pos] = Uint8(1)
                                # the weight: w[t, slot] at a pick, p[t, e] at an added pair
                                byte = Int32((words[j // 4, v] >> (8 * (j % 4))) & Uint32(0xFF))
                                if byte == ADDED_BYTE:
                                    mPairScores[pos] = flat_scores[start + j]
                                else:
                                    mPairScores[pos] = mTcScores[t, byte - 1]
                                pos = pos + 1
                            e = e + 1
                            if e == E:
                                e = Int32(0)
                                t = t + 1
                    running = running + word_total
        # Padding, grid-stride over [P, bound): rows no tile writes.
        threads = cute.ceil_div(num_tiles, WARPS_PER_CTA) * THREADS_PER_CTA
        for p in cutlass.range(Int32(mStats[0]) + bidx * THREADS_PER_CTA + tidx, mTokenIdx.shape[0], threads):
            mTokenIdx[p] = T
            mExpertIdx[p] = E
            mPairIndex[p] = Int32(0)
            mIsPair[p] = Uint8(0)
            mPairScores[p] = Int32(0)  # +0.0


class TokenRoundingTriplesKernels:
    """``fused_glue=True``: ``TokenRoundingKernels`` (keep bytes naming the pick slots) then
    ``PaddedTriplesKernel``, one compiled call (one host launch, five kernels in order on the stream)."""

    def __init__(self, stage_keys: int = 0):
        self.rounding = TokenRoundingKernels(stage_keys, pick_slots=True)
        self.triples = PaddedTriplesKernel()

    @cute.jit
    def __call__(self, mScores: cute.Tensor, mExperts: cute.Tensor, mKeys: cute.Tensor, mKeep: cute.Tensor,
                 mCounts: cute.Tensor, mUniform: cute.Tensor, mode: Int32, tile_m: Int64, mTilePairs: cute.Tensor,
                 mTileEmpty: cute.Tensor, mTokenIdx: cute.Tensor, mExpertIdx: cute.Tensor, mPairIndex: cute.Tensor,
                 mIsPair: cute.Tensor, mTokenOffsets: cute.Tensor, mStats: cute.Tensor, tokens_per_tile: Int32,
                 mTcScores: cute.Tensor, mPairScores: cute.Tensor, stream):
        self.rounding(mScores, mExperts, mKeys, mKeep, mCounts, mUniform, mode, tile_m, stream)
        self.triples(mKeep, mCounts, mUniform, mode, tile_m, mTilePairs, mTileEmpty, mTokenIdx, mExpertIdx, mPairIndex,
                     mIsPair, mTokenOffsets, mStats, tokens_per_tile, mScores, mTcScores, mPairScores, stream)


def compile_token_rounding_triples_kernels(stage_keys: int = 0, *, extra_options: str = ""):
    """Compile ``TokenRoundingTriplesKernels`` (``fused_glue=True``) for sm_90a from fake
    tensors; not cached. ``stage_keys``: 0, or one of ``SELECT_STAGE_KEYS``, the select kernel's
    shared-memory row capacity (then only T <= stage_keys may be launched). All of T, E, K, the
    tile count and the bound are symbolic. Returns the
    TVM-FFI callable ``f(scores_bits, experts, keys, keep, counts, uniform, mode, tile_m, tile_pairs,
    tile_empty, token_idx, expert_idx, pair_index, is_pair, token_offsets, stats, tokens_per_tile,
    tc_score_bits, pair_score_bits)``: the arguments of ``compile_token_rounding_kernels``, then
    (tiles,) int32 scratch twice, (bound,) int32 token_idx, expert_idx, pair_index, (bound,) uint8
    is_pair, (T+1,) int32 token_offsets, (4,) int64 stats, the token tile, the (T, K) token-choice
    weights' float32 bits and the (bound,) pair weights' bits (out), both int32."""
    if stage_keys != 0 and stage_keys not in SELECT_STAGE_KEYS:
        raise ValueError(f"stage_keys must be 0 or one of {SELECT_STAGE_KEYS}, got {stage_keys}")
    T, E, K, U = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()

    def mat(dtype, rows, cols, align):
        return make_fake_compact_tensor(dtype, (rows, cols), stride_order=(1, 0), assumed_align=align)

    def vec(dtype, n, align=4):
        return make_fake_compact_tensor(dtype, (n,), assumed_align=align)

    tiles, bound = cute.sym_int(), cute.sym_int()
    return cute.compile(
        TokenRoundingTriplesKernels(stage_keys), mat(Int32, T, E, 4), mat(Int32, T, K, 4), mat(Int32, E, T, 4),
        mat(Uint8, T, E, KEEP_WORD), vec(Int32, E), vec(Float64, U, 8), Int32(0), Int64(1), vec(Int32, tiles),
        vec(Int32, tiles), vec(Int32, bound), vec(Int32, bound), vec(Int32, bound), vec(Uint8, bound, 1),
        vec(Int32, cute.sym_int()), vec(Int64, cute.sym_int(), 8), Int32(1), mat(Int32, T, K, 4), vec(Int32, bound),
        make_fake_stream(use_tvm_ffi_env_stream=True), options=compile_options(extra=extra_options),
    )


def compile_token_rounding_kernels(*, extra_options: str = ""):
    """Compile ``TokenRoundingKernels`` for sm_90a from fake tensors (no GPU needed); not cached.

    T, E, K (and the length of the uniform draws) are symbolic: one compile serves every shape.
    Returns the TVM-FFI callable ``f(scores_bits, experts, keys, keep, counts, uniform, mode, tile_m)``
    with scores_bits (T, E) int32, experts (T, K) int32, keys (E, T) int32, keep (T, E) uint8,
    counts (E,) int32, uniform (E,) float64 (or any length when mode is not stochastic).
    """
    T, E, K, U = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()

    def mat(dtype, rows, cols, align):
        return make_fake_compact_tensor(dtype, (rows, cols), stride_order=(1, 0), assumed_align=align)

    return cute.compile(
        TokenRoundingKernels(), mat(Int32, T, E, 4), mat(Int32, T, K, 4), mat(Int32, E, T, 4), mat(Uint8, T, E, 1),
        make_fake_compact_tensor(Int32, (E,), assumed_align=4), make_fake_compact_tensor(Float64, (U,), assumed_align=8),
        Int32(0), Int64(1), make_fake_stream(use_tvm_ffi_env_stream=True), options=compile_options(extra=extra_options),
    )


@functools.lru_cache(maxsize=None)
def _no_uniform(device: torch.device) -> torch.Tensor:
    """A placeholder for the select kernel's u_e when the mode is not stochastic (never read)."""
    return torch.zeros(1, dtype=torch.float64, device=device)


def _launch_boundary_kernels(scores: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor,
                             uniform: torch.Tensor | None, mode: str, tile_m: int) -> torch.Tensor:
    """(T, E) uint8 keep mask of token rounding from the float32 (T, E) scores, the (T, K) int32
    token-choice experts and the (E,) int32 counts; no host sync. T must be > 0."""
    T, E = scores.shape
    device = scores.device
    keys = torch.empty(E, T, dtype=torch.int32, device=device)  # (E, T) one row per expert
    keep = torch.empty(T, E, dtype=torch.uint8, device=device)  # (T, E) written whole by the keys kernel
    if uniform is None:
        uniform = _no_uniform(device)
    launch(compiled(compile_token_rounding_kernels), device, scores.view(torch.int32), experts, keys, keep, counts, uniform,
           ROUNDING_CODES[mode], tile_m)  # keys kernel, then select kernel, on the current stream
    return keep


def _select_stage_keys(num_tokens: int) -> int:
    """The select kernel's shared-memory row capacity for T tokens: the smallest of
    ``SELECT_STAGE_KEYS`` that holds the row, else 0 (the passes read global memory)."""
    return next((keys for keys in SELECT_STAGE_KEYS if num_tokens <= keys), 0)


def _token_tiling(num_tokens: int) -> tuple[int, int]:
    """(tokens_per_tile, num_tiles) of the triples kernels: ~TARGET_TILES warps, one token at least."""
    tokens_per_tile = max(1, -(-num_tokens // TARGET_TILES))
    return tokens_per_tile, -(-num_tokens // tokens_per_tile)


def _launch_token_rounding_triples(scores: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor,
                                   uniform: torch.Tensor | None, mode: str, tile_m: int, bound: int,
                                   tc_scores: torch.Tensor):
    """``fused_glue``: the selection and the padded triples in one compiled call; no host
    sync. T must be > 0, K <= MAX_SLOT_K, T * E + TRIPLES_BYTE_SLACK and bound <= MAX_PAIRS.
    ``tc_scores``: the (T, K) float32 token-choice weights w. Returns (token_idx, expert_idx,
    pair_index (bound,) int32, is_pair (bound,) bool, token_offsets (T+1,) int32, counts (4,)
    int64: kept, dropped, added pairs and dropped tokens, pair_scores (bound,) float32: the
    weights, ``reference.routing.pair_weights`` at the triples bit for bit, 0 for the padding)."""
    T, E = scores.shape
    device = scores.device
    i32 = torch.int32
    tokens_per_tile, num_tiles = _token_tiling(T)
    keys = torch.empty(E, T, dtype=i32, device=device)  # (E, T) one row per expert
    keep = torch.empty(T, E, dtype=torch.uint8, device=device)  # (T, E) written whole by the keys kernel
    tile_pairs, tile_empty = (torch.empty(num_tiles, dtype=i32, device=device) for _ in range(2))  # scratch
    token_idx, expert_idx, pair_index = (torch.empty(bound, dtype=i32, device=device) for _ in range(3))
    is_pair = torch.empty(bound, dtype=torch.uint8, device=device)
    token_offsets = torch.empty(T + 1, dtype=i32, device=device)
    counts4 = torch.empty(4, dtype=torch.int64, device=device)
    pair_scores = torch.empty(bound, dtype=torch.float32, device=device)
    if uniform is None:
        uniform = _no_uniform(device)
    kernels = compiled(compile_token_rounding_triples_kernels, _select_stage_keys(T))  # the select's row in smem
    launch(kernels, device, scores.view(i32), experts, keys, keep, counts, uniform, ROUNDING_CODES[mode], tile_m,
           tile_pairs, tile_empty, token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4,
           tokens_per_tile, tc_scores.contiguous().view(i32), pair_scores.view(i32))  # five kernels, current stream
    return token_idx, expert_idx, pair_index, is_pair.view(torch.bool), token_offsets, counts4, pair_scores


# ---------------------------------------------------------------------------------------------
# Argument checks (host only; value checks that read the device are opt-out)
# ---------------------------------------------------------------------------------------------
def _check_routing_structure(routing: object) -> Routing:
    """The reference's host-side checks of a Routing, then the fast kernels' own limits (E, P, CUDA)."""
    routing = contracts.check_routing_structure(routing)
    _checks.check_int_range("routing.num_experts", routing.num_experts, 1, MAX_EXPERTS,
                            "the fast metadata kernel; use sonic_learn.reference.routing for more experts")
    P = routing.token_idx.numel()
    if P > MAX_PAIRS:
        raise ValueError(f"routing must have at most {MAX_PAIRS} pairs (int32 rows), got {P}")
    for name in ("token_idx", "expert_idx", "scores"):
        _checks.check_cuda(f"routing.{name}", getattr(routing, name))
    return routing


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


# --8<-- [start:build_metadata]
def build_metadata(routing: Routing, *, check_ids: bool = True, padded: bool = False,
                   fused_glue: bool = False) -> RoutingMetadata:
    """Group the pairs of ``routing`` by expert (CuTe-DSL kernels): counts, offsets, permutations.

    Same result as ``sonic_learn.reference.routing.build_metadata``, bit for bit. ``check_ids``
    runs the reference's value checks (``contracts.check_routing_values``: ids in range, tokens
    ascending, no pair twice; device-to-host syncs); callers
    whose routing comes from a router (the MoE layer, benchmarks) pass ``check_ids=False`` and the
    call never synchronizes. Unchecked out-of-range expert ids are skipped by the kernels (no
    out-of-bounds write), but the result is then outside the contract.

    ``padded=True`` (with ``check_ids=False``) takes a routing padded to a bound, e.g. from
    ``token_rounding(..., pad_to_bound=True)``: padding pairs carry expert E and are skipped, so
    ``expert_offsets[E]`` is the true P on the device; the arrays keep the padded length, and past
    the true P a row r has gather_idx 0 and pair_of_row r, a padding pair p has row_of_pair p.
    ``fused_glue=True`` (with ``padded``): the scatter kernel writes those padding entries
    instead of three torch launches; the same result.
    """
    routing = _check_routing_structure(routing)
    if not isinstance(check_ids, bool):
        raise TypeError(f"check_ids must be a bool, got {type(check_ids).__name__}")
    _checks.check_bool("padded", padded)
    _checks.check_bool("fused_glue", fused_glue)
    if check_ids and padded:
        raise ValueError("padded=True needs check_ids=False (padding pairs carry the out-of-range expert E)")
    if check_ids:
        contracts.check_routing_values(routing)  # ids, order, duplicates (reads the device)
    counts, offsets, gather_idx, pair_of_row, row_of_pair = _launch_metadata(
        _int32(routing.expert_idx), _int32(routing.token_idx), routing.num_experts, scatter=True, padded=padded,
        fused_glue=fused_glue)
    return RoutingMetadata(
        expert_counts=counts,
        expert_offsets=offsets,
        gather_idx=gather_idx,
        pair_of_row=pair_of_row,
        row_of_pair=row_of_pair,
        num_tokens=routing.num_tokens,
        num_experts=routing.num_experts,
    )
# --8<-- [end:build_metadata]


# ---------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------
def _check_router_args(logits: object, k: object, scoring: object, normalize: object, check_finite: object):
    """The reference's router checks, then the fast path's: a CUDA tensor, and the (syncing)
    finite check only when ``check_finite``."""
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    logits = contracts.check_router_args(logits, k, scoring, normalize, check_finite=False)
    _checks.check_cuda("logits", logits)
    if check_finite:
        contracts.check_finite_values("logits", logits)
    return logits


def _bitonic_supported(logits: torch.Tensor, k: int) -> bool:
    E = logits.shape[1]
    return (
        logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and _fast_topk.MIN_N <= E <= _fast_topk.MAX_N
        and E % _fast_topk.N_MULTIPLE == 0
        and k <= _fast_topk.MAX_K_BITONIC
    )


def token_choice_experts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(T, K) int64: every token's K best experts, descending, ties to the lower expert.

    The CuTe bitonic kernel where it applies (E a multiple of 8 in [8, 4096], K <= 16, 16/32-bit
    floats), else a stable descending sort of each row (torch; a stable sort keeps equal logits,
    -0.0 and 0.0 included, in column order). Both give the reference's radix-select indices exactly,
    and neither reads the device on the host (the radix select's ``nonzero`` would).
    """
    if logits.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.int64, device=logits.device)
    x = logits.detach()
    if _bitonic_supported(x, k):
        return _fast_topk.bitonic_topk(x, k, check_finite=False)[1]  # (T, K)
    return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]  # (T, K)


def scores_from_experts(logits: torch.Tensor, experts: torch.Tensor, scoring: str, normalize: bool,
                        probs: torch.Tensor | None = None) -> torch.Tensor:
    """(T, K) router weights of the chosen experts, with the reference's formulas (so bit-identical
    to ``sonic_learn.reference.topk.softmax_topk`` / ``topk_softmax`` and differentiable).
    ``probs``: the softmax of ``logits`` over all E experts when the caller has it already
    (``reference.routing.router_probabilities``, the same call), reused by ``topk_softmax``."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if scoring == "softmax_topk":
        return torch.softmax(logits.gather(-1, experts).to(dtype), dim=-1)  # (T, K)
    if probs is None:
        probs = torch.softmax(logits.to(dtype), dim=-1)  # (T, E)
    scores = probs.gather(-1, experts)  # (T, K)
    if normalize:
        scores = scores / scores.sum(-1, keepdim=True)
    return scores


def _flat_topk(logits: torch.Tensor, k: int, scoring: str, normalize: bool) -> tuple[Routing, torch.Tensor]:
    T, E = logits.shape
    experts = token_choice_experts(logits, k)  # (T, K)
    scores = scores_from_experts(logits, experts, scoring, normalize)  # (T, K)
    token_idx = torch.arange(T, device=logits.device, dtype=torch.int32).repeat_interleave(k)  # (T*K,)
    routing = Routing(
        token_idx=token_idx,
        expert_idx=experts.reshape(-1).to(torch.int32),  # (T*K,)
        scores=scores.reshape(-1),  # (T*K,)
        num_tokens=T,
        num_experts=E,
    )
    return routing, experts


# --8<-- [start:topk_routing]
def topk_routing(
    logits: torch.Tensor, k: int, *, scoring: str = "softmax_topk", normalize: bool = False, check_finite: bool = True
) -> Routing:
    """Token-choice top-k routing: the CuTe bitonic top-k for the expert choice, then flatten.

    Same contract and result as ``sonic_learn.reference.routing.topk_routing`` (indices exactly,
    scores bit for bit: they are computed from the chosen experts with the reference's formula, so
    they stay differentiable w.r.t. ``logits``). ``check_finite`` rejects NaN/inf like the
    reference (one device-to-host sync); with ``check_finite=False`` the call never synchronizes.
    """
    logits = _check_router_args(logits, k, scoring, normalize, check_finite)
    return _flat_topk(logits, k, scoring, normalize)[0]
# --8<-- [end:topk_routing]


# Rounding E counts is an O(E) elementwise rule that needs no kernel: the fast path's round_counts is
# the reference's own function (token_rounding runs the same rule inside its select kernel).
round_counts = _ref.round_counts


def _write_at_picks(probs: torch.Tensor, tc_experts: torch.Tensor, values: torch.Tensor, *,
                    keep_replaced: bool) -> torch.Tensor | None:
    """Write ``values`` (T, K) over ``probs`` (T, E) at the token-choice picks ``tc_experts``, in
    place (no (T, E) copy). With the token-choice scores as ``values``, ``probs`` becomes the (T, E)
    weights of ``reference.routing.pair_weights``, bit for bit. ``keep_replaced``: return the (T, K)
    entries that were overwritten (to write them back afterwards the same way); else None."""
    replaced = probs.gather(1, tc_experts) if keep_replaced else None  # (T, K)
    probs.scatter_(1, tc_experts, values)  # (T, E)
    return replaced


def _boundary_selection(keys: torch.Tensor, r: torch.Tensor, max_r: int, prefer_low_token: torch.Tensor) -> torch.Tensor:
    """(E, T) bool: per expert row e, the r_e largest keys (0 <= r_e <= max_r), without sorting.

    The float64 path (torch ops; the kernels take float32 scores). ``keys`` is (E, T),
    contiguous: every reduction runs along the contiguous last dim. Ties at the threshold:
    ``prefer_low_token[e]`` takes the lowest token indices among equal keys, else the highest.
    Requires r_e <= the number of finite keys in row e.
    """
    top = torch.topk(keys, max_r, dim=1, sorted=True).values  # (E, max_r) best keys per expert
    threshold = top.gather(1, (r - 1).clamp(min=0)[:, None])  # (E, 1) the r_e-th best key
    above = keys > threshold  # (E, T) certainly selected
    at = keys == threshold  # (E, T) the tie group at the threshold
    need = r[:, None] - above.sum(1, keepdim=True)  # (E, 1) how many of the tie group to take
    from_low = torch.cumsum(at, dim=1, dtype=torch.int32)  # (E, T) tie members up to this token
    from_high = at.sum(1, keepdim=True, dtype=torch.int32) - from_low + at.int()  # (E, T) from this token on
    order_in_ties = torch.where(prefer_low_token[:, None], from_low, from_high)  # (E, T)
    return (above | (at & (order_in_ties <= need))) & (r[:, None] > 0)  # (E, T)


def _boundary_keep_torch(scores: torch.Tensor, tc_experts: torch.Tensor, counts: torch.Tensor,
                         uniform: torch.Tensor | None, mode: str, tile_m: int) -> torch.Tensor:
    """The float64 path of steps 2-4 with torch ops (same result as the kernels): (T, E) bool keep."""
    T, E = scores.shape
    f = counts.long()  # (E,) the reference's rounding rule, with the uniforms already drawn
    floor_f = (f // tile_m) * tile_m
    remainder = f - floor_f
    ceil_f = floor_f + tile_m * (remainder > 0)
    go_up = {"down": torch.zeros_like(f, dtype=torch.bool), "up": remainder > 0,
             "nearest": 2 * remainder > tile_m}.get(mode)
    if go_up is None:  # stochastic
        go_up = uniform * tile_m < remainder
    delta = torch.where(go_up, ceil_f, floor_f).clamp(max=T) - f  # (E,) in (-tile_m, tile_m)
    picked = torch.zeros(T, E, dtype=torch.bool, device=scores.device).scatter_(1, tc_experts, True)  # (T, E)
    max_r = min(tile_m - 1, T)
    if max_r == 0:
        return picked
    s_et = scores.detach().t().contiguous()  # (E, T): one row per expert
    picked_et = picked.t().contiguous()  # (E, T)
    excluded = torch.tensor(float("-inf"), dtype=s_et.dtype, device=scores.device)
    going_up = delta > 0  # (E,)
    up_keys = torch.where(picked_et, excluded, s_et)  # (E, T) non-picks by score
    down_keys = torch.where(picked_et, -s_et, excluded)  # (E, T) picks, worst first
    keys = torch.where(going_up[:, None], up_keys, down_keys)  # (E, T)
    flip = _boundary_selection(keys, delta.abs(), max_r, prefer_low_token=going_up)  # (E, T)
    return picked ^ flip.t()  # (T, E) up adds non-picks, down removes picks


# --8<-- [start:token_rounding]
def token_rounding(
    logits: torch.Tensor,
    k: int,
    *,
    tile_m: int = 128,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    scoring: str = "softmax_topk",
    normalize: bool = False,
    check_finite: bool = True,
    selection: str = "kernels",
    pad_to_bound: bool = False,
    fused_glue: bool = False,
) -> Routing:
    """Token rounding (paper Algorithm 4) with the reference's exact semantics, without a full sort.

    Same arguments, result, tie rules, warning and ``routing.rounding`` counts as
    ``sonic_learn.reference.routing.token_rounding`` (see there); the module docstring explains
    the boundary-only selection kernels. Needs E <= ``MAX_EXPERTS`` (the counts come from the CuTe
    histogram kernel) and tile_m <= 2**62 (the rounding rule runs in int64 inside the select kernel).

    Synchronization: the number of pairs P is data dependent. By default the triples are exactly
    the reference's, so sizing them reads P on the host (one sync, plus one for ``check_finite``).
    With ``pad_to_bound=True`` (and ``check_finite=False``) the call never synchronizes and can be
    captured in a CUDA graph: the triples have ``reference.routing.max_pairs(T, E, K, tile_m)``
    entries, the kept pairs first (the reference's triples, in its order), then padding pairs with
    token ``T``, expert ``E`` (both out of range: the metadata kernels skip them) and score 0;
    the true P stays on the device as ``routing.rounding.kept_pairs``.

    Which steps are CuTe and which are torch: token-choice top-k (bitonic kernel), f_e
    (histogram kernel), the rounding rule, the key rows and the boundary selection (the two
    token-rounding kernels) are CuTe; the probabilities p and the weights (the reference's
    formulas, so bit-identical; in place when autograd is off; differentiable through one autograd
    node, ``TokenRoundingScores``), the stochastic
    draw (``torch.rand`` on the device, from ``generator``), the counts of ``routing.rounding``
    and the final ``nonzero`` (``nonzero_static`` when padded) are torch. Float64 logits
    (float64 scores) take a torch-op selection instead of the two kernels (same result).

    ``selection`` picks the step of the ladder (``SELECTIONS``; ``python -m sonic_learn.fast.routing``
    validates and times each): ``"torch"`` (step 1) or ``"kernels"`` (step 2, the default).

    ``fused_glue=True`` (with ``pad_to_bound=True``, float32 scores and the kernels' selection;
    otherwise it changes nothing; the MoE layer's router turns it on): the padded triples, their
    weights and the counts of ``routing.rounding`` come from CuTe kernels (``PaddedTriplesKernel``,
    in the same compiled call as the selection) instead of ~19 torch launches; the same result.
    """
    _checks.check_choice("selection", selection, tuple(SELECTIONS))
    _checks.check_bool("pad_to_bound", pad_to_bound)
    _checks.check_bool("fused_glue", fused_glue)
    return _route_token_rounding(logits, k, tile_m, mode, generator, scoring, normalize, check_finite, selection,
                                 pad_to_bound, fused_glue)[0]


# The token-rounding ladder: how the boundary pairs of every expert are found (steps 2-4).
SELECTIONS = {
    "torch": "torch ops: torch.topk over each expert's (E, T) key row finds the boundary, cumsum ranks ties",
    "kernels": "+ two CuTe kernels: per-expert key rows, then a radix select of the boundary, one CTA per expert",
}


def layer_token_rounding(logits: torch.Tensor, k: int, *, tile_m: int, mode: str, generator: torch.Generator | None,
                         scoring: str, normalize: bool, fused_glue: bool = True):
    """The MoE layer's router (``fast.moe.route_layer``): ``token_rounding(..., check_finite=False,
    pad_to_bound=True)``, sync-free and padded to the bound, and the (T+1,) int32 token offsets when
    ``fused_glue``'s kernels wrote them (else None: the caller computes them from ``token_idx``)."""
    _checks.check_bool("fused_glue", fused_glue)
    return _route_token_rounding(logits, k, tile_m, mode, generator, scoring, normalize, False, "kernels",
                                 pad_to_bound=True, fused_glue=fused_glue)


def _token_rounding(logits, k, tile_m, mode, generator, scoring, normalize, check_finite, selection: str,
                    pad_to_bound: bool = False) -> Routing:
    """``token_rounding``; ``selection="torch"`` runs steps 2-4 with torch ops for every dtype (step 1
    of the ladder, also the float64 path)."""
    return _route_token_rounding(logits, k, tile_m, mode, generator, scoring, normalize, check_finite, selection,
                                 pad_to_bound)[0]


def _route_token_rounding(logits, k, tile_m, mode, generator, scoring, normalize, check_finite, selection: str,
                          pad_to_bound: bool = False, fused_glue: bool = False):
    """``token_rounding``, and the (T+1,) int32 token offsets (token t owns pairs token_offsets[t] :
    token_offsets[t + 1]) when the fused glue's kernels wrote them, else None."""
    logits = _check_router_args(logits, k, scoring, normalize, check_finite)
    _checks.check_int_range("tile_m", tile_m, 1, 2**62)
    _checks.check_choice("mode", mode, ROUNDING_MODES)
    contracts.check_generator(generator, logits.device)
    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"logits.shape[1] (E) must be <= {MAX_EXPERTS} for the fast routing kernels, got {E}")
    device = logits.device
    ratio = _ref.warn_below_paper_condition(T, E, k, tile_m)  # the paper's T_e / tile >= 2, host only

    # Step 1: token-choice top-k (CuTe bitonic) and f_e (CuTe histogram).
    tc_experts = token_choice_experts(logits, k)  # (T, K) int64 (torch's gather/scatter index type)
    tc_experts32 = tc_experts.to(torch.int32)  # (T, K) the kernels' index type
    counts = _launch_metadata(tc_experts32.view(-1), None, E, scatter=False)[0]  # (E,) f_e

    # Step 2's random draw, exactly the reference's (the rule itself runs inside the select kernel).
    uniform = None
    if mode == "stochastic":
        uniform = torch.rand(E, generator=generator, dtype=torch.float64, device=device)  # (E,) u_e

    # The ranking key of Algorithm 4: p[t, e], the softmax over all E experts (the reference's call),
    # and the token-choice weights (topk_softmax gathers them from the same softmax: one launch less).
    # Values only: the gradient of every weight of the step is one autograd node, TokenRoundingScores.
    with torch.no_grad():
        probs = _ref.router_probabilities(logits)  # (T, E)
        tc_scores = scores_from_experts(logits, tc_experts, scoring, normalize, probs=probs)  # (T, K)
    weights = functools.partial(_kept_pair_scores, logits, probs, tc_experts, tc_scores, scoring, normalize)

    # fused_glue: steps 2-5, the counts and the weights in one compiled call (selection, then the
    # padded triples with their weights).
    bound = _ref.max_pairs(T, E, k, tile_m)
    if (fused_glue and pad_to_bound and T > 0 and probs.dtype == torch.float32 and selection == "kernels"
            and tc_scores.dtype == torch.float32 and k <= MAX_SLOT_K
            and max(T * E + TRIPLES_BYTE_SLACK, bound) <= MAX_PAIRS):
        token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4, pair_scores = (
            _launch_token_rounding_triples(probs, tc_experts32, counts, uniform, mode, tile_m, bound, tc_scores))
        kept, dropped, added, dropped_tokens = counts4  # () views of the kernel's (4,) counts
        stats = contracts.RoundingStats(kept, dropped, added, dropped_tokens, tokens_per_tile=ratio)
        scores = weights(pair_index, is_pair, pair_scores, (expert_idx, token_offsets, token_idx, tc_experts32))
        return Routing(token_idx, expert_idx, scores, num_tokens=T, num_experts=E, rounding=stats), token_offsets

    # Steps 2-4: round f_e, then flip only the boundary pairs of each expert (see the module docstring).
    if T == 0:
        keep = torch.zeros(0, E, dtype=torch.bool, device=device)
    elif probs.dtype == torch.float32 and selection == "kernels":
        keep = _launch_boundary_kernels(probs, tc_experts32, counts, uniform, mode, tile_m)  # (T, E) uint8
    else:  # float64 probabilities (or the torch baseline)
        keep = _boundary_keep_torch(probs, tc_experts, counts, uniform, mode, tile_m)  # (T, E) bool
    stats = _rounding_stats(keep, counts, ratio)

    # Step 5: token-sorted triples (by token, then expert), as the reference's nonzero, and their
    # weights: picks keep their token-choice scores bit for bit, added tokens get p[t, e].
    if not pad_to_bound:
        token_idx, expert_idx = keep.nonzero(as_tuple=True)  # (P,), (P,)  <- the one host sync
        pair_index = torch.add(expert_idx, token_idx, alpha=E)  # (P,) t * E + e
        token_idx, expert_idx = token_idx.to(torch.int32), expert_idx.to(torch.int32)
        scores = weights(pair_index, None, None, (expert_idx, None, token_idx, tc_experts32))
        return Routing(token_idx=token_idx, expert_idx=expert_idx, scores=scores, num_tokens=T, num_experts=E,
                       rounding=stats), None
    # Padded to the host bound (the layout of the reference's pad_to_bound=True): no sync.
    token_idx, expert_idx, pair_index, is_pair = _padded_triples(keep, bound)
    scores = weights(pair_index, is_pair, None, (expert_idx, None, token_idx, tc_experts32))
    return Routing(token_idx, expert_idx, scores, num_tokens=T, num_experts=E, rounding=stats), None


def _rounding_stats(keep: torch.Tensor, counts: torch.Tensor, ratio: float) -> contracts.RoundingStats:
    """``routing.rounding`` from the (T, E) keep mask and the token-choice counts f_e, on the device.

    Rounding only ever moves one side of an expert's boundary: with kept_e pairs, expert e added
    max(kept_e - f_e, 0) pairs and dropped max(f_e - kept_e, 0). The three per-expert rows are
    written into one (3, E) buffer and summed by one reduction (5 launches, plus 3 for the tokens
    left with no expert: a reduction over the other axis of ``keep``)."""
    E = counts.numel()
    per_expert = torch.empty(3, E, dtype=torch.int64, device=keep.device)  # rows: kept, added, dropped
    torch.sum(keep, dim=0, dtype=torch.int64, out=per_expert[0])  # kept_e
    torch.sub(per_expert[0], counts, out=per_expert[1])  # kept_e - f_e
    torch.sub(counts, per_expert[0], out=per_expert[2])  # f_e - kept_e
    per_expert[1:].clamp_(min=0)  # the added and the dropped pairs of every expert
    kept, added, dropped = per_expert.sum(dim=1)  # three () views of one (3,) result
    return contracts.RoundingStats(
        kept_pairs=kept, dropped_pairs=dropped, added_pairs=added,
        dropped_tokens=(keep.sum(dim=1, dtype=torch.int32) == 0).sum(),  # () tokens with no expert left
        tokens_per_tile=ratio,
    )


def _padded_triples(keep: torch.Tensor, bound: int):
    """The triples of ``reference.routing.padded_triples`` bit for bit, in 6 launches instead of 9:
    the kept pairs of the (T, E) mask, token-sorted, padded to ``bound`` with (token T, expert E),
    and where their weights are (the flat index t * E + e, 0 for the padding; ``is_pair``: not padding).

    ``nonzero_static`` fills the rows past P with -1, and -1 mod (T + 1) = T, -1 mod (E + 1) = E
    (torch's remainder takes the divisor's sign), so one ``remainder`` per column maps the padding
    and casts to int32 (its ``out``). The weights are read at the flat indices, as the fused glue
    reads them (``_pair_scores``), not with ``scores[token, expert]``: the backward of that advanced
    indexing is an accumulating ``index_put_``, which on CUDA sorts the indices and walks each run
    of equal ones in one thread -- and all bound - P padding rows would name the same entry."""
    T, E = keep.shape
    found = torch.nonzero_static(keep, size=bound, fill_value=-1)  # (bound, 2) kept pairs, then -1 rows
    token_idx = torch.remainder(found[:, 0], T + 1, out=torch.empty(bound, dtype=torch.int32, device=keep.device))
    expert_idx = torch.remainder(found[:, 1], E + 1, out=torch.empty(bound, dtype=torch.int32, device=keep.device))
    flat = torch.add(found[:, 1], found[:, 0], alpha=E).clamp_(min=0)  # (bound,) t * E + e; padding: 0
    return token_idx, expert_idx, flat, found[:, 0] >= 0


def _pair_scores(weights: torch.Tensor, pair_index: torch.Tensor, is_pair: torch.Tensor | None) -> torch.Tensor:
    """(N,) the weights of the triples: the (T, E) ``weights`` at the flat indices t * E + e, 0 where
    ``is_pair`` is False (the padding; None: no padding)."""
    scores = weights.reshape(-1).index_select(0, pair_index)  # (N,)
    return scores if is_pair is None else torch.where(is_pair, scores, 0.0)


def _kept_pair_scores(logits, probs, tc_experts, tc_scores, scoring: str, normalize: bool, pair_index: torch.Tensor,
                      is_pair: torch.Tensor | None, pair_scores: torch.Tensor | None = None,
                      pairs: tuple | None = None) -> torch.Tensor:
    """(N,) the triples' weights (every path of token rounding, both glues of the layer): with
    autograd recording, ``TokenRoundingScores`` (one node); without, the (T, E) weights are written
    over ``probs`` in place (no (T, E) copy; call it after the selection has read ``probs``).
    ``pair_scores``: the weights already read by the fused call's kernels (then no op reads them);
    ``pairs``: what the backward kernel reads (see ``TokenRoundingScores``)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return TokenRoundingScores.apply(logits, probs, tc_experts, tc_scores, pair_index, is_pair, scoring, normalize,
                                         pair_scores, pairs)
    if pair_scores is not None:
        return pair_scores
    _write_at_picks(probs, tc_experts, tc_scores, keep_replaced=False)  # probs is the (T, E) weights from here on
    return _pair_scores(probs, pair_index, is_pair)


class TokenRoundingScores(torch.autograd.Function):
    """The weights of token rounding's triples as one autograd node of the logits: the values of the
    reference's formulas bit for bit, and a backward of one kernel (or at most 9 torch launches).

    Forward (from values computed without autograd): p = softmax(logits) over E (``probs``), the
    token-choice weights w (``tc_scores`` (T, K), at the picks ``tc_experts``), the (T, E) weights =
    p with w scattered at the picks (``reference.routing.pair_weights``), read at the triples' flat
    indices t * E + e, 0 for the padding (``is_pair`` False; its gradient is dropped: the experts'
    backward leaves garbage there). With ``pair_scores`` (the fused call, whose write kernel already
    copied those weights) the forward runs no op and returns them.

    Backward: the triples' gradient g, scattered into a (T, E) gradient G (each kept pair once); the
    picks' entries are w's gradient, the others p's; then the softmax backwards:

    * ``softmax_topk``: w = softmax over K of the picks' logits: dlogits = softmax_bwd(G off the
      picks, p) + scattered softmax_bwd(G at the picks, w);
    * ``topk_softmax``: w = p at the picks, so every entry of G is p's gradient: dlogits =
      softmax_bwd(G, p); with ``normalize`` (w = p_picks / their sum) the picks' entries first go
      back through the normalization (autograd on its two ops).

    Two implementations of those formulas. With ``pairs`` = (expert_idx int32, token_offsets or
    None, token_idx int32, tc_experts int32), CUDA tensors and float32 logits, ``softmax_topk`` or
    ``topk_softmax`` without ``normalize``, K <= ``SCORES_BWD_MAX_K``: ``ScoresBackwardKernel``, one launch (plus a
    ``searchsorted`` for the token offsets when the router did not write them), which reads p once
    and never builds G; its two row sums add the same products in another order than torch's
    softmax backward, so the bits may differ from the reference's in the last places. Otherwise the
    torch ops (``_scores_backward_torch``): autograd's own softmax-backward kernel (for
    ``softmax_topk`` the very ops autograd runs on the reference's graph: the same bits).
    """

    @staticmethod
    def forward(ctx, logits, probs, tc_experts, tc_scores, pair_index, is_pair, scoring, normalize, pair_scores=None,
                pairs=None):
        if pair_scores is not None:  # read by the fused call's kernels already
            scores = pair_scores.view_as(pair_scores)  # (a view: autograd's output, the kernels' buffer)
        else:
            # The (T, E) weights without a (T, E) copy: w written over p at the picks for the read,
            # then the picks' p put back (the backward needs p; the same bits, T*K values moved each way).
            p_picks = _write_at_picks(probs, tc_experts, tc_scores, keep_replaced=True)  # (T, K); probs = weights
            scores = _pair_scores(probs, pair_index, is_pair)
            _write_at_picks(probs, tc_experts, p_picks, keep_replaced=False)  # (T, E) p again
        ctx.kernel = pairs is not None and _scores_backward_kernel_fits(logits, probs, tc_experts, scoring, normalize)
        saved = (probs, tc_experts, tc_scores, pair_index, is_pair)  # the torch backward's (the CPU's too)
        if ctx.kernel:
            expert_idx, token_offsets, token_idx, tc_experts32 = pairs
            ctx.offsets_given = token_offsets is not None
            saved += (tc_experts32, expert_idx, token_offsets if ctx.offsets_given else token_idx)
        ctx.save_for_backward(*saved)
        ctx.scoring, ctx.normalize, ctx.logits_dtype = scoring, normalize, logits.dtype
        return scores

    @staticmethod
    def backward(ctx, grad):
        probs, tc_experts, tc_scores, pair_index, is_pair, *kernel_args = ctx.saved_tensors
        if ctx.kernel and _kernel_device(probs):
            tc_experts32, expert_idx, offsets_or_tokens = kernel_args
            return _scores_backward_kernel(grad, probs, tc_experts32, tc_scores, expert_idx, offsets_or_tokens,
                                           ctx.offsets_given, ctx.scoring), *([None] * 9)
        return _scores_backward_torch(grad, probs, tc_experts, tc_scores, pair_index, is_pair, ctx.scoring,
                                      ctx.normalize, ctx.logits_dtype), *([None] * 9)


def _kernel_device(t: torch.Tensor) -> bool:
    """Can a CuTe kernel read ``t`` (a CUDA tensor)? The tests' launch counter answers yes for the
    CPU tensors its stand-ins compute on."""
    return t.is_cuda


def _scores_backward_kernel_fits(logits, probs, tc_experts, scoring: str, normalize: bool) -> bool:
    """Can ``ScoresBackwardKernel`` compute this node's backward? (float32, its two scorings, K <= 32)"""
    T, E = probs.shape
    return (logits.dtype == torch.float32 and probs.dtype == torch.float32 and T > 0
            and tc_experts.shape[1] <= SCORES_BWD_MAX_K and T * E <= MAX_PAIRS
            and (scoring == "softmax_topk" or (scoring == "topk_softmax" and not normalize)))


def _scores_backward_kernel(grad, probs, tc_experts32, tc_scores, expert_idx, offsets_or_tokens, offsets_given: bool,
                            scoring: str) -> torch.Tensor:
    """(T, E) float32 dlogits from ``ScoresBackwardKernel`` (one launch; a ``searchsorted`` first for
    the (T+1,) token offsets when only the ascending (N,) token_idx is at hand)."""
    T = probs.shape[0]
    token_offsets = offsets_or_tokens
    if not offsets_given:  # first pair of each token (the padding's token T sorts after every token)
        tokens = torch.arange(T + 1, dtype=torch.int32, device=probs.device)
        token_offsets = torch.searchsorted(offsets_or_tokens, tokens, out_int32=True)
    out = torch.empty_like(probs)
    launch(compiled(compile_scores_backward_kernel, scoring == "softmax_topk"), probs.device,
           grad.to(torch.float32).contiguous(), expert_idx, token_offsets, probs, tc_experts32,
           tc_scores.contiguous(), out)
    return out


def _scores_backward_torch(grad, probs, tc_experts, tc_scores, pair_index, is_pair, scoring: str, normalize: bool,
                           logits_dtype) -> torch.Tensor:
    """``TokenRoundingScores``' backward with torch ops (every configuration; at most 9 launches)."""
    T, E = probs.shape
    # Step 1: the (T, E) weights' gradient G. Every kept pair has its own entry t * E + e, so G is
    # a plain scatter (no atomics); the padding (pair index 0, a gradient the experts' backward
    # left as garbage) goes to one spare entry past the end, which is dropped. (Adding the
    # padding's zeros at entry 0 instead serializes thousands of atomic adds on one address.)
    index = pair_index if is_pair is None else torch.where(is_pair, pair_index, T * E)  # (N,)
    g = torch.zeros(T * E + 1, dtype=probs.dtype, device=probs.device)
    g.index_copy_(0, index.long(), grad.to(probs.dtype))  # (index_copy_ takes int64 indices only)
    return _scores_backward_dense(g[: T * E].view(T, E), probs, tc_experts, tc_scores, scoring, normalize, logits_dtype)


def _scores_backward_dense(g: torch.Tensor, probs, tc_experts, tc_scores, scoring: str, normalize: bool,
                          logits_dtype) -> torch.Tensor:
    """Steps 2-3 of the torch backward from the dense (T, E) gradient G of the weights (modified in
    place); also the CPU stand-in's arithmetic for ``ScoresBackwardKernel``."""
    if scoring == "topk_softmax" and not normalize:  # w is p itself: all of G is p's gradient
        return _softmax_backward(g, probs).to(logits_dtype)
    # Step 2: the picks' entries are the token-choice weights' gradient (T, K); the rest is p's.
    g_tc = g.gather(1, tc_experts)  # (T, K)
    if scoring == "topk_softmax":  # w = s / sum(s), s = p at the picks: back to s, which is p
        with torch.enable_grad():
            s = probs.gather(1, tc_experts).requires_grad_(True)  # (T, K)
            (ds,) = torch.autograd.grad(s / s.sum(-1, keepdim=True), s, g_tc)
        return _softmax_backward(g.scatter_(1, tc_experts, ds), probs).to(logits_dtype)
    # softmax_topk: two softmax backwards, p's (over E, picks excluded) and w's (over K)
    dlogits = _softmax_backward(g.scatter_(1, tc_experts, 0.0), probs).to(logits_dtype)  # (T, E)
    d_picked = _softmax_backward(g_tc, tc_scores).to(logits_dtype)  # (T, K)
    return dlogits.scatter_add_(1, tc_experts, d_picked)


def _softmax_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient of x for out = softmax(x) over the last dim: out * (grad - <grad, out>), with the
    kernel autograd runs for ``torch.softmax`` (one launch, the same bits)."""
    return torch._softmax_backward_data(grad, out, out.dim() - 1, out.dtype)
# --8<-- [end:token_rounding]


# ---------------------------------------------------------------------------------------------
# The backward of the token-rounding weights as one kernel (TokenRoundingScores.backward)
# ---------------------------------------------------------------------------------------------
SCORES_BWD_MAX_K = 32  # one lane holds each token-choice pick


class ScoresBackwardKernel:
    """The logits' gradient of token rounding's weights, one warp per token t (the formulas of
    ``TokenRoundingScores.backward``, whose torch ops it replaces: 9 launches and five passes over
    a (T, E) buffer become one launch that reads p once and writes dlogits once).

    Token t owns the pairs ``token_offsets[t] : token_offsets[t + 1]`` (in expert order), each
    with its gradient g. With ``separate_picks`` (``softmax_topk``: a pick's weight is w = the
    softmax over the token's K pick logits, any other kept pair's weight is p):

    1. lane j < K holds pick j (expert, w); a chunk of 32 pairs at a time, the lanes compare
       their pair's expert with every pick (shuffles): a pick's lane takes its pair's g (0 if the
       rounding dropped it), the other pairs are p's;
    2. two warp sums: dot_p = sum of g * p over the non-pick pairs, dot_w = sum of g * w over the
       picks;
    3. every entry of the row gets p * (0 - dot_p) (the softmax backward over E with the picks'
       entries 0), then, after a warp barrier, the entries with a pair are rewritten:
       p * (g - dot_p) at a non-pick, p * (0 - dot_p) + w * (g - dot_w) at a pick (the softmax
       backward over K added, as ``scatter_add_``).

    Without ``separate_picks`` (``topk_softmax`` without ``normalize``: the weights are p itself)
    every pair is p's: dlogits = p * (G - <G, p>). Same formulas as the torch ops; the two sums add
    the same nonzero products in another order, so results may differ from them in the last bits.
    """

    def __init__(self, separate_picks: bool):
        self.separate_picks = separate_picks

    @cute.jit
    def __call__(self, mGrad: cute.Tensor, mExpertIdx: cute.Tensor, mTokenOffsets: cute.Tensor, mProbs: cute.Tensor,
                 mTcExperts: cute.Tensor, mTcScores: cute.Tensor, mOut: cute.Tensor, stream):
        ctas = cute.ceil_div(mProbs.shape[0], WARPS_PER_CTA)
        self.kernel(mGrad, mExpertIdx, mTokenOffsets, mProbs, mTcExperts, mTcScores, mOut).launch(
            grid=[ctas, 1, 1], block=[THREADS_PER_CTA, 1, 1], stream=stream)

    @cute.kernel
    def kernel(
        self,
        mGrad: cute.Tensor,  # (N,) float32: the triples' gradient (the padding's is never read)
        mExpertIdx: cute.Tensor,  # (N,) int32
        mTokenOffsets: cute.Tensor,  # (T+1,) int32: token t owns pairs [offsets[t], offsets[t+1])
        mProbs: cute.Tensor,  # (T, E) float32: p
        mTcExperts: cute.Tensor,  # (T, K) int32: the token-choice picks
        mTcScores: cute.Tensor,  # (T, K) float32: their weights w
        mOut: cute.Tensor,  # (T, E) float32 out: dlogits
    ):
        tidx, _, _ = cute.arch.thread_idx()
        t = cute.arch.block_idx()[0] * WARPS_PER_CTA + tidx // 32  # this warp's token
        lane = cute.arch.lane_idx()
        T, E, K = mProbs.shape[0], mProbs.shape[1], mTcExperts.shape[1]
        zero = cutlass.Float32(0.0)
        if t < T:  # uniform over the warp
            lo = mTokenOffsets[t]
            hi = mTokenOffsets[t + 1]
            # 1. the picks (lane j < K holds pick j), and each pair's gradient: p's or a pick's
            pick = Int32(-1)
            w = zero
            if const_expr(self.separate_picks):
                if lane < K:
                    pick = mTcExperts[t, lane]
                    w = mTcScores[t, lane]
            g_pick = zero  # lane j: the gradient of pick j's pair (0: dropped by the rounding)
            dot_p = zero
            for base in cutlass.range(lo, hi, 32, unroll=1):
                e, g = self._load_pair(mExpertIdx, mGrad, base + lane, hi)
                is_pick, g_pick = self._find_picks(e, g, pick, K, lane, g_pick)
                if e >= 0 and is_pick == 0:
                    dot_p = dot_p + g * mProbs[t, e]
            # 2. the two sums over the warp
            dot_p = warp_sum(dot_p)
            dot_w = warp_sum(g_pick * w)
            # 3. p * (0 - dot_p) on the whole row, then the entries of the pairs and the picks
            for e in cutlass.range(lane, E, 32, unroll=1):
                mOut[t, e] = mProbs[t, e] * (zero - dot_p)
            cute.arch.sync_warp()  # the rewrites below land after the row's stores
            for base in cutlass.range(lo, hi, 32, unroll=1):
                e, g = self._load_pair(mExpertIdx, mGrad, base + lane, hi)
                is_pick, _ = self._find_picks(e, g, pick, K, lane, zero)
                if e >= 0 and is_pick == 0:
                    mOut[t, e] = mProbs[t, e] * (g - dot_p)
            if const_expr(self.separate_picks):
                if lane < K:
                    mOut[t, pick] = mProbs[t, pick] * (zero - dot_p) + w * (g_pick - dot_w)

    @cute.jit
    def _load_pair(self, mExpertIdx: cute.Tensor, mGrad: cute.Tensor, i: Int32, hi: Int32):
        """(expert, gradient) of pair i, or (-1, 0) past the token's pairs."""
        e = Int32(-1)
        g = cutlass.Float32(0.0)
        if i < hi:
            e = mExpertIdx[i]
            g = mGrad[i]
        return e, g

    @cute.jit
    def _find_picks(self, e: Int32, g, pick: Int32, K: Int32, lane: Int32, g_pick):
        """Every lane calls it (shuffles): is this lane's pair (expert e, -1 for none) one of the
        token's picks (1/0), and lane j's ``g_pick`` = the gradient of the pair holding pick j, if
        this chunk of 32 pairs has it (else unchanged). Without ``separate_picks``: (0, g_pick)."""
        is_pick = Int32(0)
        if const_expr(self.separate_picks):
            for j in cutlass.range(K, unroll=1):
                pick_j = cute.arch.shuffle_sync(pick, j)  # >= 0: lane j < K holds a pick
                hit = cute.arch.vote_ballot_sync(e == pick_j)
                if e == pick_j:
                    is_pick = Int32(1)
                if hit != Uint32(0):  # uniform over the warp: one lane holds that pair
                    src = Int32(cute.arch.popc((hit & (Uint32(0) - hit)) - Uint32(1)))  # its lane
                    g_src = cute.arch.shuffle_sync(g, src)
                    if lane == j:
                        g_pick = g_src
        return is_pick, g_pick


def compile_scores_backward_kernel(separate_picks: bool, *, extra_options: str = ""):
    """Compile ``ScoresBackwardKernel`` for sm_90a from fake tensors (no GPU needed); not cached.
    N, T, E and K are symbolic. Returns the TVM-FFI callable ``f(grad, expert_idx, token_offsets,
    probs, tc_experts, tc_scores, out)``: (N,) float32, (N,) int32, (T+1,) int32, (T, E) float32,
    (T, K) int32, (T, K) float32, (T, E) float32 out."""
    N, T, E, K = cute.sym_int(), cute.sym_int(), cute.sym_int(), cute.sym_int()

    def mat(dtype, rows, cols):
        return make_fake_compact_tensor(dtype, (rows, cols), stride_order=(1, 0), assumed_align=4)

    def vec(dtype, n):
        return make_fake_compact_tensor(dtype, (n,), assumed_align=4)

    return cute.compile(
        ScoresBackwardKernel(separate_picks), vec(cutlass.Float32, N), vec(Int32, N), vec(Int32, cute.sym_int()),
        mat(cutlass.Float32, T, E), mat(Int32, T, K), mat(cutlass.Float32, T, K),
        mat(cutlass.Float32, T, E), make_fake_stream(use_tvm_ffi_env_stream=True),
        options=compile_options(extra=extra_options),
    )


# ---------------------------------------------------------------------------------------------
# python -m sonic_learn.fast.routing: validate every step of the ladder, then time it
# ---------------------------------------------------------------------------------------------
def _ladder_problems():
    from sonic_learn.fast.ladder import Problem

    def logits(T, E, seed):  # built only when the problem runs (on the GPU)
        return lambda: (torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).cuda(),)

    return [Problem(f"token rounding, nearest, tile_m=128: T={T}, E={E}, K=8", logits(T, E, i))
            for i, (T, E) in enumerate([(4096, 64), (32768, 128), (32768, 256)])]


def _same_routing(got: Routing, want: Routing) -> None:
    for name in ("token_idx", "expert_idx", "scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and torch.equal(a.to(b.dtype), b), f"{name} differs from the reference"


if __name__ == "__main__":
    from sonic_learn.fast.ladder import Step, climb
    from sonic_learn.reference import routing as reference

    raise SystemExit(climb(
        "fast token rounding",
        [Step(name, adds, lambda x, name=name: token_rounding(x, 8, check_finite=False, selection=name))
         for name, adds in SELECTIONS.items()],
        reference=lambda x: reference.token_rounding(x, 8), agree=_same_routing, problems=_ladder_problems()))
