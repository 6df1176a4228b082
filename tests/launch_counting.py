"""Counting the launches of the fast MoE layer's glue on the CPU (shared by tests/test_router_launches.py
and tests/test_layer_launches.py).

Every launch costs a few microseconds of GPU time however small its work, so their number is a
cost that can be measured without a GPU: the layer's Python glue runs on the CPU, with every CuTe
launch replaced by a torch stand-in that fills the same output buffers (``STANDINS``; the GPU tests
check the kernels themselves), and ``counting_launches`` counts

* **torch launches**: the ATen ops dispatched on the step's tensors (a ``TorchDispatchMode``, which
  sees every op below autograd), *except* the ops that launch nothing on a GPU:

  - views: every op whose schema returns an alias of its input (``OpOverload.is_view``: ``view``,
    ``t``, ``expand``, ``select``, ``slice``, ``detach``, ``as_strided``, ...);
  - allocations: ``empty``, ``empty_strided``, ``empty_like``, ``new_empty`` (the caching
    allocator hands out memory without a kernel);
  - host-side scalars: ``lift_fresh``, ``scalar_tensor`` (Python numbers wrapped into CPU 0-d
    tensors; on a GPU they are kernel arguments);
  - the layer's own ``torch.library`` custom ops (``sonic_learn::*``, ``fast.ops``): dispatching one
    launches nothing by itself; the ops and CuTe calls of its implementation are counted instead.

  Everything else counts as one launch: casts (``_to_copy``), ``copy_``, ``clone``, fills
  (``zero_``, ``fill_``), ``arange``, reductions, elementwise ops, ``nonzero_static``, ... One ATen
  op launches at least one kernel on a GPU; a few launch more than one (``nonzero_static`` is a
  CUB select plus its fill, an out-of-place ``scatter`` copies first), so the count is a lower
  bound on the kernels torch launches.
* **CuTe launches**: the compiled calls of ``sonic_learn.fast._cute.launch`` (one host call each,
  several kernels in order on the stream: ``CUTE_KERNELS``), in the router (``fast.routing``,
  ``fast.topk``) and in the experts (``fast.grouped_gemm``, ``fast.moe_kernels``).
* **host syncs**: ``_local_scalar_dense`` and ``nonzero`` (they read the device on the host).

Each op is charged to a *phase* by the outermost function of a phase map on the Python stack when
it is dispatched (``ROUTER_PHASES``: the router step in detail; ``LAYER_PHASES``: router, experts
forward, experts backward). Counts are taken on a second call (the first fills the per-device
caches of placeholders).
"""

from __future__ import annotations

import collections
import contextlib
import struct
import sys
from dataclasses import dataclass, field

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from sonic_learn import _checks
from sonic_learn.fast import grouped_gemm as gg
from sonic_learn.fast import moe as fast_moe
from sonic_learn.fast import moe_kernels as mk
from sonic_learn.fast import routing as fast
from sonic_learn.fast import topk as fast_topk
from sonic_learn.reference import moe as ref_moe
from sonic_learn.reference import routing as ref

# ---------------------------------------------------------------------------------------------
# What counts
# ---------------------------------------------------------------------------------------------
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
HOST_SCALARS = {"lift_fresh", "scalar_tensor"}
SYNCS = {"_local_scalar_dense", "nonzero"}

