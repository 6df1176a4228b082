"""Property tests for sonic_learn.reference.routing: token-choice top-k vs token rounding (TR).

What is checked (paper Section 5, Algorithm 4; our notes sonicmoe.md §1.3-1.4 and §5):

- ``topk_routing`` against a float64 oracle (stable sort, lower expert first on ties).
- ``round_counts`` against a plain-Python oracle of every mode, including exact halves, the cap
  at T and the documented stochastic draw (E float64 uniforms, up iff u * tile_m < remainder).
- ``token_rounding`` invariants: counts are multiples of tile_m (or T, the documented cap),
  |rounded - f_e| < tile_m, down ⊆ token-choice ⊆ up per expert, the kept tokens are the
  best-ranked ones (picks first by score, then the best non-picks), tile_m = 1 is top-k exactly,
  token-sorted unique triples, seeded stochastic reproducibility, differentiable scores.
- ``build_metadata``: a valid pair of inverse permutations for both routers.
- Bad input of every class raises a clear error.

Shapes and seeds are drawn; logits are materialized from a seeded torch.Generator. Edge counts
(0, 1, tile-1, tile, tile+1, exact halves) are forced by biasing one expert's column.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from sonic_learn.properties.routing import check_metadata, expected_rounding
from sonic_learn.properties.topk import oracle_indices
from sonic_learn.reference.routing import (
    ROUNDING_MODES,
    Routing,
    build_metadata,
    round_counts,
    token_rounding,
    topk_routing,
)

SCORING_CONFIGS = [("softmax_topk", False), ("topk_softmax", False), ("topk_softmax", True)]
BIG = 30.0  # a logit offset that decides top-k membership regardless of the random part


# ---------------------------------------------------------------------------------------------
# Drawing cases
# ---------------------------------------------------------------------------------------------
class Case(NamedTuple):
    T: int
    E: int
    K: int
    tile_m: int
    seed: int
    dtype: torch.dtype = torch.float32
    ties: bool = False  # logits from a small integer set: many exact ties
    forced: int | None = None  # force expert 0's token-choice count to this value (needs E > K)
    scoring: str = "softmax_topk"
    normalize: bool = False


def make_logits(c: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(c.seed)
    if c.ties:
        logits = torch.randint(-2, 3, (c.T, c.E), generator=g).double()  # (T, E)
    else:
        logits = torch.randn(c.T, c.E, generator=g, dtype=torch.float64)  # (T, E)
    if c.forced is not None:
        # Expert 0 is top-1 for exactly `forced` tokens and last for all others; with E >= K + 2,
        # expert E-1 is last for every token (count 0), so the others still fill every top-k.
        chosen = torch.randperm(c.T, generator=g)[: c.forced]
        logits[:, 0] -= BIG
        logits[chosen, 0] += 2 * BIG
        if c.E >= c.K + 2:
            logits[:, c.E - 1] -= 2 * BIG
    return logits.to(c.dtype)


@st.composite
def cases(draw, max_T: int = 300, max_E: int = 64, scoring: bool = True) -> Case:
    E = draw(st.integers(1, max_E))
    K = draw(st.integers(1, E))
    tile_m = draw(st.integers(1, 160))
    T = draw(st.integers(0, max_T))
    forced = None
    if E > K and T > 0:
        edge = {0, 1, tile_m - 1, tile_m, tile_m + 1, tile_m // 2, tile_m + tile_m // 2, 2 * tile_m - 1}
        forced = draw(st.none() | st.sampled_from(sorted(c for c in edge if 0 <= c <= T)))
    scoring_name, normalize = draw(st.sampled_from(SCORING_CONFIGS)) if scoring else SCORING_CONFIGS[0]
    return Case(
        T=T,
        E=E,
        K=K,
        tile_m=tile_m,
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
        ties=draw(st.booleans()),
        forced=forced,
        scoring=scoring_name,
        normalize=normalize,
    )


REALISTIC = [
    Case(T=1024, E=64, K=8, tile_m=128, seed=0),  # the paper's T_e = 128 = tile_m regime
    Case(T=512, E=8, K=2, tile_m=32, seed=1, forced=48),  # forced exact half: 48 = 32 + 16
    Case(T=300, E=16, K=2, tile_m=128, seed=2, scoring="topk_softmax", normalize=True),
    Case(T=100, E=4, K=1, tile_m=128, seed=3, forced=70),  # ceil(70) = 128 > T: the cap
]


# ---------------------------------------------------------------------------------------------
# Oracles and shared assertions
# ---------------------------------------------------------------------------------------------
def oracle_scores_all(logits: torch.Tensor, picks: torch.Tensor, scoring: str, normalize: bool) -> torch.Tensor:
    """float64 s[t, e] = exp(logit[t, e]) / Z_t, Z_t over the K picks or over all E experts."""
    x = logits.double()  # (T, E)
    if scoring == "topk_softmax" and not normalize:
        log_z = torch.logsumexp(x, dim=1, keepdim=True)  # (T, 1)
    else:
        log_z = torch.logsumexp(x.gather(1, picks), dim=1, keepdim=True)  # (T, 1)
    return torch.exp(x - log_z)  # (T, E)


def pairs_by_expert(routing: Routing) -> dict[int, dict[int, float]]:
    """expert -> {token: score}."""
    out: dict[int, dict[int, float]] = {e: {} for e in range(routing.num_experts)}
    for t, e, s in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.scores.tolist()):
        assert t not in out[e], f"pair (token {t}, expert {e}) appears twice"
        out[e][t] = s
    return out


def assert_valid_metadata(routing: Routing) -> None:
    """build_metadata's result is the metadata of ``routing`` (counts, offsets, stable grouping, inverses)."""
    check_metadata(build_metadata(routing), routing)


