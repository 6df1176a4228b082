"""Routing: which token goes to which expert, and the index arrays the expert GEMMs consume.

Pair 2 of SonicMoE (paper Section 5, Algorithm 4):

1. **token-choice top-k** (``topk_routing``): every token picks its K best experts. Expert e then
   receives f_e tokens, an arbitrary number, so a tile-based GEMM pads e's last M-tile.
2. **token rounding** (``token_rounding``): start from token-choice, then round every f_e to a
   multiple of the GEMM tile ``tile_m`` (``round_counts``, the rounding rule the fast path
   shares) and let expert e keep its best-ranked tokens (its token-choice picks first), so no
   tile is partly empty (unless an expert takes all T tokens, see ``round_counts``).

``build_metadata`` turns either routing into the arrays a grouped GEMM needs (the "routing
metadata" SonicMoE's kernels consume): per-expert counts and offsets, and the two permutations between *pair order*
(the flat, token-sorted list of (token, expert, score) triples) and *row order* (pairs grouped by
expert, the order of rows in the grouped GEMM).
"""

from __future__ import annotations

import warnings

import torch

from sonic_learn import _checks, contracts
# The routing types, the option names and the router checks are the contract both paths share.
from sonic_learn.contracts import (ROUNDING_MODES, SCORINGS, RoundingStats, Routing,  # noqa: F401
                                   RoutingMetadata)
from sonic_learn.reference import topk as _topk


# --8<-- [start:topk_routing]
def topk_routing(
    logits: torch.Tensor, k: int, *, scoring: str = "softmax_topk", normalize: bool = False
) -> Routing:
    """Token-choice top-k routing: the classic router, and the baseline of paper Section 5.

    Every token t picks the K experts with the largest logits and weighs them:

    - ``scoring="softmax_topk"`` (default, Mixtral style): softmax over the K selected logits.
    - ``scoring="topk_softmax"`` (Qwen style): softmax over all E experts, then the K largest
      probabilities; ``normalize=True`` rescales them to sum to 1. (``normalize`` changes nothing
      for ``softmax_topk``, whose scores already sum to 1.)

    Returns T*K triples in pair order p = t*K + j: ``token_idx[p] = t`` (ascending), ``expert_idx[p]``
    = the token's j-th best expert (descending score, the lower expert index first on ties) and
    ``scores[p]`` its weight: float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    logits = contracts.check_router_args(logits, k, scoring, normalize)
    T, E = logits.shape

    # Step 1: every token picks its K best experts and weighs them (scores float32/float64).
    if scoring == "softmax_topk":
        scores, experts = _topk.softmax_topk(logits, k)  # (T, K) scores, (T, K) expert ids
    else:
        scores, experts = _topk.topk_softmax(logits, k, normalize=normalize)  # (T, K), (T, K)

    # Step 2: flatten into token-sorted triples; token t owns pairs t*K .. t*K + K-1.
    token_idx = torch.arange(T, device=logits.device).repeat_interleave(k)  # (T*K,)
    return Routing(
        token_idx=token_idx.to(torch.int32),
        expert_idx=experts.reshape(-1).to(torch.int32),  # (T*K,)
        scores=scores.reshape(-1),  # (T*K,)
        num_tokens=T,
        num_experts=E,
    )
# --8<-- [end:topk_routing]


# --8<-- [start:round_counts]
def round_counts(
    counts: torch.Tensor,
    tile_m: int,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    *,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Round every expert's token count f_e to a multiple of ``tile_m`` (Algorithm 4, step 2).

    With ⌊f_e⌋ = floor(f_e / tile_m) * tile_m, ⌈f_e⌉ = ceil(f_e / tile_m) * tile_m and the remainder
    r_e = f_e - ⌊f_e⌋ (in [0, tile_m)), each mode returns ⌊f_e⌋ or ⌈f_e⌉:

    - ``"down"``: always ⌊f_e⌋ (drop the partial last tile: token-choice with token dropping).
    - ``"up"``: always ⌈f_e⌉ (fill the partial last tile).
    - ``"nearest"``: ⌈f_e⌉ iff ⌈f_e⌉ - f_e < f_e - ⌊f_e⌋, i.e. 2 r_e > tile_m. The comparison is
      strict, so an exact half (2 r_e == tile_m) rounds DOWN, as the paper states (App. F.2, NR-f).
    - ``"stochastic"``: draws exactly E uniforms u_e ~ U[0, 1) (float64, from ``generator``, or from
      torch's global generator when None) and takes ⌈f_e⌉ iff u_e * tile_m < r_e, i.e. with
      probability r_e / tile_m, so E[rounded_e] = f_e. The same seeded generator gives the same result.

    The cap: an expert cannot take more tokens than exist. With ``num_tokens=T`` the result is
    ``min(rounded_e, T)``; this only bites when ⌈f_e⌉ > T, and then the expert simply takes all T
    tokens (a count that is not a multiple of tile_m, the one partial tile no routing can avoid).
    Either way |rounded_e - f_e| < tile_m, and rounding never goes below ⌊f_e⌋ nor above ⌈f_e⌉.

    Returns the rounded counts, (E,), in the dtype of ``counts``.
    """
    counts = _checks.check_tensor("counts", counts)
    _checks.check_ndim("counts", counts, 1, "(E,) tokens per expert")
    _checks.check_dtype("counts", counts, (torch.int32, torch.int64))
    _checks.check_int_range("tile_m", tile_m, 1)
    _checks.check_choice("mode", mode, ROUNDING_MODES)
    contracts.check_generator(generator, counts.device)
    if num_tokens is not None:
        _checks.check_int_range("num_tokens", num_tokens, 0)
    if counts.numel() > 0 and contracts.value_checks_enabled():  # value checks: they read counts
        if int(counts.min()) < 0:
            raise ValueError(f"counts must be >= 0, got a minimum of {int(counts.min())}")
        if num_tokens is not None and int(counts.max()) > num_tokens:
            raise ValueError(f"counts must be <= num_tokens = {num_tokens}, got a maximum of {int(counts.max())}")

    return _round_counts_rule(counts, tile_m, mode, generator, num_tokens)