# (file, function's qualified name) -> phase. The outermost of these on the stack names the phase of an op.
ROUTER_PHASES = {
    ("fast/moe.py", "RouterGemm.forward"): "router GEMM",
    ("fast/ops.py", "topk_experts"): "top-k",  # the custom op around token_choice_experts
    ("fast/routing.py", "token_choice_experts"): "top-k",
    ("fast/routing.py", "scores_from_experts"): "scores/softmax",
    ("reference/routing.py", "router_probabilities"): "scores/softmax",
    ("fast/routing.py", "_launch_metadata"): "counts f_e",  # under _metadata: "metadata" (outermost)
    ("fast/routing.py", "_launch_boundary_kernels"): "keys+select",
    ("fast/routing.py", "_launch_token_rounding_triples"): "keys+select+triples",  # fused_glue=True
    ("fast/routing.py", "_write_at_picks"): "pair weights",
    ("fast/routing.py", "_rounding_stats"): "stats",
    ("reference/routing.py", "padded_triples"): "compaction",
    ("fast/routing.py", "_padded_triples"): "compaction",
    ("fast/routing.py", "_pair_scores"): "compaction",  # fused_glue=True: the weights of the kernel's triples
    ("fast/moe.py", "_metadata"): "metadata",
}
ROUTER_PHASE_ORDER = ["router GEMM", "top-k", "scores/softmax", "counts f_e", "keys+select", "keys+select+triples",
                      "pair weights", "stats", "compaction", "metadata", "other"]

# The whole layer: "other" is what runs outside these functions -- in the forward the layer's own
# glue (moe_forward_with_router), in the backward the autograd engine's nodes between the layer's
# Functions (the scores' softmax and gather, the accumulation of the parameters' gradients).
LAYER_PHASES = {
    ("fast/moe.py", "route_layer"): "router",
    **{("fast/moe.py", f"{fn}.forward"): "experts forward" for fn in
       ("UpProjection", "DownProjection", "StandardExperts")},
    **{("fast/moe.py", f"{fn}.backward"): "experts backward" for fn in
       ("UpProjection", "DownProjection", "StandardExperts")},
    ("fast/moe.py", "RouterGemm.backward"): "router backward",
}
LAYER_PHASE_ORDER = ["router", "experts forward", "experts backward", "router backward", "other"]

# Kernels each compiled call runs ("module.compile function" -> kernels), for the report.
CUTE_KERNELS = {"topk.compile_kernel": 1, "routing.compile_metadata_kernel": None,
                "routing.compile_token_rounding_kernels": 2, "routing.compile_token_rounding_triples_kernels": 5,
                "routing.compile_scores_backward_kernel": 1,
                "grouped_gemm.compile_grouped_gemm": 1, "moe_kernels.compile_kernel": 1}


def _phase(phases: dict) -> str:
    """The phase of the op being dispatched: the outermost ``phases`` function on the stack."""
    found = "other"
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        for (path, name), phase in phases.items():
            if code.co_qualname == name and code.co_filename.replace("\\", "/").endswith(path):
                found = phase
        frame = frame.f_back
    return found


@dataclass
class Launches:
    """What one run of the step issued, per phase (``order``: the phases, in step order)."""

    phases: dict = field(default_factory=lambda: ROUTER_PHASES)  # (file, function) -> phase
    order: list = field(default_factory=lambda: ROUTER_PHASE_ORDER)
    torch_ops: collections.Counter = field(default_factory=collections.Counter)  # phase -> ATen launches
    cute_calls: collections.Counter = field(default_factory=collections.Counter)  # phase -> compiled calls
    cute_kernels: collections.Counter = field(default_factory=collections.Counter)  # phase -> kernels
    syncs: list = field(default_factory=list)  # ops that read the device on the host
    ops: list = field(default_factory=list)  # (phase, op name), in dispatch order

    @property
    def total(self) -> int:
        """torch launches + CuTe compiled calls (host launches of the step)."""
        return sum(self.torch_ops.values()) + sum(self.cute_calls.values())

    def per_phase(self) -> dict[str, tuple[int, int]]:
        """phase -> (torch launches, CuTe compiled calls), phases in step order, empty ones left out."""
        return {p: (self.torch_ops[p], self.cute_calls[p]) for p in self.order
                if self.torch_ops[p] or self.cute_calls[p]}

    def table(self) -> str:
        rows = [f"{p:20s} torch {t:3d}  cute {c} ({self.cute_kernels[p]} kernels)" for p, (t, c) in
                self.per_phase().items()]
        return "\n".join(rows + [f"{'total':20s} {self.total} launches "
                                 f"({sum(self.torch_ops.values())} torch + {sum(self.cute_calls.values())} CuTe)"])


