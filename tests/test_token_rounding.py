"""Token rounding's rules that a hand computation can pin (reference and the fast path's CPU-runnable parts)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sonic_learn.reference import routing as ref

# Three tokens, E = 3, K = 1, tile_m = 2, mode "up". Token-choice: tokens 0 and 1 pick expert 0
# (f_0 = 2), token 2 picks expert 1 (f_1 = 1 -> rounded up to 2: one token must be added).
# The candidates for expert 1 are tokens 0 and 1:
#   softmax over ALL E (the paper's S):  token 0: 1 / (e + 1 + e^0.9)      = 0.1619
#                                        token 1: 1 / (e^1.2 + 1 + e^-10)  = 0.2315  <- the paper adds token 1
#   softmax over the token's K = 1 pick: token 0: e^(0 - 1)   = 0.3679  (a rule that would add token 0)
#                                        token 1: e^(0 - 1.2) = 0.3012
THREE_TOKENS = [[1.0, 0.0, 0.9], [1.2, 0.0, -10.0], [0.0, 2.0, 0.0]]
P_TOKEN0 = 1 / (math.e + 1 + math.exp(0.9))
P_TOKEN1 = 1 / (math.exp(1.2) + 1 + math.exp(-10.0))


@pytest.mark.parametrize("scoring,normalize", [("softmax_topk", False), ("topk_softmax", False),
                                                ("topk_softmax", True)])
def test_added_token_is_ranked_and_weighted_by_the_softmax_over_all_experts(scoring, normalize):
    assert P_TOKEN1 > P_TOKEN0 and math.exp(-1.0) > math.exp(-1.2)  # the two rules disagree here
    logits = torch.tensor(THREE_TOKENS, dtype=torch.float64)
    r = ref.token_rounding(logits, 1, tile_m=2, mode="up", scoring=scoring, normalize=normalize)
    pairs = list(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
    assert pairs == [(0, 0), (1, 0), (1, 1), (2, 1)]  # expert 1 got token 1, not token 0
    added = r.scores[pairs.index((1, 1))].item()
    assert added == pytest.approx(P_TOKEN1, rel=1e-12)  # weighted by p, not by e^-1.2
    # The picks keep their token-choice weights (K = 1: 1.0 for softmax_topk and normalize=True).
    pick_w = [r.scores[pairs.index(p)].item() for p in [(0, 0), (1, 0), (2, 1)]]
    if scoring == "softmax_topk" or normalize:
        assert pick_w == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    else:
        want = torch.softmax(logits, dim=1)[[0, 1, 2], [0, 0, 1]].tolist()
        assert pick_w == pytest.approx(want, rel=1e-12)


def test_rounding_down_drops_the_pick_of_lowest_probability():
    # Expert 0 has 3 picks, tile 2, "down" keeps 2. Under softmax_topk every pick weighs 1.0 (K = 1),
    # so only p (softmax over all E) tells them apart: token 0's p for expert 0 is the smallest
    # (ranking by those equal weights would fall to the tie rule and drop the highest token, 2).
    logits = torch.tensor([[0.5, 0.0], [3.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    r = ref.token_rounding(logits, 1, tile_m=2, mode="down")
    assert list(zip(r.token_idx.tolist(), r.expert_idx.tolist())) == [(1, 0), (2, 0)]


def test_fast_float64_selection_follows_the_same_ranking():
    """The fast path's torch-op selection (float64, runs on CPU) on the three-token example."""
    fast = pytest.importorskip("sonic_learn.fast.routing")
    logits = torch.tensor(THREE_TOKENS, dtype=torch.float64)
    experts = torch.tensor([[0], [0], [1]])
    keep = fast._boundary_keep_torch(ref._router_probabilities(logits), experts, torch.tensor([2, 1, 0]),
                                     None, "up", 2)
    assert keep.nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 1]]


# ---------------------------------------------------------------------------------------------
# The guard below the paper's condition (T*K / (E*tile_m) >= 2) and the rounding counts
# ---------------------------------------------------------------------------------------------
def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, UserWarning) and "paper's condition" in str(w.message)]


def test_warns_below_the_condition_once_per_shape():
    logits = torch.randn(77, 8, generator=torch.Generator().manual_seed(0))  # 77*2/(8*16) = 1.2 < 2
    _, first = _caught(lambda: ref.token_rounding(logits, 2, tile_m=16))
    assert len(first) == 1
    msg = str(first[0].message)
    assert "77*2/(8*16) = 1.2 < 2" in msg and ">= 2" in msg  # the measured ratio and the condition
    _, again = _caught(lambda: ref.token_rounding(logits, 2, tile_m=16, mode="up"))
    assert again == []  # same (T, E, K, tile_m): once per shape
    _, other = _caught(lambda: ref.token_rounding(logits[:76], 2, tile_m=16))
    assert len(other) == 1  # a new shape warns again


@pytest.mark.parametrize("T,E,K,tile_m", [(256, 8, 1, 16), (1000, 4, 1, 1), (0, 4, 2, 128)])
def test_no_warning_at_or_above_the_condition(T, E, K, tile_m):
    # 256*1/(8*16) = 2 exactly (the condition holds); tile_m = 1 is top-k; T = 0 routes nothing.
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(1))
    _, got = _caught(lambda: ref.token_rounding(logits, K, tile_m=tile_m))
    assert got == []