def _round_counts_rule(counts: torch.Tensor, tile_m: int, mode: str, generator: torch.Generator | None,
                       num_tokens: int | None) -> torch.Tensor:
    """The rounding rule of ``round_counts`` without its checks (the fast path calls it directly:
    the checks read the device)."""
    f = counts.long()  # (E,)
    floor_f = (f // tile_m) * tile_m  # (E,) ⌊f_e⌋
    remainder = f - floor_f  # (E,) r_e in [0, tile_m)
    ceil_f = floor_f + tile_m * (remainder > 0)  # (E,) ⌈f_e⌉

    if mode == "down":
        go_up = torch.zeros_like(f, dtype=torch.bool)  # (E,)
    elif mode == "up":
        go_up = remainder > 0  # (E,)
    elif mode == "nearest":
        go_up = 2 * remainder > tile_m  # (E,) strict: exact halves round down
    else:  # stochastic
        u = torch.rand(f.shape, generator=generator, dtype=torch.float64, device=f.device)  # (E,)
        go_up = u * tile_m < remainder  # (E,) P(up) = r_e / tile_m

    rounded = torch.where(go_up, ceil_f, floor_f)  # (E,)
    if num_tokens is not None:
        rounded = rounded.clamp(max=num_tokens)  # (E,) an expert cannot take more than T tokens
    return rounded.to(counts.dtype)
# --8<-- [end:round_counts]


# The paper's quality result for token rounding holds while the average number of tokens per expert
# is at least this many GEMM tiles (SonicMoE, Tables 7 and 8: no loss at T_e / M_tile >= 2; at 1 the
# validation perplexity of the 1.8B model rises from 13.12 to 13.55).
PAPER_MIN_TOKENS_PER_TILE = 2.0
_warned_shapes: set[tuple[int, int, int, int]] = set()  # (T, E, K, tile_m) already warned about


def tokens_per_tile(num_tokens: int, num_experts: int, k: int, tile_m: int) -> float:
    """The average token-choice load of an expert in GEMM tiles, T*K / (E*tile_m) (host only)."""
    return num_tokens * k / (num_experts * tile_m)


def warn_below_paper_condition(num_tokens: int, num_experts: int, k: int, tile_m: int) -> float:
    """Token rounding's guard: a ``UserWarning``, once per (T, E, K, tile_m), when the average
    tokens per expert / tile is below the paper's 2 (then rounding down drops a large share of
    the pairs, and with ``nearest`` an expert with fewer than tile_m/2 tokens gets none).
    Host-only arithmetic: no device read. Returns the ratio. (Silent while torch.compile traces: the
    eager calls of the same shape warn.)"""
    ratio = tokens_per_tile(num_tokens, num_experts, k, tile_m)
    if torch.compiler.is_compiling():  # no warning inside a torch.compile trace (it would break the graph)
        return ratio
    shape = (num_tokens, num_experts, k, tile_m)
    if tile_m > 1 and num_tokens > 0 and ratio < PAPER_MIN_TOKENS_PER_TILE and shape not in _warned_shapes:
        _warned_shapes.add(shape)
        warnings.warn(
            f"token rounding below the paper's condition: average tokens per expert / tile = "
            f"T*K/(E*tile_m) = {num_tokens}*{k}/({num_experts}*{tile_m}) = {ratio:.3g} < "
            f"{PAPER_MIN_TOKENS_PER_TILE:g}. SonicMoE reports no quality loss only while this ratio is >= 2; "
            f"here rounding down drops many token-choice pairs (an expert with fewer than tile_m/2 tokens "
            f"keeps none with mode='nearest', so tokens can lose every expert and get a zero output). "
            f"Use routing='topk', a smaller tile_m or more tokens per batch; Routing.rounding counts the "
            f"dropped pairs and tokens. (Warned once per shape.)",
            UserWarning, stacklevel=3)
    return ratio


def max_pairs(num_tokens: int, num_experts: int, k: int, tile_m: int) -> int:
    """A host-side bound on token rounding's pair count P, for every mode and every routing.

    Every mode's rounded count is at most f_e rounded up, capped at T: min(ceil_tile(f_e), T) <=
    f_e + (tile_m - 1) for the at most min(E, T*K) experts with a partial tile, and <= T. Summing,
    P <= min(T*K + min(E, T*K) * (tile_m - 1), E*T). Buffers sized by this bound need no device
    read (the fast path's sync-free token rounding pads its triples to it).
    """
    tk = num_tokens * k
    return min(tk + min(num_experts, tk) * (tile_m - 1), num_experts * num_tokens)


def _rounding_stats(keep: torch.Tensor, picked: torch.Tensor, ratio: float) -> RoundingStats:
    """Device-side counts of what rounding changed; ``keep`` and ``picked`` are (T, E) bool."""
    return RoundingStats(
        kept_pairs=keep.sum(),  # ()
        dropped_pairs=(picked & ~keep).sum(),  # ()
        added_pairs=(keep & ~picked).sum(),  # ()
        dropped_tokens=(~keep.any(dim=1)).sum(),  # () tokens with no expert left
        tokens_per_tile=ratio,
    )


# --8<-- [start:token_rounding]
def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """p[t, e]: the softmax of token t's logits over ALL E experts (float32, float64 for float64
    logits). Algorithm 4 ranks every expert's tokens by this matrix (its S), whatever the scoring
    rule of the token-choice weights."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.to(dtype), dim=1)  # (T, E)


def pair_weights(probs: torch.Tensor, tc_experts: torch.Tensor, tc_scores: torch.Tensor) -> torch.Tensor:
    """The weight of every (token, expert) pair token rounding may keep: a token-choice pick keeps
    its token-choice score bit for bit; any other pair (a token added by rounding up) gets its
    router probability p[t, e], as in the paper's Algorithm 4."""
    return probs.scatter(1, tc_experts, tc_scores)  # (T, E)


def _rank_tokens_per_expert(probs: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """For every expert (column), all T tokens from best to worst: ``ranking[r, e]`` is the token of
    rank r for expert e. Order: token-choice picks first, then by router probability p[t, e]
    (descending), then the lower token index first on exact ties.

    The reference sorts every whole column of the (T, E) matrix. A fast kernel does not need to:
    only the tokens inside each expert's last (boundary) tile can change, so it ranks only those.
    """
    # (a) by probability, best first; a stable sort keeps the lower token index first on ties.
    by_score = torch.sort(probs, dim=0, descending=True, stable=True).indices  # (T, E)
    # (b) then the token-choice picks ahead of everyone else; stable, so (a)'s order survives inside
    #     each group. (The paper gets the same order by subtracting 1 from every non-picked p.)
    not_picked = (~picked).gather(0, by_score).to(torch.int32)  # (T, E) 0 = picked, 1 = not
    picks_first = torch.sort(not_picked, dim=0, stable=True).indices  # (T, E)
    return by_score.gather(0, picks_first)  # (T, E)


def token_rounding(
    logits: torch.Tensor,
    k: int,
    *,
    tile_m: int = 128,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
    scoring: str = "softmax_topk",
    normalize: bool = False,
    pad_to_bound: bool = False,
) -> Routing:
    """Token rounding (TR), SonicMoE's router (paper Section 5, Algorithm 4).

    1. Token-choice top-k (``topk_routing`` with ``scoring``/``normalize``) gives every expert e its
       token count f_e.
    2. ``round_counts`` rounds every f_e to a multiple of ``tile_m`` (``mode``: nearest with exact
       halves down, up, down, or stochastic with ``generator``), capped at T.
    3. Every expert ranks ALL T tokens by the router probability p[t, e] = softmax over all E
       experts of the token's logits (the paper's S, whatever ``scoring`` is): its token-choice
       picks first, then the other tokens, each group by p descending, the lower token index first
       on exact ties. Expert e keeps its first ``rounded_e`` tokens. So ``down`` drops e's picks
       of lowest p and ``up`` adds the non-picked tokens of highest p; only e's last tile
       changes, and |rounded_e - f_e| < tile_m.

    Scores: a token-choice pick keeps its token-choice score exactly. A token added by rounding up
    gets p[t, e], its probability over all E experts (the paper's Algorithm 4 and its code do the
    same). With ``softmax_topk`` an added expert therefore makes the token's weights sum to more
    than 1, as in the paper's TR. (Ranking by the softmax over the token's K picks instead would
    favour tokens whose picks are weak: their normalizer is small. The paper ranks by S.)
    Scores are float32 (float64 for float64 logits) and differentiable w.r.t. ``logits``.

    Returns triples sorted by token, then by expert index within a token (NOT top-k order); a token
    may get fewer or more than K experts. ``tile_m=1`` gives exactly the pairs and scores of
    ``topk_routing``, in this (token, expert) order. T = 0 returns an empty routing.

    ``routing.rounding`` (a ``RoundingStats``) counts, on the device, the pairs dropped and added
    and the tokens left with no expert. Below the paper's condition, T*K / (E*tile_m) < 2, the
    call warns (``UserWarning``, once per shape; see ``warn_below_paper_condition``).

    ``pad_to_bound=True`` returns the layout of the fast path's sync-free router: ``max_pairs(T, E,
    K, tile_m)`` triples, the P kept ones first (exactly the ones above), then padding pairs with
    token T, expert E and score 0; P is ``routing.rounding.kept_pairs``. Its metadata is
    ``build_padded_metadata``.
    """
    logits = contracts.check_router_args(logits, k, scoring, normalize)
    _checks.check_bool("pad_to_bound", pad_to_bound)
    _checks.check_int_range("tile_m", tile_m, 1)
    _checks.check_choice("mode", mode, ROUNDING_MODES)
    contracts.check_generator(generator, logits.device)
    T, E = logits.shape
    device = logits.device
    ratio = warn_below_paper_condition(T, E, k, tile_m)  # the paper's T_e / tile >= 2, host only

    # Step 1: token-choice top-k; f_e = how many tokens picked expert e.
    tc = topk_routing(logits, k, scoring=scoring, normalize=normalize)
    tc_experts = tc.expert_idx.long().view(T, k)  # (T, K)
    tc_scores = tc.scores.view(T, k)  # (T, K)
    flat_experts = tc_experts.reshape(-1)  # (T*K,)
    counts = torch.zeros(E, dtype=torch.long, device=device).scatter_add_(
        0, flat_experts, torch.ones_like(flat_experts))  # (E,) f_e

    # Step 2: round every f_e to a multiple of tile_m (capped at T).
    rounded = round_counts(counts, tile_m, mode, generator, num_tokens=T)  # (E,)

    # Step 3: every expert ranks all tokens by p (softmax over all E), token-choice picks first.
    probs = router_probabilities(logits)  # (T, E) p[t, e]
    picked = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, tc_experts, True)  # (T, E)
    ranking = _rank_tokens_per_expert(probs.detach(), picked)  # (T, E) token of rank r for expert e
    scores = pair_weights(probs, tc_experts, tc_scores)  # (T, E) picks: token-choice score; others: p

    # Step 4: expert e keeps the tokens of rank < rounded_e; scatter that back to a (token, expert) mask.
    keep_by_rank = torch.arange(T, device=device)[:, None] < rounded[None, :]  # (T, E)
    keep = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(0, ranking, keep_by_rank)  # (T, E)

    # Step 5: token-sorted triples. nonzero walks the mask row by row: by token, then by expert.
    stats = _rounding_stats(keep, picked, ratio)
    if pad_to_bound:  # the fast path's sync-free layout: max_pairs entries, padding last
        token_idx, expert_idx, pair_scores = padded_triples(keep, scores, max_pairs(T, E, k, tile_m))
        return Routing(token_idx, expert_idx, pair_scores, T, E, rounding=stats)
    # (The pair count P depends on the data here: under torch.compile this is the one graph break
    # of the token-rounding layer; everything after it is traced with P as a dynamic size.)
    token_idx, expert_idx = keep.nonzero(as_tuple=True)  # (P,), (P,)
    return Routing(
        token_idx=token_idx.to(torch.int32),
        expert_idx=expert_idx.to(torch.int32),
        scores=scores[token_idx, expert_idx],  # (P,)
        num_tokens=T,
        num_experts=E,
        rounding=stats,
    )
# --8<-- [end:token_rounding]


def padded_triples(keep: torch.Tensor, scores: torch.Tensor, bound: int):
    """The kept pairs of the (T, E) mask ``keep`` as token-sorted triples padded to ``bound``
    entries, without reading the device: the kept pairs first (nonzero's order), then padding
    pairs with token T, expert E (both out of range) and score 0. (int32, int32, scores' dtype)."""
    T, E = keep.shape
    found = torch.nonzero_static(keep, size=bound, fill_value=-1)  # (bound, 2): kept pairs, then -1 rows
    token_idx, expert_idx = found[:, 0], found[:, 1]  # (bound,), (bound,)
    is_pair = token_idx >= 0  # (bound,) the first P entries
    weight = scores[token_idx.clamp(min=0), expert_idx.clamp(min=0)]  # (bound,) padding reads (0, 0)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return (torch.where(is_pair, token_idx, T).to(torch.int32),  # padding: T keeps the order ascending
            torch.where(is_pair, expert_idx, E).to(torch.int32),  # padding: E, skipped by the metadata
            torch.where(is_pair, weight, zero))  # padding: 0, and no gradient