def assert_token_sorted_unique(routing: Routing) -> None:
    assert routing.token_idx.dtype == torch.int32 and routing.expert_idx.dtype == torch.int32
    key = routing.token_idx.long() * routing.num_experts + routing.expert_idx.long()  # (P,)
    assert bool((key[1:] > key[:-1]).all()), "triples must be sorted by token, then expert, without repeats"


def canonical(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triples sorted by (token, expert)."""
    key = routing.token_idx.long() * routing.num_experts + routing.expert_idx.long()
    order = torch.argsort(key)
    return routing.token_idx[order], routing.expert_idx[order], routing.scores[order]


# ---------------------------------------------------------------------------------------------
# topk_routing
# ---------------------------------------------------------------------------------------------
@given(c=cases())
@example(c=REALISTIC[0])
@example(c=REALISTIC[2])
def test_topk_routing_matches_float64_oracle(c: Case) -> None:
    note(repr(c))
    logits = make_logits(c)
    r = topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)

    want_dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
    assert r.scores.dtype == want_dtype and r.num_tokens == c.T and r.num_experts == c.E
    assert torch.equal(r.token_idx, torch.arange(c.T, dtype=torch.int32).repeat_interleave(c.K))
    # Experts: descending logit, the lower expert first on ties (a stable descending sort).
    picks = oracle_indices(logits, c.K)  # (T, K) the shared top-k oracle (float64 stable sort)
    assert torch.equal(r.expert_idx.long(), picks.reshape(-1))
    want = oracle_scores_all(logits, picks, c.scoring, c.normalize).gather(1, picks)  # (T, K)
    if c.scoring == "topk_softmax" and c.normalize:
        want = want / want.sum(1, keepdim=True)
    tol = 1e-12 if want_dtype == torch.float64 else 2e-6
    torch.testing.assert_close(r.scores.double(), want.reshape(-1), rtol=tol, atol=tol)
    assert_valid_metadata(r)


# ---------------------------------------------------------------------------------------------
# round_counts
# ---------------------------------------------------------------------------------------------
@given(
    counts=st.lists(st.integers(0, 700), min_size=0, max_size=40),
    tile_m=st.integers(1, 160),
    mode=st.sampled_from(ROUNDING_MODES),
    cap=st.none() | st.integers(0, 100),
    seed=st.integers(0, 2**31 - 1),
)
@example(counts=[0, 1, 63, 64, 65, 32, 96, 128, 127, 129], tile_m=64, mode="nearest", cap=None, seed=0)
def test_round_counts_matches_integer_oracle(counts, tile_m, mode, cap, seed) -> None:
    T = None if cap is None else (max(counts, default=0) + cap)  # num_tokens >= every count
    f = torch.tensor(counts, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    out = round_counts(f, tile_m, mode, g, num_tokens=T)
    assert out.dtype == f.dtype and out.shape == f.shape

    # The documented stochastic draw: exactly E float64 uniforms from the generator.
    u = torch.rand(len(counts), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    want = [expected_rounding(fe, tile_m, mode, T, u[i]) for i, fe in enumerate(counts)]
    assert out.tolist() == want
    for fe, r in zip(counts, out.tolist()):
        assert abs(r - fe) < tile_m
        assert r % tile_m == 0 or r == T


def test_nearest_rounds_exact_halves_down() -> None:
    f = torch.tensor([4, 12, 5, 3, 13, 8, 0])
    assert round_counts(f, 8, "nearest").tolist() == [0, 8, 8, 0, 16, 8, 0]
    # int32 counts stay int32; the cap at num_tokens applies after rounding.
    f32 = torch.tensor([5, 13], dtype=torch.int32)
    out = round_counts(f32, 8, "up", num_tokens=14)
    assert out.dtype == torch.int32 and out.tolist() == [8, 14]


# ---------------------------------------------------------------------------------------------
# token_rounding
# ---------------------------------------------------------------------------------------------
@given(c=cases(), mode=st.sampled_from(ROUNDING_MODES))
@example(c=REALISTIC[0], mode="nearest")
@example(c=REALISTIC[0], mode="up")
@example(c=REALISTIC[1], mode="nearest")
@example(c=REALISTIC[1], mode="down")
@example(c=REALISTIC[2], mode="stochastic")
@example(c=REALISTIC[3], mode="up")
@example(c=REALISTIC[3], mode="nearest")
def test_token_rounding_invariants(c: Case, mode: str) -> None:
    note(repr(c))
    logits = make_logits(c)
    tc = topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)
    gen = torch.Generator().manual_seed(c.seed)
    tr = token_rounding(
        logits, c.K, tile_m=c.tile_m, mode=mode, generator=gen, scoring=c.scoring, normalize=c.normalize
    )
    T, E, m = c.T, c.E, c.tile_m
    assert tr.num_tokens == T and tr.num_experts == E and tr.scores.dtype == tc.scores.dtype
    assert_token_sorted_unique(tr)
    assert_valid_metadata(tr)

    tc_by_e, tr_by_e = pairs_by_expert(tc), pairs_by_expert(tr)
    f = [len(tc_by_e[e]) for e in range(E)]
    if c.forced is not None:
        assert f[0] == c.forced  # the construction really produced the edge count
        if E >= c.K + 2:
            assert f[E - 1] == 0

    # Counts: the documented rule, checked against the integer oracle (stochastic: floor or ceil).
    u = torch.rand(E, generator=torch.Generator().manual_seed(c.seed), dtype=torch.float64).tolist()
    for e in range(E):
        r = len(tr_by_e[e])
        assert r == expected_rounding(f[e], m, mode, T, u[e]), f"expert {e}: f_e={f[e]} rounded to {r}"
        assert r % m == 0 or r == T  # a multiple of tile_m, or every token (the cap)
        assert abs(r - f[e]) < m

    # Algorithm 4 ranks by p = the softmax over all E experts, whatever the scoring rule.
    s64 = torch.softmax(logits.double(), dim=1)  # (T, E) float64 oracle of p
    tol = 1e-12 if tr.scores.dtype == torch.float64 else 2e-6
    for e in range(E):
        tc_e, tr_e = tc_by_e[e], tr_by_e[e]
        if len(tr_e) <= len(tc_e):
            # Rounded down: e keeps its picks of highest p (up to float rounding of near-equal p).
            kept = torch.sort(s64[sorted(tr_e), e], descending=True).values
            best = torch.sort(s64[sorted(tc_e), e], descending=True).values[: len(tr_e)]
            torch.testing.assert_close(kept, best, rtol=1e-5, atol=1e-30)
        else:
            # Rounded up: every pick stays; the added tokens are the best non-picks (up to float
            # rounding of near-equal scores, so compare their oracle scores, not their ids).
            assert set(tc_e) <= set(tr_e), f"expert {e} dropped a pick while rounding up"
            added = sorted(set(tr_e) - set(tc_e))
            others = torch.tensor([t for t in range(T) if t not in tc_e], dtype=torch.long)
            best = torch.sort(s64[others, e], descending=True).values[: len(added)]
            got = torch.sort(s64[added, e], descending=True).values
            torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-30)
            # An added pair's score is p[t, e], the token's softmax over all E experts.
            got_scores = torch.tensor([tr_e[t] for t in added], dtype=torch.float64)
            torch.testing.assert_close(got_scores, s64[added, e], rtol=tol, atol=tol)
        for t in set(tc_e) & set(tr_e):  # a pick keeps its token-choice score bit for bit
            assert tr_e[t] == tc_e[t]

    if mode == "down":
        assert all(set(tr_by_e[e]) <= set(tc_by_e[e]) for e in range(E))
    if mode == "up":
        assert all(set(tc_by_e[e]) <= set(tr_by_e[e]) for e in range(E))


@given(c=cases(), mode=st.sampled_from(ROUNDING_MODES))
@example(c=REALISTIC[0], mode="nearest")
def test_tile_m_1_reproduces_topk_routing(c: Case, mode: str) -> None:
    logits = make_logits(c)
    tc = topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)
    tr = token_rounding(logits, c.K, tile_m=1, mode=mode, scoring=c.scoring, normalize=c.normalize)
    for want, got in zip(canonical(tc), canonical(tr)):
        assert want.dtype == got.dtype and torch.equal(want, got)  # same triples, same score bits
    assert torch.equal(tr.token_idx, canonical(tr)[0])  # token_rounding's order is (token, expert)
    # Grouped by expert (stable), both list every expert's tokens in ascending order.
    mc, mr = build_metadata(tc), build_metadata(tr)
    assert torch.equal(mc.expert_offsets, mr.expert_offsets)
    assert torch.equal(mc.gather_idx, mr.gather_idx)


@given(c=cases(max_T=200), mode=st.sampled_from(["down", "up"]))
def test_down_subset_topk_subset_up(c: Case, mode: str) -> None:
    logits = make_logits(c)
    kw = dict(tile_m=c.tile_m, scoring=c.scoring, normalize=c.normalize)

    def pair_set(r: Routing) -> set[tuple[int, int]]:
        return set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))

    down, up = token_rounding(logits, c.K, mode="down", **kw), token_rounding(logits, c.K, mode="up", **kw)
    tc = pair_set(topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize))
    assert pair_set(down) <= tc <= pair_set(up)
    for r in (down, up, token_rounding(logits, c.K, mode="nearest", **kw)):
        assert pair_set(down) <= pair_set(r) <= pair_set(up)


@given(c=cases(max_T=200), other_seed=st.integers(0, 2**31 - 1))
def test_stochastic_is_reproducible_with_a_seeded_generator(c: Case, other_seed: int) -> None:
    logits = make_logits(c)
    kw = dict(tile_m=c.tile_m, mode="stochastic", scoring=c.scoring, normalize=c.normalize)
    a = token_rounding(logits, c.K, generator=torch.Generator().manual_seed(other_seed), **kw)
    b = token_rounding(logits, c.K, generator=torch.Generator().manual_seed(other_seed), **kw)
    for name in ("token_idx", "expert_idx", "scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The generator (not the global RNG) drives it: reseeding the global RNG changes nothing.
    torch.manual_seed(other_seed + 1)
    c2 = token_rounding(logits, c.K, generator=torch.Generator().manual_seed(other_seed), **kw)
    assert torch.equal(a.expert_idx, c2.expert_idx) and torch.equal(a.token_idx, c2.token_idx)


def test_stochastic_rounds_up_with_probability_remainder_over_tile() -> None:
    # f = 3 with tile 4: up (to 4) iff u * 4 < 3. Over 64 fixed seeds the count of "up" equals the
    # count of uniforms below 3/4 exactly: deterministic, not a statistical test.
    logits = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 5)  # (8, 2): f = (3, 5)
    ups = 0
    for seed in range(64):
        r = token_rounding(logits, 1, tile_m=4, mode="stochastic", generator=torch.Generator().manual_seed(seed))
        n0 = int((r.expert_idx == 0).sum())
        u0 = float(torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0])
        assert n0 == (4 if u0 * 4 < 3 else 0)
        ups += n0 == 4
    assert 0 < ups < 64  # both outcomes occur


def test_nearest_exact_half_drops_the_partial_tile() -> None:
    # Expert 0 is picked by exactly 64 of 300 tokens; tile 128: 64 is an exact half -> rounded to 0.
    c = Case(T=300, E=6, K=2, tile_m=128, seed=7, forced=64)
    logits = make_logits(c)
    tr = token_rounding(logits, 2, tile_m=128, mode="nearest")
    assert int((topk_routing(logits, 2).expert_idx == 0).sum()) == 64
    assert int((tr.expert_idx == 0).sum()) == 0
    c65 = c._replace(forced=65)  # one more than half -> a full tile of 128
    tr65 = token_rounding(make_logits(c65), 2, tile_m=128, mode="nearest")
    assert int((tr65.expert_idx == 0).sum()) == 128


def test_ranking_ties_go_to_the_lower_token() -> None:
    # All logits equal: top-1 picks expert 0 for every token (lower expert on ties), so expert 1
    # has f = 0 and 'down' of expert 0 (f = 5, tile 4) keeps tokens 0..3 (lower token on ties).
    logits = torch.zeros(5, 2)
    down = token_rounding(logits, 1, tile_m=4, mode="down")
    assert down.token_idx.tolist() == [0, 1, 2, 3] and down.expert_idx.tolist() == [0, 0, 0, 0]
    # 'up' of expert 0 (5 -> 8) is capped at T = 5; expert 1 stays at 0.
    up = token_rounding(logits, 1, tile_m=4, mode="up")
    assert up.token_idx.tolist() == [0, 1, 2, 3, 4] and up.expert_idx.tolist() == [0] * 5
    # 'up' with a second expert: expert 1 (f = 1 -> 4) adds the tied non-picks 0, 1, 2 (lower first).
    logits = torch.tensor([[0.0, 0.0]] * 5 + [[0.0, 1.0]])  # (6, 2): token 5 picks expert 1
    up = token_rounding(logits, 1, tile_m=4, mode="up")
    e1 = sorted(t for t, e in zip(up.token_idx.tolist(), up.expert_idx.tolist()) if e == 1)
    assert e1 == [0, 1, 2, 5]


def test_scores_are_differentiable() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()  # (8, 3)
    for scoring, normalize in SCORING_CONFIGS:
        tr = token_rounding(logits, 2, tile_m=4, mode="up", scoring=scoring, normalize=normalize)
        assert tr.num_pairs > 16  # rounding up added pairs, whose scores must be differentiable too

        def scores_of(x: torch.Tensor, scoring=scoring, normalize=normalize) -> torch.Tensor:
            return token_rounding(x, 2, tile_m=4, mode="up", scoring=scoring, normalize=normalize).scores

        assert torch.autograd.gradcheck(scores_of, (logits,))
    w = torch.randn(16, generator=g, dtype=torch.float64)
    (topk_routing(logits, 2).scores * w).sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


@pytest.mark.parametrize("mode", ROUNDING_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_tokens(mode: str, dtype: torch.dtype) -> None:
    logits = torch.zeros(0, 8, dtype=dtype)
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for r in (topk_routing(logits, 2), token_rounding(logits, 2, tile_m=4, mode=mode)):
        assert r.num_pairs == 0 and r.num_tokens == 0 and r.num_experts == 8
        assert r.token_idx.dtype == torch.int32 and r.expert_idx.dtype == torch.int32
        assert r.scores.dtype == score_dtype
        meta = build_metadata(r)
        assert meta.expert_counts.tolist() == [0] * 8 and meta.expert_offsets.tolist() == [0] * 9
        assert meta.num_rows == 0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
GOOD = torch.zeros(4, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(logits=[[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.zeros(4)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.zeros(2, 3, 4)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.zeros(4, 4, dtype=torch.int64)), TypeError, "logits must have dtype in"),
        (dict(logits=torch.zeros(3, 0)), ValueError, "at least one expert"),
        (dict(logits=torch.tensor([[0.0, float("nan")]])), ValueError, "logits must not contain NaN"),
        (dict(logits=torch.tensor([[0.0, float("inf")]])), ValueError, "logits must be finite"),
        (dict(k=0), ValueError, r"k must satisfy 1 <= k <= 4"),
        (dict(k=5), ValueError, r"k must satisfy 1 <= k <= 4"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(scoring="softmax"), ValueError, "scoring must be one of"),
        (dict(normalize=1), TypeError, "normalize must be a bool"),
    ],
)
@pytest.mark.parametrize("router", ["topk_routing", "token_rounding"])
def test_bad_router_input(router, kwargs, exc, match) -> None:
    args = dict(logits=GOOD, k=2) | kwargs
    fn = topk_routing if router == "topk_routing" else token_rounding
    with pytest.raises(exc, match=match):
        fn(args.pop("logits"), args.pop("k"), **args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tile_m=0), ValueError, "tile_m must satisfy 1 <= tile_m"),
        (dict(tile_m=128.0), TypeError, "tile_m must be an int"),
        (dict(mode="round"), ValueError, "mode must be one of"),
        (dict(generator=5), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_token_rounding_input(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        token_rounding(GOOD, 2, **kwargs)


@pytest.mark.gpu
def test_generator_on_another_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="generator must live on the device of the logits"):
        token_rounding(GOOD.cuda(), 2, mode="stochastic", generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (([1, 2], 4), {}, TypeError, "counts must be a torch.Tensor"),
        ((torch.zeros(2, 2, dtype=torch.long), 4), {}, ValueError, "counts must be 1-D"),
        ((torch.zeros(3), 4), {}, TypeError, "counts must have dtype in"),
        ((torch.tensor([1, -1]), 4), {}, ValueError, "counts must be >= 0"),
        ((torch.tensor([1, 9]), 4), dict(num_tokens=8), ValueError, "counts must be <= num_tokens = 8"),
        ((torch.tensor([1]), 0), {}, ValueError, "tile_m must satisfy 1 <= tile_m"),
        ((torch.tensor([1]), 4, "ceil"), {}, ValueError, "mode must be one of"),
        ((torch.tensor([1]), 4), dict(num_tokens=-1), ValueError, "num_tokens must satisfy 0 <= num_tokens"),
    ],
)
def test_bad_round_counts_input(args, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        round_counts(*args, **kwargs)


def _routing(**over) -> Routing:
    base = dict(
        token_idx=torch.tensor([0, 0, 1], dtype=torch.int32),
        expert_idx=torch.tensor([0, 2, 1], dtype=torch.int32),
        scores=torch.ones(3),
        num_tokens=2,
        num_experts=3,
    )
    return Routing(**(base | over))


@pytest.mark.parametrize(
    "routing, exc, match",
    [
        ("not a routing", TypeError, "routing must be a sonic_learn.reference.routing.Routing"),
        (_routing(expert_idx=torch.tensor([0, 3, 1], dtype=torch.int32)), ValueError, r"expert_idx must lie in \[0, 3\)"),
        (_routing(token_idx=torch.tensor([0, 0, 2], dtype=torch.int32)), ValueError, r"token_idx must lie in \[0, 2\)"),
        (_routing(expert_idx=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "expert_idx must have P = 3"),
        (_routing(scores=torch.ones(2)), ValueError, "scores must have P = 3"),
        (_routing(token_idx=torch.tensor([0.0, 0.0, 1.0])), TypeError, "token_idx must have dtype in"),
        (_routing(num_experts=0), ValueError, "num_experts must satisfy 1 <= "),
    ],
)
def test_bad_build_metadata_input(routing, exc, match) -> None:
    with pytest.raises(exc, match=match):
        build_metadata(routing)