def test_layer_below_the_condition_warns_and_counts_every_dropped_token():
    """MoE(64, 32, 8, 2) on 64 tokens: every expert gets ~16 tokens, which 'nearest' rounds to 0."""
    from sonic_learn import MoE

    torch.manual_seed(0)
    layer = MoE(64, 32, 8, 2, routing="token_rounding")
    x = torch.randn(64, 64)
    out, got = _caught(lambda: layer(x))
    assert len(got) == 1 and "64*2/(8*128) = 0.125 < 2" in str(got[0].message)
    r = ref.token_rounding(x @ layer.router_w.detach(), 2, tile_m=128)  # the layer's own routing
    assert int(r.rounding.dropped_tokens) == 64 and int(r.rounding.dropped_pairs) == 128
    assert int(r.rounding.kept_pairs) == 0 == r.num_pairs and r.rounding.tokens_per_tile == 0.125
    assert bool((out == 0).all())  # what the warning announces: every token lost its experts


@pytest.mark.parametrize("seed", range(6))
def test_rounding_counts_match_a_brute_force_count(seed):
    g = torch.Generator().manual_seed(seed)
    T, E, K, tile_m = int(torch.randint(1, 60, (1,), generator=g)), 6, 2, 8
    logits = torch.randint(-2, 3, (T, E), generator=g).float() if seed % 2 else torch.randn(T, E, generator=g)
    mode = ref.ROUNDING_MODES[seed % 4]
    tc = ref.topk_routing(logits, K)
    tr = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=torch.Generator().manual_seed(seed))
    before = set(zip(tc.token_idx.tolist(), tc.expert_idx.tolist()))
    after = set(zip(tr.token_idx.tolist(), tr.expert_idx.tolist()))
    st = tr.rounding
    assert int(st.kept_pairs) == len(after) == tr.num_pairs
    assert int(st.dropped_pairs) == len(before - after)
    assert int(st.added_pairs) == len(after - before)
    assert int(st.dropped_tokens) == T - len({t for t, _ in after})
    assert st.tokens_per_tile == pytest.approx(T * K / (E * tile_m))


@pytest.mark.parametrize("T,E,K,tile_m", [(1, 8, 2, 128), (37, 4, 1, 16), (300, 16, 2, 8), (64, 64, 8, 3)])
def test_max_pairs_bounds_every_mode(T, E, K, tile_m):
    bound = ref.max_pairs(T, E, K, tile_m)
    assert T * K <= bound <= E * T
    for seed in range(4):
        logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 3
        r = ref.token_rounding(logits, K, tile_m=tile_m, mode="up")
        assert r.num_pairs <= bound
    # Tight for the worst case: every expert gets one pick, so every one rounds up by tile_m - 1.
    if T * K >= E and tile_m <= T:
        assert ref.max_pairs(T, E, K, tile_m) >= min(E * tile_m, E * T)


# ---------------------------------------------------------------------------------------------
# GPU: the sync-free (padded) fast token rounding gives the reference's triples and counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,E,K,tile_m,mode", [(700, 16, 4, 128, "nearest"), (300, 8, 2, 16, "up"),
                                               (513, 32, 8, 64, "down"), (257, 64, 2, 8, "stochastic"),
                                               (64, 8, 2, 128, "nearest"), (1, 8, 1, 128, "up")])
def test_fast_padded_token_rounding_equals_the_reference(T, E, K, tile_m, mode):
    fast = pytest.importorskip("sonic_learn.fast.routing")
    g = torch.Generator().manual_seed(T)
    logits = (torch.randn(T, E, generator=g) * 2).cuda()
    gen = lambda: torch.Generator(device="cuda").manual_seed(5)  # noqa: E731
    want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=gen())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the padded call must not synchronize
    try:
        got = fast.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=gen(), check_finite=False,
                                  pad_to_bound=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bound, P = ref.max_pairs(T, E, K, tile_m), want.num_pairs
    assert got.num_pairs == bound >= P and int(got.rounding.kept_pairs) == P
    assert torch.equal(got.token_idx[:P], want.token_idx) and torch.equal(got.expert_idx[:P], want.expert_idx)
    assert torch.equal(got.scores[:P], want.scores)
    assert bool((got.token_idx[P:] == T).all() and (got.expert_idx[P:] == E).all() and (got.scores[P:] == 0).all())
    for name in ("kept_pairs", "dropped_pairs", "added_pairs", "dropped_tokens"):
        assert int(getattr(got.rounding, name)) == int(getattr(want.rounding, name)), name
    # The padded metadata: true P in expert_offsets[E], padding rows <-> padding pairs.
    meta = fast.build_metadata(got, check_ids=False, padded=True)
    exact = ref.build_metadata(want)
    assert torch.equal(meta.expert_offsets, exact.expert_offsets)
    for name in ("gather_idx", "pair_of_row", "row_of_pair"):
        assert torch.equal(getattr(meta, name)[:P], getattr(exact, name)), name
    tail = torch.arange(P, bound, device="cuda", dtype=torch.int32)
    assert torch.equal(meta.pair_of_row[P:], tail) and torch.equal(meta.row_of_pair[P:], tail)
    assert bool((meta.gather_idx[P:] == 0).all())
