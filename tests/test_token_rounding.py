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
    keep = fast._boundary_keep_torch(ref.router_probabilities(logits), experts, torch.tensor([2, 1, 0]),
                                     None, "up", 2)
    assert keep.nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 1]]


# ---------------------------------------------------------------------------------------------
# The guard below the paper's condition (T*K / (E*tile_m) >= 2) and the rounding counts
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warning_registry(monkeypatch):
    """An empty registry of the shapes already warned about (it is process-wide, once per shape): a
    shape another test drew earlier in the run must not silence the warning these tests expect."""
    monkeypatch.setattr(ref, "_warned_shapes", set())


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, UserWarning) and "paper's condition" in str(w.message)]


def test_warns_below_the_condition_once_per_shape(fresh_warning_registry):
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


def test_layer_below_the_condition_warns_and_counts_every_dropped_token(fresh_warning_registry):
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


# ---------------------------------------------------------------------------------------------
# The padded (sync-free) layout, on the CPU: the reference's pad_to_bound and the fast layer's
# autograd Functions on padded metadata, with every row past the true P poisoned
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,K,tile_m,mode", [(37, 4, 2, 8, "nearest"), (20, 6, 3, 4, "up"), (50, 5, 1, 16, "down"),
                                               (9, 4, 2, 128, "nearest"), (0, 3, 1, 4, "up")])
def test_reference_pad_to_bound_is_the_routing_plus_padding(T, E, K, tile_m, mode):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + E), dtype=torch.float64)
    want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode)
    got = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, pad_to_bound=True)
    bound, P = ref.max_pairs(T, E, K, tile_m), want.num_pairs
    assert got.num_pairs == bound and int(got.rounding.kept_pairs) == P
    assert torch.equal(got.token_idx[:P], want.token_idx) and torch.equal(got.expert_idx[:P], want.expert_idx)
    assert torch.equal(got.scores[:P], want.scores)
    assert got.token_idx[P:].eq(T).all() and got.expert_idx[P:].eq(E).all() and got.scores[P:].eq(0).all()
    meta, exact = ref.build_padded_metadata(got), ref.build_metadata(want)
    assert torch.equal(meta.expert_offsets, exact.expert_offsets)
    tail = torch.arange(P, bound, dtype=torch.int32)
    assert torch.equal(meta.pair_of_row, torch.cat([exact.pair_of_row, tail]))
    assert torch.equal(meta.row_of_pair, torch.cat([exact.row_of_pair, tail]))
    assert torch.equal(meta.gather_idx, torch.cat([exact.gather_idx, torch.zeros_like(tail)]))


def _poisoned(ops, P: int):
    """Torch stand-ins of the fast kernels that behave like them on a padded routing: a GEMM reads
    the true P from expert_offsets and computes rows < P only; every row it does not compute (and
    every row past P of an elementwise kernel's output) is NaN, like uninitialized memory."""
    import dataclasses

    def pad(t):
        if not torch.is_tensor(t) or t.shape[0] != P:
            return t
        rest = torch.full((bound - P, *t.shape[1:]), float("nan"), dtype=t.dtype)
        return torch.cat([t, rest])

    def cut(meta):
        return dataclasses.replace(meta, gather_idx=meta.gather_idx[:P], pair_of_row=meta.pair_of_row[:P],
                                   row_of_pair=meta.row_of_pair[:P])

    def poison(t):
        if torch.is_tensor(t) and t.shape[0] == bound and t.is_floating_point():
            t = t.clone()
            t[P:] = float("nan")
        return t

    def each(out, f):
        return tuple(f(o) for o in out) if isinstance(out, tuple) else f(out)

    bound = None

    def rows_gemm(fn, cut_a):
        def run(a, w, meta, *rest, **role):
            nonlocal bound
            bound = meta.gather_idx.numel()
            return each(fn(a[:P] if cut_a else a, w, cut(meta), *rest, **role), pad)
        return run

    def dh(dout, w2, meta, h, row_scores):
        return each(ops.dh_gemm(dout, w2, cut(meta), h[:P], row_scores[:P]), pad)

    def varlen_k(a, b, meta, gather_a, *rest):
        return ops.varlen_k_gemm(a if gather_a else a[:P], b[:P], cut(meta), gather_a, *rest)

    return dataclasses.replace(
        ops, gather_gemm=rows_gemm(ops.gather_gemm, False), gather_gemm_swiglu=rows_gemm(ops.gather_gemm_swiglu, False),
        grouped_gemm=rows_gemm(ops.grouped_gemm, True), dh_gemm=dh, varlen_k_gemm=varlen_k,
        swiglu=lambda h: poison(ops.swiglu(h)), swiglu_backward=lambda h, da: each(ops.swiglu_backward(h, da), poison),
        # the gather-and-sum reads the pairs token_offsets[t] : token_offsets[t + 1] of each token only
        gather_sum=lambda rows, w, row_of_pair, offs: ops.gather_sum(
            rows, None if w is None else w[: int(offs[-1])], row_of_pair[: int(offs[-1])], offs))


@pytest.mark.parametrize("backward", ["reduced_memory", "standard"])
@pytest.mark.parametrize("T,E,K,tile_m", [(37, 4, 2, 8), (23, 6, 3, 16), (5, 4, 2, 128)])
def test_fast_experts_never_read_past_the_true_pair_count(backward, T, E, K, tile_m):
    """The fast layer's autograd Functions (kernels replaced by torch stand-ins) on the padded routing
    and metadata, with the rows past P poisoned, give the reference layer's output and gradients."""
    fast_moe = pytest.importorskip("sonic_learn.fast.moe")
    compile_tests = pytest.importorskip("tests.test_fast_moe_compile")
    from sonic_learn.reference import moe as ref_moe

    g = torch.Generator().manual_seed(T * E)
    d, n = 8, 8
    x, router_w = torch.randn(T, d, generator=g, dtype=torch.float64), torch.randn(d, E, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, d, 2 * n, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(E, n, d, generator=g, dtype=torch.float64) / n**0.5
    leaves = [t.requires_grad_(True) for t in (x, router_w, w1, w2)]
    r = ref.token_rounding(leaves[0] @ leaves[1], K, tile_m=tile_m, pad_to_bound=True)
    meta = ref.build_padded_metadata(r)
    assert meta.num_rows > int(meta.expert_offsets[-1]) or T * K == 0  # there is padding to poison
    token_offsets = fast_moe._token_offsets(r.token_idx, T, None)
    dr = fast_moe.DeviceRouting(meta, r.scores, token_offsets, rounding=r.rounding)
    ops = _poisoned(compile_tests.TORCH_OPS, int(meta.expert_offsets[-1]))
    out = fast_moe.run_experts(leaves[0], leaves[2], leaves[3], dr, backward, ops)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    want = ref_moe.moe_forward(*ref_leaves, K, routing="token_rounding", tile_m=tile_m, backward=backward)
    gout = torch.randn(T, d, generator=g, dtype=torch.float64)
    (out * gout).sum().backward()
    (want * gout).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("x", "router_w", "w1", "w2"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")