def build_padded_metadata(routing: Routing) -> RoutingMetadata:
    """The metadata of a routing padded to a bound (``token_rounding(..., pad_to_bound=True)``):
    ``build_metadata`` of its P kept pairs, with the arrays extended to the padded length: a row r
    past P gets gather_idx 0 and pair_of_row r, a padding pair p gets row_of_pair p, so padding rows
    and padding pairs map to each other and never to a real pair. The layout the fast path's
    sync-free metadata kernels produce (this reference reads P on the host)."""
    contracts.check_routing_structure(routing)
    if routing.rounding is None:
        raise ValueError("routing must come from token_rounding(..., pad_to_bound=True) (routing.rounding is None)")
    P, bound = int(routing.rounding.kept_pairs), routing.num_pairs
    exact = build_metadata(Routing(routing.token_idx[:P], routing.expert_idx[:P], routing.scores[:P],
                                   routing.num_tokens, routing.num_experts))
    tail = torch.arange(P, bound, dtype=torch.int32, device=routing.token_idx.device)  # (bound - P,)
    return RoutingMetadata(
        expert_counts=exact.expert_counts, expert_offsets=exact.expert_offsets,
        gather_idx=torch.cat([exact.gather_idx, torch.zeros_like(tail)]),
        pair_of_row=torch.cat([exact.pair_of_row, tail]), row_of_pair=torch.cat([exact.row_of_pair, tail]),
        num_tokens=routing.num_tokens, num_experts=routing.num_experts)


