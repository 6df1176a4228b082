"""Properties of the routers (pair 2: token-choice top-k vs token rounding) and the routing metadata.

Functions checked (signatures of ``sonic_learn.reference.routing``):

* ``topk_routing(logits, k, *, scoring, normalize) -> Routing``: every token's K best experts
  (ties to the lower expert), scores by softmax over the K picks or over all E experts.
* ``round_counts(counts, tile_m, mode, generator, *, num_tokens) -> counts``: round every f_e to a
  multiple of tile_m; ``"nearest"`` rounds an exact half DOWN (paper App. F.2).
* ``token_rounding(logits, k, *, tile_m, mode, generator, scoring, normalize) -> Routing``: the
  loads of token-choice rounded to tiles, each expert keeping its token-choice picks first.
* ``build_metadata(routing) -> RoutingMetadata``: counts, offsets and the two permutations.

Integer outputs must match exactly; scores within a float32 tolerance (float64 for float64 logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from hypothesis import strategies as st

from sonic_learn.properties import BadInput, Property, expect, expect_raises, seeded, short
from sonic_learn.properties.topk import oracle_indices
from sonic_learn.reference import routing as ref
from sonic_learn.reference.routing import Routing

SCORINGS = ("softmax_topk", "topk_softmax")
TIE_LOGITS = (-1.0, 0.0, 0.5, 2.0)


class RouterCase(NamedTuple):
    T: int
    E: int
    k: int
    dtype: torch.dtype
    scoring: str
    normalize: bool
    ties: bool  # logits from a tiny set (ties everywhere)
    seed: int
    tile_m: int = 1
    mode: str = "nearest"


def make_logits(case: RouterCase) -> torch.Tensor:
    g = seeded(case.seed)
    if case.ties:
        x = torch.tensor(TIE_LOGITS, dtype=torch.float64)[torch.randint(len(TIE_LOGITS), (case.T, case.E), generator=g)]
    else:
        x = torch.randn(case.T, case.E, generator=g, dtype=torch.float64) * 2
    return x.to(case.dtype)  # (T, E)


@st.composite
def router_cases(draw, max_T: int = 40, max_E: int = 12, tiles=(1,), modes=("nearest",)) -> RouterCase:
    E = draw(st.integers(1, max_E))
    return RouterCase(
        T=draw(st.integers(0, max_T)),
        E=E,
        k=draw(st.integers(1, E)),
        dtype=draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16))),
        scoring=draw(st.sampled_from(SCORINGS)),
        normalize=draw(st.booleans()),
        ties=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        tile_m=draw(st.sampled_from(tiles)),
        mode=draw(st.sampled_from(modes)),
    )


def _score_tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


def _check_routing_object(r: object, T: int, E: int, logits_dtype: torch.dtype, prop: str) -> None:
    expect(isinstance(r, Routing), f"[{prop}] must return a sonic_learn.reference.routing.Routing, got {type(r).__name__}")
    expect(r.num_tokens == T and r.num_experts == E,
           f"[{prop}] num_tokens/num_experts must be T = {T}, E = {E}, got {r.num_tokens}, {r.num_experts}")
    for name in ("token_idx", "expert_idx"):
        t = getattr(r, name)
        expect(t.dtype in (torch.int32, torch.int64), f"[{prop}] routing.{name} must be int32 (or int64), got {t.dtype}")
    want = torch.float64 if logits_dtype == torch.float64 else torch.float32
    expect(r.scores.dtype == want, f"[{prop}] scores must be {want} for {logits_dtype} logits, got {r.scores.dtype}")
    P = r.token_idx.numel()
    expect(r.expert_idx.numel() == P and r.scores.numel() == P, f"[{prop}] token_idx, expert_idx and scores must have one entry per pair")


# ----------------------------------------------------------------------------------------------
# topk_routing
# ----------------------------------------------------------------------------------------------


def check_topk_routing_agrees(fn, case: RouterCase) -> None:
    """Pairs t*K + j = (t, the token's j-th best expert), ties to the lower expert; scores as specified."""
    logits = make_logits(case)
    r = fn(logits, case.k, scoring=case.scoring, normalize=case.normalize)
    _check_routing_object(r, case.T, case.E, case.dtype, "agrees_with_oracle")
    T, k = case.T, case.k
    experts = oracle_indices(logits, k)  # (T, K) the top-k oracle: descending, ties to the lower expert
    tokens = torch.arange(T).repeat_interleave(k)
    expect(torch.equal(r.token_idx.long(), tokens), f"[agrees_with_oracle] token_idx must be t repeated K times in order "
           f"(pair p = t*K + j): expected {short(tokens)}, got {short(r.token_idx)}")
    got = r.expert_idx.long().view(T, k)
    if not torch.equal(got, experts):
        t = int((got != experts).any(1).nonzero()[0])
        raise AssertionError(f"[agrees_with_oracle] token {t}: experts must be its K best, descending, lower expert first "
                             f"on ties: logits {short(logits[t].double())}, expected {short(experts[t])}, got {short(got[t])}")
    sel = logits.double().gather(1, experts)  # (T, K)
    if case.scoring == "softmax_topk":
        want = torch.softmax(sel, dim=1)
    else:
        want = torch.softmax(logits.double(), dim=1).gather(1, experts)
        if case.normalize:
            want = want / want.sum(1, keepdim=True)
    got_s = r.scores.double().view(T, k)
    if not torch.allclose(got_s, want, **_score_tol(case.dtype)):
        t = int((~torch.isclose(got_s, want, **_score_tol(case.dtype))).any(1).nonzero()[0])
        raise AssertionError(f"[agrees_with_oracle] token {t}: scores ({case.scoring}, normalize={case.normalize}) must be "
                             f"{short(want[t])}, got {short(got_s[t])}")


def check_topk_routing_differentiable(fn, case: RouterCase) -> None:
    """Scores are differentiable w.r.t. the logits: torch.autograd.gradcheck in float64."""
    logits = make_logits(case._replace(dtype=torch.float64, ties=False)).requires_grad_(True)
    r = fn(logits, case.k, scoring=case.scoring, normalize=case.normalize)
    expect(r.scores.requires_grad, "[differentiable] scores must carry a gradient back to the logits (do not detach them)")

    def scores_of(lg):
        return fn(lg, case.k, scoring=case.scoring, normalize=case.normalize).scores

    ok = torch.autograd.gradcheck(scores_of, (logits,), eps=1e-6, atol=1e-5, raise_exception=False)
    expect(ok, "[differentiable] d scores / d logits disagrees with finite differences (gradcheck in float64)")


def bad_router_inputs(extra: dict | None = None) -> list[BadInput]:
    lg = torch.randn(6, 4)
    kw = extra or {}
    return [
        BadInput("logits is 1-D", (torch.randn(4), 2), kw, match="logits"),
        BadInput("k larger than E", (lg, 5), kw, match="k"),
        BadInput("k = 0", (lg, 0), kw, match="k"),
        BadInput("an unknown scoring", (lg, 2), {**kw, "scoring": "sigmoid"}, match="scoring"),
        BadInput("logits with NaN", (torch.tensor([[0.0, float("nan")]]), 1), kw, match="logits|NaN"),
        BadInput("integer logits", (torch.ones(3, 4, dtype=torch.int64), 1), kw, error=TypeError, match="logits"),
    ]


def check_router_rejects_bad_input(fn, case) -> None:
    for bad in bad_router_inputs():
        expect_raises(fn, bad)


def topk_routing_properties() -> list[Property]:
    f32, f64 = torch.float32, torch.float64
    return [
        Property("agrees_with_oracle", "K best experts per token (ties to the lower expert), scores by the chosen rule",
                 router_cases(), check_topk_routing_agrees,
                 examples=(RouterCase(64, 8, 2, f32, "softmax_topk", False, False, 0),
                           RouterCase(0, 4, 2, f32, "softmax_topk", False, False, 1),
                           RouterCase(9, 5, 5, f32, "topk_softmax", True, True, 2),
                           RouterCase(12, 6, 3, torch.bfloat16, "topk_softmax", False, True, 3))),
        Property("differentiable", "scores are differentiable w.r.t. the logits (gradcheck in float64)",
                 router_cases(max_T=4, max_E=5), check_topk_routing_differentiable, max_examples=5,
                 examples=(RouterCase(3, 4, 2, f64, "softmax_topk", False, False, 4),
                           RouterCase(3, 4, 2, f64, "topk_softmax", True, False, 5))),
        Property("rejects_bad_input", "bad logits, k and scoring raise ValueError/TypeError naming the argument",
                 st.just(None), check_router_rejects_bad_input, max_examples=1),
    ]


# ----------------------------------------------------------------------------------------------
# round_counts
# ----------------------------------------------------------------------------------------------


class CountsCase(NamedTuple):
    counts: tuple  # f_e per expert
    tile_m: int
    mode: str
    num_tokens: int | None
    dtype: torch.dtype = torch.int64


@st.composite
def counts_cases(draw, modes=("nearest", "up", "down")) -> CountsCase:
    tile = draw(st.sampled_from((1, 2, 3, 4, 8, 16, 128)))
    edge = st.sampled_from((0, 1, tile // 2, tile - 1, tile, tile + 1, tile + tile // 2, 2 * tile + tile // 2))
    counts = draw(st.lists(edge | st.integers(0, 3 * tile), min_size=1, max_size=10))
    T = draw(st.none() | st.integers(max(counts), max(counts) + tile))
    return CountsCase(tuple(counts), tile, draw(st.sampled_from(modes)), T, draw(st.sampled_from((torch.int32, torch.int64))))


def expected_rounding(f: int, tile: int, mode: str, T: int | None, u: float | None = None) -> int:
    """The definition, on one count, in plain integers (written independently of ``round_counts``).

    ``mode="stochastic"`` needs the expert's uniform draw ``u``: round up iff ``u * tile < r``.
    """
    lo = (f // tile) * tile
    hi = lo + (tile if f > lo else 0)
    r = f - lo
    if mode == "stochastic":
        up = u * tile < r
    else:
        up = {"down": False, "up": r > 0, "nearest": 2 * r > tile}[mode]
    out = hi if up else lo
    return min(out, T) if T is not None else out


def oracle_routing(
    logits: torch.Tensor,
    k: int,
    *,
    routing: str = "topk",
    tile_m: int = 1,
    scoring: str = "softmax_topk",
    normalize: bool = False,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Token-choice top-k or token rounding from the definitions, in float64 with Python loops.

    Written independently of ``sonic_learn.reference.routing`` (an oracle for whole-layer tests):
    sorted() on tuples instead of tensor sorts, one expert at a time. Returns ``(pairs, scores)``:
    the routed (token, expert) pairs in ascending order and their float64 scores, differentiable
    w.r.t. ``logits``. ``mode="stochastic"`` draws E float64 uniforms from ``generator``, the
    documented draw of ``round_counts``.
    """
    L = logits.double()  # (T, E)
    T, E = L.shape
    rows = L.detach().tolist()

    # 1. Token choice: each token's K largest logits, the lower expert first on ties.
    picks = [sorted(range(E), key=lambda e: (-row[e], e))[:k] for row in rows]
    # 2. Each token's normalizer: Z_t = sum of exp over its K picks, or over all E experts
    #    (plain topk_softmax). Every routed pair (t, e) scores exp(L[t, e]) / Z_t.
    over_all = scoring == "topk_softmax" and not normalize
    log_z = [torch.logsumexp(L[t] if over_all else L[t, picks[t]], dim=0) for t in range(T)]
    routed = {(t, e) for t in range(T) for e in picks[t]}

    picked = set(routed)
    # The router probability p[t, e] = softmax over ALL E experts (the paper's Algorithm 4 ranks by it).
    log_z_all = [torch.logsumexp(L[t], dim=0) for t in range(T)]
    if routing == "token_rounding":
        # 3. Round every expert's load; the expert keeps its best-ranked tokens: its picks first,
        #    then by p (the log probability orders like p), then the lower token.
        u = torch.rand(E, generator=generator, dtype=torch.float64).tolist() if mode == "stochastic" else [None] * E
        kept = set()
        for e in range(E):
            load = expected_rounding(sum(e in p for p in picks), tile_m, mode, T, u[e])
            log_p = {t: rows[t][e] - float(log_z_all[t].detach()) for t in range(T)}
            ranked = sorted(range(T), key=lambda t: ((t, e) not in picked, -log_p[t], t))
            kept.update((t, e) for t in ranked[:load])
        routed = kept

    pairs = sorted(routed)
    tokens = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    experts = torch.tensor([e for _, e in pairs], dtype=torch.long)
    # 4. A pick keeps its token-choice score exp(L) / Z_t; a token added by rounding up weighs p[t, e].
    log_norm = [log_z[t] if (t, e) in picked else log_z_all[t] for t, e in pairs]
    log_z_of_pair = torch.stack(log_norm) if pairs else L.new_zeros(0)  # (P,)
    return pairs, torch.exp(L[tokens, experts] - log_z_of_pair)  # (P,) float64 scores


def check_round_counts_definition(fn, case: CountsCase) -> None:
    counts = torch.tensor(case.counts, dtype=case.dtype)
    out = fn(counts, case.tile_m, case.mode, None, num_tokens=case.num_tokens)
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(counts.shape),
           f"[matches_definition] must return a tensor of shape (E,) = {tuple(counts.shape)}")
    expect(out.dtype == counts.dtype, f"[matches_definition] must keep the dtype of counts ({counts.dtype}), got {out.dtype}")
    for e, f in enumerate(case.counts):
        want = expected_rounding(f, case.tile_m, case.mode, case.num_tokens)
        got = int(out[e])
        if got != want:
            r = f % case.tile_m
            msg = f"[matches_definition] counts[{e}] = {f}, tile_m = {case.tile_m}, mode = {case.mode!r}"
            if case.num_tokens is not None:
                msg += f", num_tokens = {case.num_tokens}"
            msg += f": must round to {want}, got {got}"
            if case.mode == "nearest" and 2 * r == case.tile_m:
                msg += (f". {f} is an EXACT HALF between {f - r} and {f - r + case.tile_m}: 'nearest' rounds exact "
                        "halves DOWN (the comparison 2*r > tile_m is strict, paper App. F.2)")
            elif case.num_tokens is not None and want == case.num_tokens:
                msg += ". An expert cannot take more than num_tokens tokens: cap the result at num_tokens"
            raise AssertionError(msg)


def check_nearest_halves_down(fn, case) -> None:
    """Exact halves, on their own: f = q*tile + tile/2 must round to q*tile."""
    for tile in (2, 4, 8, 128):
        counts = torch.tensor([tile // 2, tile + tile // 2, 3 * tile + tile // 2], dtype=torch.int64)
        out = fn(counts, tile, "nearest", None)
        want = counts - tile // 2
        if not torch.equal(out.long(), want):
            raise AssertionError(f"[nearest_halves_down] tile_m = {tile}: counts {short(counts)} are exact halves and must "
                                 f"round DOWN to {short(want)}, got {short(out)} ('nearest' uses the strict 2*r > tile_m)")


def check_stochastic(fn, case: CountsCase) -> None:
    """mode='stochastic': each result is floor or ceil, the same seed gives the same result, and the
    mean over many draws is f (unbiased, checked within 6 standard deviations)."""
    counts = torch.tensor(case.counts, dtype=torch.int64).repeat(400)  # (E*400,)
    a = fn(counts, case.tile_m, "stochastic", torch.Generator().manual_seed(7)).long()
    b = fn(counts, case.tile_m, "stochastic", torch.Generator().manual_seed(7)).long()
    expect(torch.equal(a, b), "[stochastic] the same seeded generator must give the same rounding")
    lo = (counts // case.tile_m) * case.tile_m
    hi = lo + case.tile_m * (counts > lo)
    expect(((a == lo) | (a == hi)).all(), "[stochastic] every result must be floor or ceil to a multiple of tile_m")
    E = len(case.counts)
    mean = a.view(400, E).double().mean(0)  # (E,)
    f = torch.tensor(case.counts, dtype=torch.float64)
    p = (f - lo[:E].double()) / case.tile_m
    sd = case.tile_m * torch.sqrt(p * (1 - p) / 400) + 1e-9
    bad = ((mean - f).abs() > 6 * sd).nonzero()
    if bad.numel():
        e = int(bad[0])
        raise AssertionError(f"[stochastic] counts[{e}] = {case.counts[e]}, tile_m = {case.tile_m}: the mean of 400 draws is "
                             f"{mean[e].item():.2f}, expected {case.counts[e]} (round up with probability r/tile_m)")


def bad_counts_inputs() -> list[BadInput]:
    c = torch.tensor([3, 5, 0])
    return [
        BadInput("float counts", (c.float(), 4), error=TypeError, match="counts"),
        BadInput("2-D counts", (c[None], 4), match="counts"),
        BadInput("negative counts", (torch.tensor([3, -1]), 4), match="counts"),
        BadInput("tile_m = 0", (c, 0), match="tile_m"),
        BadInput("an unknown mode", (c, 4, "banker"), match="mode"),
        BadInput("counts above num_tokens", (c, 4), {"num_tokens": 4}, match="counts|num_tokens"),
    ]


def round_counts_properties() -> list[Property]:
    return [
        Property("matches_definition", "down/up/nearest (halves down) round to floor/ceil multiples of tile_m, capped at num_tokens",
                 counts_cases(), check_round_counts_definition,
                 examples=(CountsCase((0, 1, 63, 64, 65, 127, 128, 129, 192), 128, "nearest", None),
                           CountsCase((5, 6, 7), 4, "up", 7), CountsCase((5, 6, 7), 4, "down", None))),
        Property("nearest_halves_down", "an exact half (2r == tile_m) rounds DOWN in 'nearest' mode",
                 st.just(None), check_nearest_halves_down, max_examples=1),
        Property("stochastic", "stochastic rounding: floor or ceil, reproducible with a seed, unbiased",
                 counts_cases(modes=("stochastic",)), check_stochastic, max_examples=10,
                 examples=(CountsCase((0, 1, 3, 4, 5, 9), 4, "stochastic", None),)),
        Property("rejects_bad_input", "bad counts, tile_m, mode and num_tokens raise ValueError/TypeError naming the argument",
                 st.just(None), lambda fn, case: [expect_raises(fn, b) for b in bad_counts_inputs()], max_examples=1),
    ]


# ----------------------------------------------------------------------------------------------
# token_rounding
# ----------------------------------------------------------------------------------------------


def _token_rounding(fn, case: RouterCase, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
    logits = make_logits(case) if logits is None else logits
    r = fn(logits, case.k, tile_m=case.tile_m, mode=case.mode, scoring=case.scoring, normalize=case.normalize)
    _check_routing_object(r, case.T, case.E, case.dtype, "token_rounding")
    return logits, r


def pair_mask(r: Routing) -> torch.Tensor:
    """(T, E) bool on the routing's device: which (token, expert) pairs the routing holds."""
    keep = torch.zeros(r.num_tokens, r.num_experts, dtype=torch.bool, device=r.token_idx.device)
    keep[r.token_idx.long(), r.expert_idx.long()] = True
    return keep  # (T, E)


def check_tr_sorted_unique(fn, case: RouterCase) -> None:
    """Triples sorted by token, then by expert; no (token, expert) pair twice."""
    _, r = _token_rounding(fn, case)
    key = r.token_idx.long() * r.num_experts + r.expert_idx.long()
    expect(bool((key.diff() > 0).all()) if key.numel() > 1 else True,
           "[sorted_unique] triples must be sorted by token, then by expert index, with no pair twice")


def check_tr_loads(fn, case: RouterCase) -> None:
    """Expert e keeps round(f_e) tokens: a multiple of tile_m (or all T), within tile_m of f_e."""
    logits, r = _token_rounding(fn, case)
    tc = ref.topk_routing(logits, case.k, scoring=case.scoring, normalize=case.normalize)
    f = torch.bincount(tc.expert_idx.long(), minlength=case.E)  # (E,)
    load = torch.bincount(r.expert_idx.long(), minlength=case.E)  # (E,)
    for e in range(case.E):
        want = expected_rounding(int(f[e]), case.tile_m, case.mode, case.T)
        if int(load[e]) != want:
            hint = ""
            if case.mode == "nearest" and 2 * (int(f[e]) % case.tile_m) == case.tile_m:
                hint = " (an exact half: 'nearest' rounds it DOWN)"
            raise AssertionError(f"[loads_are_rounded] expert {e}: token-choice gives f_e = {int(f[e])}, tile_m = {case.tile_m}, "
                                 f"mode = {case.mode!r}: it must keep {want} tokens{hint}, kept {int(load[e])}")


def check_tr_picks_first(fn, case: RouterCase) -> None:
    """An expert that grows keeps all its token-choice picks; one that shrinks keeps only picks."""
    logits, r = _token_rounding(fn, case)
    tc = ref.topk_routing(logits, case.k, scoring=case.scoring, normalize=case.normalize)
    picked = pair_mask(tc)
    keep = pair_mask(r)
    for e in range(case.E):
        f, load = int(picked[:, e].sum()), int(keep[:, e].sum())
        if load >= f and not bool((keep[:, e] | ~picked[:, e]).all()):
            raise AssertionError(f"[picks_first] expert {e} grows from {f} to {load} tokens, so it must keep all its "
                                 "token-choice picks (they rank first)")
        if load < f and not bool((picked[:, e] | ~keep[:, e]).all()):
            raise AssertionError(f"[picks_first] expert {e} shrinks from {f} to {load} tokens, so it must keep only "
                                 "token-choice picks (the best-scored ones)")


def check_tr_tile1_is_topk(fn, case: RouterCase) -> None:
    """tile_m = 1 changes nothing: the pairs and scores of topk_routing, in (token, expert) order."""
    case = case._replace(tile_m=1)
    logits, r = _token_rounding(fn, case)
    tc = ref.topk_routing(logits, case.k, scoring=case.scoring, normalize=case.normalize)
    key_tc = tc.token_idx.long() * case.E + tc.expert_idx.long()
    order = torch.argsort(key_tc)
    key_r = r.token_idx.long() * case.E + r.expert_idx.long()
    expect(torch.equal(key_r, key_tc[order]), "[tile1_is_topk] with tile_m = 1 the pairs must be exactly top-k's")
    expect(torch.allclose(r.scores.double(), tc.scores.double()[order], **_score_tol(case.dtype)),
           "[tile1_is_topk] with tile_m = 1 the scores must be top-k's")


def check_tr_agrees(fn, case: RouterCase) -> None:
    """The same pairs as the reference (exactly) and the same scores (within float32 tolerance)."""
    logits, r = _token_rounding(fn, case)
    want = ref.token_rounding(logits, case.k, tile_m=case.tile_m, mode=case.mode, scoring=case.scoring, normalize=case.normalize)
    same_pairs = torch.equal(r.token_idx.long(), want.token_idx.long()) and torch.equal(r.expert_idx.long(), want.expert_idx.long())
    if not same_pairs:
        kr, kw = pair_mask(r), pair_mask(want)
        t, e = (int(v) for v in (kr != kw).nonzero()[0])
        raise AssertionError(f"[agrees_with_reference] pair (token {t}, expert {e}) must be {'kept' if kw[t, e] else 'dropped'}: "
                             "each expert ranks its token-choice picks first, then the other tokens, each group by p[t, e] "
                             "(softmax over all E experts), the lower token first on ties")
    expect(torch.allclose(r.scores.double(), want.scores.double(), **_score_tol(case.dtype)),
           "[agrees_with_reference] scores differ: a pick keeps its token-choice score, an added token gets "
           "p[t, e], its softmax over all E experts")


def check_tr_rejects_bad_input(fn, case) -> None:
    lg = torch.randn(6, 4)
    for bad in bad_router_inputs() + [
        BadInput("tile_m = 0", (lg, 2), {"tile_m": 0}, match="tile_m"),
        BadInput("an unknown mode", (lg, 2), {"mode": "banker"}, match="mode"),
        BadInput("generator is a seed, not a torch.Generator", (lg, 2), {"mode": "stochastic", "generator": 3},
                 error=TypeError, match="generator"),
    ]:
        expect_raises(fn, bad)


def token_rounding_properties() -> list[Property]:
    f32 = torch.float32
    tr = router_cases(max_T=48, max_E=8, tiles=(1, 2, 3, 4, 8, 16), modes=("nearest", "up", "down"))
    ex = (RouterCase(64, 8, 2, f32, "softmax_topk", False, False, 0, 8, "nearest"),
          RouterCase(24, 4, 1, f32, "topk_softmax", False, True, 1, 4, "up"),
          RouterCase(24, 4, 2, f32, "softmax_topk", False, False, 2, 4, "down"),
          RouterCase(0, 3, 1, f32, "softmax_topk", False, False, 3, 4, "nearest"),
          RouterCase(10, 2, 1, f32, "softmax_topk", False, True, 4, 4, "nearest"))
    return [
        Property("sorted_unique", "triples sorted by token then expert, each pair once", tr, check_tr_sorted_unique, examples=ex),
        Property("loads_are_rounded", "each expert keeps round_counts(f_e) tokens (tile multiples, exact halves down)",
                 tr, check_tr_loads, examples=ex),
        Property("picks_first", "a growing expert keeps all its picks, a shrinking one keeps only picks", tr,
                 check_tr_picks_first, examples=ex),
        Property("tile1_is_topk", "tile_m = 1 gives exactly the pairs and scores of top-k routing", tr,
                 check_tr_tile1_is_topk, examples=ex[:2]),
        Property("agrees_with_reference", "same pairs and scores as sonic_learn.reference.routing.token_rounding", tr,
                 check_tr_agrees, examples=ex),
        Property("rejects_bad_input", "bad logits, k, tile_m, mode and generator raise ValueError/TypeError naming the argument",
                 st.just(None), check_tr_rejects_bad_input, max_examples=1),
    ]


# ----------------------------------------------------------------------------------------------
# build_metadata
# ----------------------------------------------------------------------------------------------


class MetaCase(NamedTuple):
    T: int
    E: int
    pairs_per_token: int  # each token picks this many distinct experts (<= E); some experts stay empty
    seed: int


@st.composite
def meta_cases(draw) -> MetaCase:
    E = draw(st.integers(1, 10))
    return MetaCase(draw(st.integers(0, 30)), E, draw(st.integers(0, E)), draw(st.integers(0, 2**31 - 1)))


def random_routing(case: MetaCase) -> Routing:
    """A token-sorted routing: each token sends to ``pairs_per_token`` random distinct experts."""
    g = seeded(case.seed)
    experts = torch.argsort(torch.rand(case.T, case.E, generator=g), dim=1)[:, : case.pairs_per_token]  # (T, K)
    experts = experts.sort(dim=1).values
    tokens = torch.arange(case.T).repeat_interleave(case.pairs_per_token)
    return Routing(tokens.int(), experts.reshape(-1).int(), torch.rand(tokens.numel(), generator=g),
                   num_tokens=case.T, num_experts=case.E)


def check_metadata(m, r: Routing, prop: str = "invariants") -> None:
    """``m`` is the metadata of routing ``r`` (any routing, any implementation of build_metadata)."""
    E, P = r.num_experts, r.num_pairs
    expert = r.expert_idx.long().cpu()  # (P,)
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        expect(getattr(m, name).dtype == torch.int32, f"[{prop}] {name} must be int32, got {getattr(m, name).dtype}")
    counts = torch.bincount(expert, minlength=E)  # (E,)
    expect(torch.equal(m.expert_counts.long().cpu(), counts), f"[{prop}] expert_counts must be the histogram {short(counts)}, "
           f"got {short(m.expert_counts)}")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (E + 1,)
    expect(torch.equal(m.expert_offsets.long().cpu(), offsets), f"[{prop}] expert_offsets must be the exclusive prefix sum "
           f"{short(offsets)} (E + 1 entries, starting at 0), got {short(m.expert_offsets)}")
    por = m.pair_of_row.long().cpu()  # (P,)
    expect(torch.equal(por.sort().values, torch.arange(P)), f"[{prop}] pair_of_row must be a permutation of the {P} pairs")
    row_expert = expert[por]  # (P,) expert of each grouped row
    expect(torch.equal(row_expert, expert.sort(stable=True).values), f"[{prop}] rows must be grouped by expert (ascending)")
    same_expert = row_expert[1:] == row_expert[:-1]  # (P - 1,) neighbouring rows of one expert
    expect(bool((por.diff()[same_expert] > 0).all()),
           f"[{prop}] inside an expert the rows must keep pair order (a STABLE grouping)")
    rop = m.row_of_pair.long().cpu()
    expect(rop.shape == (P,) and torch.equal(rop[por], torch.arange(P)), f"[{prop}] row_of_pair must invert pair_of_row")
    expect(torch.equal(m.gather_idx.long().cpu(), r.token_idx.long().cpu()[por]),
           f"[{prop}] gather_idx[r] must be the token of pair pair_of_row[r]")
    expect(m.num_tokens == r.num_tokens and m.num_experts == E, f"[{prop}] num_tokens and num_experts must be copied from the routing")


def check_metadata_invariants(fn, case: MetaCase) -> None:
    r = random_routing(case)
    check_metadata(fn(r), r)


def check_metadata_rejects(fn, case) -> None:
    bad_expert = Routing(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32),
                         torch.ones(2), num_tokens=2, num_experts=3)
    for bad in (BadInput("a dict instead of a Routing", ({"token_idx": 0},), error=TypeError, match="routing"),
                BadInput("an expert index >= num_experts", (bad_expert,), match="expert_idx")):
        expect_raises(fn, bad)


def build_metadata_properties() -> list[Property]:
    return [
        Property("invariants", "counts, offsets, a stable grouping by expert, inverse permutation, gather index",
                 meta_cases(), check_metadata_invariants,
                 examples=(MetaCase(16, 8, 2, 0), MetaCase(0, 3, 1, 1), MetaCase(5, 6, 0, 2), MetaCase(7, 4, 4, 3))),
        Property("rejects_bad_input", "a non-Routing or an out-of-range expert raises TypeError/ValueError",
                 st.just(None), check_metadata_rejects, max_examples=1),
    ]