class _Counter(TorchDispatchMode):
    def __init__(self, launches: Launches):
        super().__init__()
        self.launches = launches
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sonic_learn":  # the layer's custom op: count what its implementation runs
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in ALLOCATIONS | HOST_SCALARS:
            phase = _phase(self.launches.phases)
            if name in SYNCS:
                self.launches.syncs.append(name)
            if name != "_local_scalar_dense":
                self.launches.torch_ops[phase] += 1
                self.launches.ops.append((phase, name))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Torch stand-ins for the CuTe launches: the same outputs, written into the same buffers
# ---------------------------------------------------------------------------------------------
POISON = -7  # what the stand-ins write first into buffers the kernels get uninitialized (torch.empty)


def _topk_standin(variant, x, out, idx):
    kind, dtype, n, k, epilogue = variant
    assert epilogue == "values", "the layer's router asks the bitonic kernel for values only"
    idx.copy_(torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k])  # ties to the lower column
    out.copy_(x.gather(1, idx))


def _metadata_standin(variant, expert, token, tile_counts, counts, offsets, gather, pair_of_row, row_of_pair,
                      chunks_per_tile):
    bucket, scatter, fill_padding = variant
    E = counts.numel()
    valid = ((expert >= 0) & (expert < E)).nonzero().squeeze(1)  # pairs the kernels do not skip
    counts.copy_(torch.bincount(expert[valid].long(), minlength=E))
    offsets.copy_(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
    if not scatter:
        return
    if fill_padding:  # buffers from torch.empty: write only what the kernel writes
        for out in (gather, pair_of_row, row_of_pair):
            out.fill_(POISON)
    # stable grouping by expert: rows of one expert in pair order
    order = valid[torch.sort(expert[valid], stable=True).indices]  # (true P,) pair of each row
    rows = torch.arange(order.numel(), dtype=torch.int32)
    pair_of_row[: order.numel()] = order.to(torch.int32)
    row_of_pair[order] = rows
    gather[: order.numel()] = token[order]
    if fill_padding:  # per pair p: a skipped pair maps to row p; p >= offsets[E] is a padding row
        p = torch.arange(expert.numel(), dtype=torch.int32)
        skipped = (expert < 0) | (expert >= E)
        row_of_pair[skipped] = p[skipped]
        past = p >= offsets[E]
        gather[past], pair_of_row[past] = 0, p[past]


def _token_rounding_standin(variant, scores_bits, experts, keys, keep, counts, uniform, mode, tile_m):
    mode_name = {code: name for name, code in fast.ROUNDING_CODES.items()}[mode]
    scores = scores_bits.view(torch.float32)
    picked = torch.zeros_like(keep, dtype=torch.bool).scatter_(1, experts.long(), True)  # (T, E)
    keys.copy_(torch.where(picked, scores_bits | fast.PICK_BIT, scores_bits).t())
    keep.copy_(fast._boundary_keep_torch(scores, experts.long(), counts, uniform if mode_name == "stochastic" else None,
                                         mode_name, tile_m))


def _rounding_delta(f: int, u: float, mode: str, tile_m: int, T: int) -> int:
    """rounded_e - f_e as the kernels' ``rounding_delta`` computes it (integer rule, capped at T)."""
    floor_f = f // tile_m * tile_m
    rem = f - floor_f
    go_up = {"down": False, "up": rem > 0, "nearest": 2 * rem > tile_m}.get(mode)
    if go_up is None:
        go_up = u * float(tile_m) < float(rem)
    return min(floor_f + tile_m if go_up and rem > 0 else floor_f, T) - f


def _triples_standin(variant, scores_bits, experts, keys, keep, counts, uniform, mode, tile_m, tile_pairs, tile_empty,
                     token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4, tokens_per_tile, tc_score_bits,
                     pair_score_bits):
    """The selection (as above), then ``PaddedTriplesKernel`` step by step, lane by lane: each tile
    streams its bytes of the flat keep mask in 16-byte words (``WORDS_IN_FLIGHT`` per lane per step,
    straddling words masked to the tile); the count's first-kept-byte rule with the warp max-scan,
    the one-warp scan and counts, the writes at the lanes' prefix sums, the padding's grid-stride
    fill. Writes only what the kernels write, into poisoned buffers. The keep bytes name the picks'
    slots (1 + j) and the added pairs (``ADDED_BYTE``), and each kept pair's weight is read where its
    byte says: w[t, j] or p[t, e]."""
    _token_rounding_standin((), scores_bits, experts, keys, keep, counts, uniform, mode, tile_m)
    slots = torch.zeros_like(keep, dtype=torch.int32).scatter_(
        1, experts.long(), torch.arange(1, experts.shape[1] + 1, dtype=torch.int32).expand_as(experts).contiguous())
    keep.copy_(torch.where(keep.bool(), torch.where(slots > 0, slots, fast.ADDED_BYTE), 0).to(torch.uint8))
    for out in (tile_pairs, tile_empty, token_idx, expert_idx, pair_index, is_pair, token_offsets, counts4,
                pair_score_bits):
        out.fill_(POISON if out.dtype != torch.uint8 else 255)
    mode_name = {code: name for name, code in fast.ROUNDING_CODES.items()}[mode]
    T, E = keep.shape
    flat, num_bytes = keep.reshape(-1).tolist(), T * E  # byte f = t * E + e
    W, V = fast.KEEP_WORD, fast.WORDS_IN_FLIGHT
    num_tiles = tile_pairs.numel()

    def tile_bytes(tile):  # (tokens, lo, hi): the tile's tokens and its bytes [lo, hi)
        t0 = tile * tokens_per_tile
        t1 = min(t0 + tokens_per_tile, T)
        return t1 - t0, t0 * E, t1 * E

    def word_steps(lo, hi):  # per step: the 32 lanes' (start byte, kept bits, valid bits), as _load_words/_word_bits
        last_word = -(-hi // W)
        for first_word in range(lo // W, last_word, 32 * V):
            for v in range(V):
                lanes = []
                for lane in range(32):
                    w = first_word + 32 * v + lane
                    start = w * W
                    nonzero = sum(1 << j for j in range(W)
                                  if w < last_word and start + j < num_bytes and flat[start + j])
                    first, end = max(min(lo - start, W), 0), max(min(hi - start, W), 0)
                    valid = ((1 << end) - 1) & ~((1 << first) - 1)
                    lanes.append((start, nonzero & valid, valid))
                yield lanes

    def bits(mask):
        return [j for j in range(W) if mask >> j & 1]

    for tile in range(num_tiles):  # 1. count
        tokens, lo, hi = tile_bytes(tile)
        pairs = firsts = 0
        last_kept = -1
        for lanes in word_steps(lo, hi):
            mine = [max((start + j for j in bits(kept)), default=-1) for start, kept, _ in lanes]
            for lane, (start, kept, _) in enumerate(lanes):
                prev = max([last_kept] + mine[:lane])  # warp_exclusive_max, then the earlier steps
                for j in bits(kept):
                    e = (start + j) % E
                    firsts += prev < start + j - e  # no kept byte since the token's first byte
                    prev = start + j
                pairs += len(bits(kept))
            last_kept = max([last_kept] + mine)
        tile_pairs[tile], tile_empty[tile] = pairs, tokens - firsts
    starts = [0] + torch.cumsum(tile_pairs, 0).tolist()[:-1]  # 2. scan (exclusive, in place)
    kept, empty = int(tile_pairs.sum()), int(tile_empty.sum())
    tile_pairs.copy_(torch.tensor(starts))
    deltas = [_rounding_delta(int(counts[e]), float(uniform[e]) if mode_name == "stochastic" else 0.0, mode_name,
                              tile_m, T) for e in range(E)]
    counts4.copy_(torch.tensor([kept, sum(-d for d in deltas if d < 0), sum(d for d in deltas if d > 0), empty]))
    outs = {name: out.tolist() for name, out in
            (("token", token_idx), ("expert", expert_idx), ("index", pair_index), ("is_pair", is_pair),
             ("offsets", token_offsets), ("score", pair_score_bits))}
    p_bits, w_bits = scores_bits.reshape(-1).tolist(), tc_score_bits.tolist()
    outs["offsets"][T] = kept
    for tile in range(num_tiles):  # 3. write
        _, lo, hi = tile_bytes(tile)
        running = starts[tile]
        for lanes in word_steps(lo, hi):
            pos = running
            for start, kept_bits, valid in lanes:  # lane by lane: the exclusive prefix of the lanes' counts
                for j in bits(valid):
                    t, e = divmod(start + j, E)
                    if e == 0:  # the first byte of token t
                        outs["offsets"][t] = pos
                    if kept_bits >> j & 1:
                        outs["token"][pos], outs["expert"][pos] = t, e
                        outs["index"][pos], outs["is_pair"][pos] = start + j, 1
                        byte = flat[start + j]  # where the weight is: p at an added pair, else w[t, slot]
                        outs["score"][pos] = p_bits[start + j] if byte == fast.ADDED_BYTE else w_bits[t][byte - 1]
                        pos += 1
            running = pos
    for pos in range(kept, token_idx.numel()):  # the padding (grid-stride)
        outs["token"][pos], outs["expert"][pos], outs["index"][pos], outs["is_pair"][pos] = T, E, 0, 0
        outs["score"][pos] = 0
    for name, out in (("token", token_idx), ("expert", expert_idx), ("index", pair_index), ("is_pair", is_pair),
                      ("offsets", token_offsets), ("score", pair_score_bits)):
        out.copy_(torch.tensor(outs[name], dtype=out.dtype))


def _scores_backward_standin(variant, grad, expert_idx, token_offsets, probs, tc_experts, tc_scores, out):
    """``ScoresBackwardKernel`` step by step, lane by lane, in float32: per token t a warp walks its
    pairs 32 at a time; each pick j (lane j) finds the pair holding its expert (the lowest such lane,
    as the ballot does) and takes its gradient; the other pairs add g * p to their lane's partial
    sum; the two butterfly sums (offsets 16, 8, 4, 2, 1); the row p * (0 - dot_p), then the pairs'
    p * (g - dot_p) and the picks' p * (0 - dot_p) + w * (g - dot_w). (The GPU may contract a
    multiply-add into one rounding; the tests compare both against float64 with a tolerance.)"""
    (separate_picks,) = variant

    def f32(x: float) -> float:  # round to float32 (each op: the exact double result, rounded once)
        return struct.unpack("f", struct.pack("f", x))[0]

    T, E = probs.shape
    p_all, grads, experts = probs.tolist(), grad.tolist(), expert_idx.tolist()
    offsets, picks_all, w_all = token_offsets.tolist(), tc_experts.tolist(), tc_scores.tolist()
    K = len(picks_all[0]) if separate_picks and T else 0

    def warp_sum(lanes):  # the butterfly: every lane ends with the same float32 sum
        x = list(lanes) + [0.0] * (32 - len(lanes))
        for offset in (16, 8, 4, 2, 1):
            x = [f32(x[lane] + x[lane ^ offset]) for lane in range(32)]
        return x[0]

    rows = []
    for t in range(T):
        lo, hi = offsets[t], offsets[t + 1]
        p = p_all[t]
        picks, w = picks_all[t][:K], w_all[t][:K]
        g_pick = [0.0] * K
        partial = [0.0] * 32
        non_picks = []  # (expert, gradient) of the pairs that are p's
        for base in range(lo, hi, 32):
            chunk = [(experts[i], grads[i]) for i in range(base, min(base + 32, hi))]
            for j, e_j in enumerate(picks):
                holders = [lane for lane, (e, _) in enumerate(chunk) if e == e_j]
                if holders:
                    g_pick[j] = chunk[holders[0]][1]
            for lane, (e, g) in enumerate(chunk):
                if e not in picks:
                    partial[lane] = f32(partial[lane] + f32(g * p[e]))
                    non_picks.append((e, g))
        dot_p = warp_sum(partial)
        dot_w = warp_sum([f32(g_pick[j] * w[j]) for j in range(K)])
        row = [f32(v * f32(0.0 - dot_p)) for v in p]
        for e, g in non_picks:
            row[e] = f32(p[e] * f32(g - dot_p))
        for j, e in enumerate(picks):
            row[e] = f32(f32(p[e] * f32(0.0 - dot_p)) + f32(w[j] * f32(g_pick[j] - dot_w)))
        rows.append(row)
    out.copy_(torch.tensor(rows, dtype=torch.float32).view(T, E))


# The experts' kernels (fast.grouped_gemm, fast.moe_kernels): fp32 accumulation, one rounding to
# the output dtype, rows past the last expert (expert_offsets[E]) left as they are. The functions
# below are also the kernels' arithmetic for an oracle that composes them without the layer's glue.
def expert_gemm(rows: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, N) float32: row r of an expert e times w[e] (E, K, N); rows past offsets[E] are 0."""
    out = torch.zeros(rows.shape[0], w.shape[2])
    bounds = offsets.tolist()
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[lo:hi] = rows[lo:hi].float() @ w[e].float()
    return out


def expert_weight_grad(a_rows: torch.Tensor, b_rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(E, K, N) float32: a_e^T @ b_e over the rows of each expert e (zeros for an empty expert)."""
    bounds = offsets.tolist()
    return torch.stack([a_rows[lo:hi].float().t() @ b_rows[lo:hi].float() for lo, hi in zip(bounds[:-1], bounds[1:])])


def dswiglu_epilogue(da_prime: torch.Tensor, h: torch.Tensor, row_scores: torch.Tensor, tile_n: int):
    """The dH GEMM's epilogue on dA' (M, n) float32: dH, A' = s*A (h's dtype) and dS's partial sums
    (M, n-tiles) float32, one per tile_n columns (the host sums them)."""
    a = ref_moe.swiglu(h.float())  # (M, n) float32
    s = row_scores[:, None]
    dh = ref_moe.swiglu_backward(h.float(), da_prime * s).to(h.dtype)
    prod = da_prime * a
    ds_part = torch.stack([prod[:, j:j + tile_n].sum(1) for j in range(0, prod.shape[1], tile_n)], 1)
    return dh, (a * s).to(h.dtype), ds_part


def gather_sum_rows(rows: torch.Tensor, weights: torch.Tensor | None, row_of_pair: torch.Tensor,
                    token_offsets: torch.Tensor) -> torch.Tensor:
    """(T, d) in rows' dtype: out[t] = sum over the pairs p of token t of weights[p] * rows[row_of_pair[p]]."""
    T = token_offsets.numel() - 1
    pairs = int(token_offsets[T])
    token_of_pair = torch.repeat_interleave(torch.arange(T), (token_offsets[1:] - token_offsets[:-1]).long())
    contrib = rows[row_of_pair[:pairs].long()].float()  # (true P, d) in pair order
    if weights is not None:
        contrib = contrib * weights[:pairs, None]
    return torch.zeros(T, rows.shape[1]).index_add_(0, token_of_pair, contrib).to(rows.dtype)


def _grouped_gemm_standin(variant, a, b, out, epi_out, epi_in, row_in, row_out, gather_idx, offsets, tile_offsets,
                          grid):
    kind, dtype, out_dtype, tile, stages, options = variant
    options = dict(options)
    E = offsets.numel() - 1
    end = int(offsets[E])
    rows = a.index_select(0, gather_idx.long()) if kind.endswith("_gather") else a
    if kind.startswith("varlen_k"):  # out[e] = A_e^T b_e, (E, K, N) or stored transposed (E, N, K)
        grad = expert_weight_grad(rows, b, offsets)
        out.copy_((grad.transpose(1, 2) if options["transposed"] else grad).reshape(out.shape).to(out.dtype))
        return
    w = b.view(E, -1, b.shape[1])  # (E, K, N), or (E, N, K) read K-major
    acc = expert_gemm(rows, w.transpose(1, 2) if options["transposed"] else w, offsets)[:end]  # (true rows, N)
    if options["epilogue"] == "store":
        out[:end] = acc.to(out.dtype)
    elif options["epilogue"] == "swiglu":  # out = H, epi_out = A
        out[:end] = acc.to(out.dtype)
        epi_out[:end] = ref_moe.swiglu(out[:end])
    else:  # "dswiglu": out = A', epi_out = dH, epi_in = H, row_in = the rows' scores, row_out = dS's parts
        dh, a_scaled, ds_part = dswiglu_epilogue(acc, epi_in[:end], row_in[:end], tile[1])
        epi_out[:end], out[:end], row_out[:end] = dh, a_scaled, ds_part


def _moe_kernel_standin(variant, *args):
    name, dtype = variant
    if name == "zero_rows_past_end":  # token rounding's backward: the torch version of the kernel
        a, b, offsets = args
        fast_moe.zero_rows_past_end(a, b, end=offsets[-1])
        return
    if name not in ("gather_sum", "gather_sum_weighted"):
        raise NotImplementedError(f"no CPU stand-in for the moe_kernels kernel {name}")
    rows, weights, row_of_pair, token_offsets, out = args
    out.copy_(gather_sum_rows(rows, weights if name == "gather_sum_weighted" else None, row_of_pair, token_offsets))


STANDINS = {"topk.compile_kernel": _topk_standin, "routing.compile_metadata_kernel": _metadata_standin,
            "routing.compile_token_rounding_kernels": _token_rounding_standin,
            "routing.compile_token_rounding_triples_kernels": _triples_standin,
            "routing.compile_scores_backward_kernel": _scores_backward_standin,
            "grouped_gemm.compile_grouped_gemm": _grouped_gemm_standin,
            "moe_kernels.compile_kernel": _moe_kernel_standin}


@dataclass(frozen=True)
class _FakeCompiled:
    name: str  # "module.compile function"
    variant: tuple  # its compile-time arguments (then its keyword arguments, sorted, if any)


def private_warning_registry(monkeypatch) -> None:
    """The shapes warned about below the paper's condition are remembered process-wide (once per
    shape): the shapes these tests draw must not silence another test's expected warning."""
    monkeypatch.setattr(ref, "_warned_shapes", set(ref._warned_shapes))


@contextlib.contextmanager
def counting_launches(monkeypatch, phases: dict = ROUTER_PHASES, order: list = ROUTER_PHASE_ORDER):
    """Within the block, the fast layer runs on CPU tensors with torch stand-ins for the CuTe
    launches, and every launch is counted into the yielded ``Launches`` (per ``phases``)."""
    launches = Launches(phases, order)
    mode = _Counter(launches)

    def fake_compiled(compile_fn, *args, **kwargs):
        module = compile_fn.__module__.rsplit(".", 1)[-1]
        return _FakeCompiled(f"{module}.{compile_fn.__name__}", args + ((tuple(sorted(kwargs.items())),) if kwargs
                                                                        else ()))

    def fake_launch(kernel, device, *args):
        phase = _phase(phases)
        launches.cute_calls[phase] += 1
        kernels = CUTE_KERNELS[kernel.name]
        if kernels is None:  # the metadata call: three kernels, four with the scatter
            kernels = 4 if kernel.variant[1] else 3
        launches.cute_kernels[phase] += kernels
        mode.paused += 1
        try:
            STANDINS[kernel.name](kernel.variant, *args)
        finally:
            mode.paused -= 1

    for module in (fast, fast_topk, gg, mk):
        monkeypatch.setattr(module, "compiled", fake_compiled)
        monkeypatch.setattr(module, "launch", fake_launch)
    monkeypatch.setattr(gg, "_grid_size", lambda *args: 1)  # the persistent GEMM's grid: no SM count on the CPU
    monkeypatch.setattr(_checks, "check_cuda", lambda name, t: None)  # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(fast, "_kernel_device", lambda t: True)  # (the same for the scores' backward kernel)
    private_warning_registry(monkeypatch)
    with mode:
        yield launches

