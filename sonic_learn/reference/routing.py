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

import torch

from sonic_learn import _checks, contracts
# The routing types, the option names and the router checks are the contract both paths share.
from sonic_learn.contracts import ROUNDING_MODES, SCORINGS, Routing, RoutingMetadata  # noqa: F401
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


# --8<-- [start:token_rounding]
def scores_for_all_experts(
    logits: torch.Tensor, tc_experts: torch.Tensor, tc_scores: torch.Tensor, scoring: str, normalize: bool
) -> torch.Tensor:
    """The router's score for EVERY (token, expert) pair, not only the token-choice picks.

    Each scoring rule is s[t, e] = exp(logit[t, e]) / Z_t with a per-token normalizer Z_t: the sum
    of exp over the token's K picks (``softmax_topk``, or ``topk_softmax`` with ``normalize``) or
    over all E experts (``topk_softmax``). We keep Z_t and evaluate the same formula at every expert,
    so a token added to an expert by rounding up gets the weight its own router would have given
    that expert. The picks keep their token-choice scores bit for bit.
    """
    x = logits.to(tc_scores.dtype)  # (T, E)
    if scoring == "topk_softmax" and not normalize:
        log_z = torch.logsumexp(x, dim=1, keepdim=True)  # (T, 1) normalizer over all E experts
    else:
        log_z = torch.logsumexp(x.gather(1, tc_experts), dim=1, keepdim=True)  # (T, 1) over the K picks
    scores = torch.exp(x - log_z)  # (T, E)
    return scores.scatter(1, tc_experts, tc_scores)  # (T, E) the picks: exactly the token-choice scores


def _rank_tokens_per_expert(scores: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """For every expert (column), all T tokens from best to worst: ``ranking[r, e]`` is the token of
    rank r for expert e. Order: token-choice picks first, then by score (descending), then the lower
    token index first on exact ties.

    The reference sorts every whole column of the (T, E) matrix. A fast kernel does not need to:
    only the tokens inside each expert's last (boundary) tile can change, so it ranks only those.
    """
    # (a) by score, best first; a stable sort keeps the lower token index first on ties.
    by_score = torch.sort(scores, dim=0, descending=True, stable=True).indices  # (T, E)
    # (b) then the token-choice picks ahead of everyone else; stable, so (a)'s order survives inside
    #     each group. (The paper gets the same order by subtracting 1 from every non-picked score.)
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
) -> Routing:
    """Token rounding (TR), SonicMoE's router (paper Section 5, Algorithm 4).

    1. Token-choice top-k (``topk_routing`` with ``scoring``/``normalize``) gives every expert e its
       token count f_e.
    2. ``round_counts`` rounds every f_e to a multiple of ``tile_m`` (``mode``: nearest with exact
       halves down, up, down, or stochastic with ``generator``), capped at T.
    3. Every expert ranks ALL T tokens: its token-choice picks first (by their token-choice score),
       then the other tokens by the score the token's router gives that expert (see below), the
       lower token index first on exact ties. Expert e keeps its first ``rounded_e`` tokens. So
       ``down`` drops e's lowest-ranked picks and ``up`` adds the best non-picked tokens; only e's
       last tile changes, and |rounded_e - f_e| < tile_m.

    Scores: a token-choice pick keeps its token-choice score exactly. A token added by rounding up
    gets exp(logit[t, e]) / Z_t, the same scoring formula with the token's own normalizer Z_t (the
    sum of exp over its K picks for ``softmax_topk`` or ``normalize=True``, over all E experts for
    plain ``topk_softmax``): the weight its router would give e. With ``softmax_topk`` an added
    expert therefore makes the token's weights sum to more than 1, as in the paper's TR.
    Scores are float32 (float64 for float64 logits) and differentiable w.r.t. ``logits``.

    Returns triples sorted by token, then by expert index within a token (NOT top-k order); a token
    may get fewer or more than K experts. ``tile_m=1`` gives exactly the pairs and scores of
    ``topk_routing``, in this (token, expert) order. T = 0 returns an empty routing.
    """
    logits = contracts.check_router_args(logits, k, scoring, normalize)
    _checks.check_int_range("tile_m", tile_m, 1)
    _checks.check_choice("mode", mode, ROUNDING_MODES)
    contracts.check_generator(generator, logits.device)
    T, E = logits.shape
    device = logits.device

    # Step 1: token-choice top-k; f_e = how many tokens picked expert e.
    tc = topk_routing(logits, k, scoring=scoring, normalize=normalize)
    tc_experts = tc.expert_idx.long().view(T, k)  # (T, K)
    tc_scores = tc.scores.view(T, k)  # (T, K)
    counts = torch.bincount(tc_experts.reshape(-1), minlength=E)  # (E,) f_e

    # Step 2: round every f_e to a multiple of tile_m (capped at T).
    rounded = round_counts(counts, tile_m, mode, generator, num_tokens=T)  # (E,)

    # Step 3: every expert ranks all tokens, token-choice picks first.
    scores = scores_for_all_experts(logits, tc_experts, tc_scores, scoring, normalize)  # (T, E)
    picked = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, tc_experts, True)  # (T, E)
    ranking = _rank_tokens_per_expert(scores.detach(), picked)  # (T, E) token of rank r for expert e

    # Step 4: expert e keeps the tokens of rank < rounded_e; scatter that back to a (token, expert) mask.
    keep_by_rank = torch.arange(T, device=device)[:, None] < rounded[None, :]  # (T, E)
    keep = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(0, ranking, keep_by_rank)  # (T, E)

    # Step 5: token-sorted triples. nonzero walks the mask row by row: by token, then by expert.
    token_idx, expert_idx = keep.nonzero(as_tuple=True)  # (P,), (P,)
    return Routing(
        token_idx=token_idx.to(torch.int32),
        expert_idx=expert_idx.to(torch.int32),
        scores=scores[token_idx, expert_idx],  # (P,)
        num_tokens=T,
        num_experts=E,
    )
# --8<-- [end:token_rounding]


# --8<-- [start:build_metadata]
def build_metadata(routing: Routing) -> RoutingMetadata:
    """Group the pairs of ``routing`` by expert: counts, offsets and the two permutations."""
    contracts.check_routing_structure(routing)
    contracts.check_routing_values(routing)
    E = routing.num_experts
    expert_idx = routing.expert_idx.long()  # (P,)

    # Step 1: histogram. f_e = number of pairs that chose expert e.
    counts = torch.bincount(expert_idx, minlength=E)  # (E,)

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