# --8<-- [start:build_metadata]
def build_metadata(routing: Routing) -> RoutingMetadata:
    """Group the pairs of ``routing`` by expert: counts, offsets and the two permutations."""
    contracts.check_routing_structure(routing)
    contracts.check_routing_values(routing)
    E = routing.num_experts
    expert_idx = routing.expert_idx.long()  # (P,)

    # Step 1: histogram. f_e = number of pairs that chose expert e (a scatter-add of ones: its size
    # is E whatever the data, where bincount's size would depend on the largest id).
    counts = torch.zeros(E, dtype=torch.long, device=expert_idx.device).scatter_add_(
        0, expert_idx, torch.ones_like(expert_idx))  # (E,)

    # Step 2: exclusive prefix sum. Expert e owns rows offsets[e] : offsets[e+1].
    offsets = torch.zeros(E + 1, dtype=torch.long, device=expert_idx.device)  # (E+1,)
    offsets[1:] = torch.cumsum(counts, dim=0)

    # Step 3: stable grouping. Sorting pairs by expert (stable, so pair order is kept inside an
    # expert) lists, for each grouped row, the pair it holds.
    pair_of_row = torch.sort(expert_idx, stable=True).indices  # (P,)

    # Step 4: the inverse permutation: where did each pair go?
    row_of_pair = torch.empty_like(pair_of_row)  # (P,)
    row_of_pair[pair_of_row] = torch.arange(pair_of_row.numel(), device=pair_of_row.device)

    # Step 5: the token each row must load (the GEMM's gather index).
    gather_idx = routing.token_idx.long()[pair_of_row]  # (P,)

    i32 = torch.int32
    return RoutingMetadata(
        expert_counts=counts.to(i32),
        expert_offsets=offsets.to(i32),
        gather_idx=gather_idx.to(i32),
        pair_of_row=pair_of_row.to(i32),
        row_of_pair=row_of_pair.to(i32),
        num_tokens=routing.num_tokens,
        num_experts=E,
    )
# --8<-- [end:build_metadata]
