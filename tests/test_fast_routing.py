"""The fast routing (CuTe-DSL metadata kernels, boundary-only token rounding) equals the reference.

* GPU tests (marker ``gpu``): Hypothesis draws T (0..100k), E (1..512), K, tile_m, the rounding
  mode, the scoring rule, the logits dtype and a seed; the logits force ties (a 5-value set) and
  edge counts (expert 0's token-choice count forced to 0, 1, tile-1, tile, tile+1 or an exact
  half). Every integer output must equal ``sonic_learn.reference.routing`` exactly, scores bit
  for bit (same formulas on the same indices), the kernels must be deterministic run to run, and
  the reference's invariants of token rounding must hold. Token rounding is checked both with its
  two CuTe kernels and with the torch-op selection (the float64 path and the benchmark baseline).
* CPU tests: the sync-free rounding rule equals the reference's ``round_counts`` (all modes, the
  stochastic draw with the same seed); a step-by-step CPU model of the token-rounding kernels
  (key words with the pick bit, int64 rounding rule, four radix passes, the tie rule by rank)
  and the float64 torch path give the reference's routing; bad input of every class is rejected
  before any launch.

Run on a Hopper GPU with ``HYPOTHESIS_PROFILE=gpu pytest -q tests/test_fast_routing.py``. Kernels are
compiled once per expert bucket (a power of two >= E), so the drawn E come from a small set.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import assume, example, given, note
from hypothesis import strategies as st

from sonic_learn.fast._cute import cutlass_available  # pins sm_90a before cutlass loads

_ok, _why = cutlass_available()
if not _ok:
    pytest.skip(_why, allow_module_level=True)

from sonic_learn.fast import routing as fast  # noqa: E402
from sonic_learn.properties.routing import pair_mask  # noqa: E402
from sonic_learn.reference import routing as ref  # noqa: E402

E_CHOICES = [1, 3, 8, 64, 128, 200, 512]  # non-multiples of 8 take the reference top-k inside
K_CHOICES = [1, 2, 4, 8]
TILE_CHOICES = [1, 2, 16, 64, 128]
SCORING_CONFIGS = [("softmax_topk", False), ("topk_softmax", False), ("topk_softmax", True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MAX_TE = 1 << 23  # keeps a drawn (T, E) reference ranking (two full sorts) under a second


# ---------------------------------------------------------------------------------------------
# Cases and data
# ---------------------------------------------------------------------------------------------
class Case(NamedTuple):
    T: int
    E: int
    K: int
    tile_m: int
    seed: int
    dtype: torch.dtype = torch.float32
    ties: bool = False
    forced: int | None = None  # expert 0's token-choice count (needs E > K)
    scoring: str = "softmax_topk"
    normalize: bool = False


def make_logits(c: Case) -> torch.Tensor:
    """(T, E) CUDA logits from a seeded generator; ``ties`` draws from {-2..2} (many exact ties)."""
    g = torch.Generator(device="cuda").manual_seed(c.seed)
    if c.ties:
        x = torch.randint(-2, 3, (c.T, c.E), generator=g, device="cuda").float()  # (T, E)
    else:
        x = torch.randn(c.T, c.E, generator=g, device="cuda") * 2  # (T, E)
    if c.forced is not None and c.E > c.K:
        # exactly `forced` tokens (the first ones) pick expert 0; the others never do
        x[:, 0] = -100.0
        x[: c.forced, 0] = 100.0
    return x.to(c.dtype)


@st.composite
def cases(draw, max_T: int = 100_000) -> Case:
    E = draw(st.sampled_from(E_CHOICES))
    K = draw(st.sampled_from([k for k in K_CHOICES if k <= E]))
    tile_m = draw(st.sampled_from(TILE_CHOICES))
    T = draw(st.integers(0, min(max_T, MAX_TE // E)))
    forced = None
    if E > K and T > 0 and draw(st.booleans()):
        forced = min(T, draw(st.sampled_from([0, 1, tile_m - 1, tile_m, tile_m + 1, tile_m // 2, 3 * tile_m // 2])))
        forced = max(forced, 0)
    scoring, normalize = draw(st.sampled_from(SCORING_CONFIGS))
    return Case(T=T, E=E, K=K, tile_m=tile_m, seed=draw(st.integers(0, 2**31 - 1)),
                dtype=draw(st.sampled_from(DTYPES)), ties=draw(st.booleans()), forced=forced,
                scoring=scoring, normalize=normalize)


REALISTIC = [
    Case(T=24576, E=128, K=8, tile_m=128, seed=0, dtype=torch.bfloat16),  # the 7B configuration
    Case(T=16384, E=128, K=2, tile_m=128, seed=1, dtype=torch.bfloat16, forced=192),  # paper's TR shape
    Case(T=100_000, E=64, K=8, tile_m=128, seed=2, dtype=torch.bfloat16, ties=True),
    Case(T=0, E=8, K=2, tile_m=128, seed=3),
    Case(T=5, E=1, K=1, tile_m=4, seed=4, dtype=torch.float64),
    Case(T=4096, E=2048, K=8, tile_m=128, seed=5, dtype=torch.bfloat16, ties=True),  # E = MAX_EXPERTS, ties
    Case(T=70_000, E=3, K=1, tile_m=64, seed=6, dtype=torch.float16, ties=True),  # long rows, many sub-blocks
]


def assert_same_routing(got: ref.Routing, want: ref.Routing) -> None:
    assert (got.num_tokens, got.num_experts) == (want.num_tokens, want.num_experts)
    assert got.token_idx.dtype == got.expert_idx.dtype == torch.int32
    assert torch.equal(got.token_idx, want.token_idx), "token_idx differs"
    assert torch.equal(got.expert_idx, want.expert_idx), "expert_idx differs"
    assert got.scores.dtype == want.scores.dtype
    assert torch.equal(got.scores, want.scores), "scores differ (same formula on the same indices)"


def assert_same_metadata(got: ref.RoutingMetadata, want: ref.RoutingMetadata) -> None:
    for name in ("expert_counts", "expert_offsets", "gather_idx", "pair_of_row", "row_of_pair"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.int32 and g.device == w.device, name
        assert torch.equal(g, w), f"{name} differs at {int((g != w).nonzero()[0]) if g.shape == w.shape else 'shape'}"
    assert (got.num_tokens, got.num_experts) == (want.num_tokens, want.num_experts)


def random_routing(T: int, E: int, K: int, seed: int, variable: bool, device: str = "cuda") -> ref.Routing:
    """A valid routing (distinct experts per token, pairs sorted by token) with skewed expert
    popularity (some experts empty). ``variable``: tokens carry 0..2K pairs (like token rounding),
    else exactly K (like top-k); never more than E."""
    g = torch.Generator(device=device).manual_seed(seed)
    per_token = torch.full((T,), min(K, E), device=device)  # (T,)
    if variable:
        per_token = torch.randint(0, 2 * K + 1, (T,), generator=g, device=device).clamp(max=E)  # (T,)
    popular = torch.zeros(E, dtype=torch.bool, device=device)  # a hot subset of the experts
    popular[torch.randint(0, E, (max(1, E // 4),), generator=g, device=device)] = True
    # each token ranks the experts by a random key, the hot ones ahead half of the time
    key = torch.rand(T, E, generator=g, device=device) + popular * (torch.rand(T, 1, generator=g, device=device) < 0.5)
    rank = torch.argsort(torch.argsort(key, dim=1, descending=True), dim=1)  # (T, E) rank of each expert
    token_idx, expert_idx = (rank < per_token[:, None]).nonzero(as_tuple=True)  # token-sorted, distinct
    P = token_idx.numel()
    return ref.Routing(token_idx=token_idx.int(), expert_idx=expert_idx.int(),
                       scores=torch.rand(P, generator=g, device=device), num_tokens=T, num_experts=E)


# ---------------------------------------------------------------------------------------------
# Metadata kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@given(T=st.integers(0, 100_000), E=st.sampled_from(E_CHOICES + [2048]), K=st.sampled_from(K_CHOICES),
       seed=st.integers(0, 2**31 - 1), variable=st.booleans(), int64=st.booleans())
@example(T=24576, E=128, K=8, seed=0, variable=False, int64=False)  # 7B configuration
@example(T=100_000, E=512, K=8, seed=1, variable=True, int64=False)
@example(T=0, E=8, K=2, seed=2, variable=False, int64=False)
@example(T=1, E=1, K=1, seed=3, variable=False, int64=True)
@example(T=33, E=2048, K=8, seed=4, variable=True, int64=False)  # mostly empty experts
def test_build_metadata_matches_reference(T, E, K, seed, variable, int64):
    routing = random_routing(T, E, K, seed, variable)
    if int64:
        routing = ref.Routing(routing.token_idx.long(), routing.expert_idx.long(), routing.scores, T, E)
    note(f"P = {routing.num_pairs}")
    want = ref.build_metadata(routing)
    got = fast.build_metadata(routing)
    assert_same_metadata(got, want)
    again = fast.build_metadata(routing, check_ids=False)  # deterministic, and no check needed
    assert_same_metadata(again, got)


@pytest.mark.gpu
def test_build_metadata_single_expert_takes_every_pair_in_order():
    """One expert holding every pair of a long routing: rows must stay in pair order across
    many warp tiles (the stability the scatter's running counters provide)."""
    P = 300_000
    routing = ref.Routing(torch.arange(P, device="cuda", dtype=torch.int32), torch.zeros(P, device="cuda", dtype=torch.int32),
                          torch.ones(P, device="cuda"), P, 3)
    meta = fast.build_metadata(routing)
    assert torch.equal(meta.pair_of_row, torch.arange(P, device="cuda", dtype=torch.int32))
    assert meta.expert_offsets.tolist() == [0, P, P, P]


@pytest.mark.gpu
def test_build_metadata_rejects_out_of_range_ids():
    routing = random_routing(10, 8, 2, 0, False)
    bad = ref.Routing(routing.token_idx, routing.expert_idx.clone().fill_(8), routing.scores, 10, 8)
    with pytest.raises(ValueError, match=r"routing.expert_idx must lie in \[0, 8\)"):
        fast.build_metadata(bad)
    bad_tokens = ref.Routing(routing.token_idx - 1, routing.expert_idx, routing.scores, 10, 8)
    with pytest.raises(ValueError, match=r"routing.token_idx must lie in \[0, 10\)"):
        fast.build_metadata(bad_tokens)


# ---------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@given(c=cases())
@example(c=REALISTIC[0])
@example(c=REALISTIC[2])
@example(c=REALISTIC[3])
@example(c=REALISTIC[4])
def test_topk_routing_matches_reference(c: Case):
    logits = make_logits(c)
    want = ref.topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)
    got = fast.topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)
    assert_same_routing(got, want)
    again = fast.topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize, check_finite=False)
    assert_same_routing(again, got)


@pytest.mark.gpu
@given(c=cases(), mode=st.sampled_from(ref.ROUNDING_MODES))
@example(c=REALISTIC[0], mode="nearest")
@example(c=REALISTIC[1], mode="up")
@example(c=REALISTIC[1], mode="down")
@example(c=REALISTIC[2], mode="stochastic")
@example(c=REALISTIC[3], mode="up")
@example(c=REALISTIC[4], mode="up")
@example(c=REALISTIC[5], mode="down")
@example(c=REALISTIC[6], mode="up")
@example(c=REALISTIC[6], mode="stochastic")
def test_token_rounding_matches_reference_and_invariants(c: Case, mode: str):
    logits = make_logits(c)
    kw = dict(tile_m=c.tile_m, mode=mode, scoring=c.scoring, normalize=c.normalize)

    def gen():
        return torch.Generator(device="cuda").manual_seed(c.seed + 1)

    want = ref.token_rounding(logits, c.K, generator=gen(), **kw)
    got = fast.token_rounding(logits, c.K, generator=gen(), **kw)
    assert_same_routing(got, want)
    again = fast.token_rounding(logits, c.K, generator=gen(), check_finite=False, **kw)
    assert_same_routing(again, got)  # deterministic; stochastic: the same seed gives the same routing
    torch_selection = fast._token_rounding(logits, c.K, c.tile_m, mode, gen(), c.scoring, c.normalize, False,
                                           selection="torch")  # the benchmark's in-run baseline
    assert_same_routing(torch_selection, want)

    # The reference's invariants, on the fast result.
    tc = fast.topk_routing(logits, c.K, scoring=c.scoring, normalize=c.normalize)
    f = torch.bincount(tc.expert_idx.long(), minlength=c.E)  # (E,)
    if c.forced is not None:
        assert int(f[0]) == c.forced, "make_logits must give expert 0 exactly `forced` token-choice picks"
    rounded = torch.bincount(got.expert_idx.long(), minlength=c.E)  # (E,)
    assert bool(((rounded % c.tile_m == 0) | (rounded == c.T)).all()), "counts must be multiples of tile_m (or T)"
    assert bool(((rounded - f).abs() < c.tile_m).all()), "|rounded - token-choice| < tile_m"
    keep, picks = pair_mask(got), pair_mask(tc)
    if mode == "down":
        assert not bool((keep & ~picks).any()), "down must be a subset of token-choice"
    if mode == "up":
        assert not bool((picks & ~keep).any()), "token-choice must be a subset of up"
    if c.tile_m == 1:
        assert torch.equal(keep, picks), "tile_m = 1 must equal top-k"
    pair_key = got.token_idx.long() * c.E + got.expert_idx.long()
    assert bool((pair_key[1:] > pair_key[:-1]).all()), "triples sorted by token, then expert, unique"


@pytest.mark.gpu
@pytest.mark.parametrize("scoring, normalize", SCORING_CONFIGS)
def test_token_rounding_scores_are_differentiable_like_the_reference(scoring, normalize):
    """With autograd on, the scores are the reference's, and their gradient w.r.t. the (bf16) logits is
    as close to a float64 oracle as the reference's.

    softmax_topk: the same graph as the reference, so the same gradient up to the order of fp32
    accumulation. topk_softmax: the fast path takes the token-choice weights from the ranking key's
    softmax (one softmax node), so both uses' gradients meet in fp32 and are rounded to bf16 once;
    the reference has two softmax nodes, whose gradients are each rounded to bf16 and then added in
    bf16 -- one ulp apart on ~10% of the entries (H100, 2026-12-07). Hence the oracle: the
    reference on the same logits in float64 (the same routing: the values are the same)."""
    c = Case(T=3000, E=64, K=4, tile_m=64, seed=7, dtype=torch.bfloat16)
    weights = torch.rand(4 * c.T * 2, device="cuda", dtype=torch.float64)
    grads = []
    for impl, dtype in ((ref.token_rounding, None), (fast.token_rounding, None), (ref.token_rounding, torch.float64)):
        logits = make_logits(c)
        logits = (logits if dtype is None else logits.to(dtype)).requires_grad_()
        r = impl(logits, c.K, tile_m=c.tile_m, mode="up", scoring=scoring, normalize=normalize)
        (r.scores * weights[: r.num_pairs].to(r.scores.dtype)).sum().backward()
        grads.append((r, logits.grad))
    (want, want_grad), (got, got_grad), (exact, exact_grad) = grads
    assert_same_routing(got, want)
    assert torch.equal(got.token_idx, exact.token_idx) and torch.equal(got.expert_idx, exact.expert_idx)
    if scoring == "softmax_topk":  # the reference's graph: only the fp32 accumulation order may differ
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    err_got, err_want = (got_grad.double() - exact_grad).abs(), (want_grad.double() - exact_grad).abs()
    # torch's own bf16 error (the reference's) sets the scale: a bf16 softmax backward rounds the saved
    # softmax, so entries that cancel to near zero carry errors of many of their own ulps (CPU: up to
    # ~190 on this case) -- a per-entry ulp bound cannot hold for either side. The fast gradient may be
    # at most twice as far from the oracle as the reference's, entry-wise at worst and in norm.
    fp32_slack = 8 * torch.finfo(torch.float32).eps * exact_grad.abs().amax()
    assert float(err_got.max()) <= 2 * float(err_want.max()) + fp32_slack, (float(err_got.max()), float(err_want.max()))
    assert float(err_got.norm()) <= 2 * float(err_want.norm()) + 1e-12, (float(err_got.norm()), float(err_want.norm()))


# ---------------------------------------------------------------------------------------------
# CPU: the rounding rule and bad input
# ---------------------------------------------------------------------------------------------
@given(counts=st.lists(st.integers(0, 1000), min_size=1, max_size=64), tile_m=st.sampled_from([1, 2, 3, 64, 128]),
       mode=st.sampled_from(ref.ROUNDING_MODES), cap=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1))
@example(counts=[0, 1, 63, 64, 65, 32, 96, 128, 127, 129], tile_m=64, mode="nearest", cap=1000, seed=0)
def test_unchecked_rounding_rule_equals_round_counts(counts, tile_m, mode, cap, seed):
    """The fast token rounding calls the reference's rule without its (device-reading) checks."""
    cap = max(cap, max(counts))
    c = torch.tensor(counts, dtype=torch.int32)
    want = ref.round_counts(c, tile_m, mode, torch.Generator().manual_seed(seed), num_tokens=cap)
    got = ref._round_counts_rule(c, tile_m, mode, torch.Generator().manual_seed(seed), cap)
    assert torch.equal(got, want)
    assert torch.equal(fast.round_counts(c, tile_m, mode, torch.Generator().manual_seed(seed), num_tokens=cap), want)


@given(T=st.integers(0, 64), E=st.sampled_from([1, 3, 6, 13, 64, 201, 4100]), K=st.sampled_from(K_CHOICES),
       dtype=st.sampled_from(DTYPES), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(T=33, E=201, K=8, dtype=torch.bfloat16, ties=True, seed=0)
@example(T=5, E=64, K=8, dtype=torch.float64, ties=True, seed=1)
def test_fallback_token_choice_equals_reference_radix_select(T, E, K, dtype, ties, seed):
    """Where the bitonic kernel does not apply, the router's stable-sort fallback (torch ops, so it
    runs on the CPU) picks exactly the reference's experts: ties, -0.0 vs 0.0 included, to the lower."""
    from sonic_learn.reference import topk as ref_topk

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)  # (T, E)
    if ties:  # few distinct values (many exact ties), zeros of both signs
        logits = (logits * 2).round() / 2
        logits = torch.where(torch.rand(T, E, generator=g) < 0.5, logits, -logits)
    logits = logits.to(dtype)
    k = min(K, E)
    if E % 8 == 0:
        assume(dtype == torch.float64)  # keep the CPU test on the fallback
    assert not fast._bitonic_supported(logits, k)
    assert torch.equal(fast.token_choice_experts(logits, k), ref_topk.radix_topk(logits, k)[1])


def select_kernel_model(scores: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, uniform, mode: str,
                        tile_m: int) -> torch.Tensor:
    """Step by step what BoundaryKeysKernel + BoundarySelectKernel compute, in plain torch/Python:
    the key words with the pick bit, the int64 rounding rule, up to four 8-bit radix passes finding
    the need-th largest key (stopping once a bin is taken whole) and the tie rule by rank in token
    order. Returns the (T, E) bool keep mask.
    (A model of the kernels' algorithm, checked against the reference on the CPU; the GPU tests
    check the kernels themselves.)"""
    T, E = scores.shape
    picked = torch.zeros(T, E, dtype=torch.bool).scatter_(1, experts.long(), True)  # (T, E)
    bits = scores.contiguous().view(torch.int32)  # (T, E) float32 bits
    words = torch.where(picked, bits | fast.PICK_BIT, bits).t().long()  # (E, T) the keys kernel's output
    keep = picked.clone()
    for e in range(E):
        f = int(counts[e])
        floor_f = f // tile_m * tile_m
        rem = f - floor_f
        ceil_f = floor_f + (tile_m if rem > 0 else 0)
        go_up = {"down": False, "up": rem > 0, "nearest": 2 * rem > tile_m}.get(mode)
        if go_up is None:
            go_up = float(uniform[e]) * float(tile_m) < float(rem)
        delta = min(ceil_f if go_up else floor_f, T) - f
        if delta == 0:
            continue
        up, need = delta > 0, abs(delta)
        w = words[e] & 0xFFFFFFFF  # unsigned view of the int32 word
        is_pick = w >= 2**31
        if up:
            key = torch.where(is_pick, -1, w)
        else:
            key = torch.where(is_pick, 0x7FFFFFFF - (w & 0x7FFFFFFF), -1)
        prefix = decided = ties = 0
        for p in range(4):
            if ties == need:  # the last bin was taken whole: every key >= prefix (its lower bits zero)
                break
            shift = 24 - 8 * p
            match = (key >= 0) & ((key & decided) == prefix)
            hist = torch.bincount((key[match] >> shift) & 255, minlength=256).tolist()
            above, found = 0, None
            for b in range(255, -1, -1):
                if above < need <= above + hist[b]:
                    found = (b, above, hist[b])
                    break
                above += hist[b]
            assert found is not None, "the need-th key must exist"
            prefix |= found[0] << shift
            decided |= 255 << shift
            need -= found[1]
            ties = found[2]
        thr = prefix
        tied = key == thr
        rank = torch.cumsum(tied.long(), 0) - tied.long()  # tied keys at lower tokens
        first = 0 if up else ties - need
        take = (key > thr) | (tied & (rank >= first) & (rank < first + need))
        assert int(take.sum()) == abs(delta)
        keep[take, e] = up
    return keep


@given(T=st.integers(0, 300), E=st.sampled_from([1, 2, 3, 8, 13, 64]), K=st.sampled_from(K_CHOICES),
       tile_m=st.sampled_from([1, 2, 3, 16, 64, 128]), mode=st.sampled_from(ref.ROUNDING_MODES),
       scoring=st.sampled_from(SCORING_CONFIGS), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       ties=st.booleans(), forced=st.none() | st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
@example(T=200, E=8, K=2, tile_m=16, mode="down", scoring=("softmax_topk", False), dtype=torch.float32, ties=True,
         forced=None, seed=0)
@example(T=200, E=8, K=2, tile_m=16, mode="up", scoring=("topk_softmax", False), dtype=torch.bfloat16, ties=True,
         forced=None, seed=1)
@example(T=150, E=8, K=2, tile_m=64, mode="up", scoring=("softmax_topk", False), dtype=torch.float32, ties=False,
         forced=3, seed=2)  # scores that underflow to 0.0: a large tie group
def test_select_kernel_algorithm_equals_reference_on_cpu(T, E, K, tile_m, mode, scoring, dtype, ties, forced, seed):
    """The two token-rounding kernels' algorithm (as a CPU model) gives the reference's routing."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    if ties:
        logits = torch.randint(-2, 3, (T, E), generator=g).float()  # (T, E) many exact ties
    else:
        logits = torch.randn(T, E, generator=g) * 2  # (T, E)
    if forced is not None and E > K:
        logits[:, 0] = -100.0
        logits[: min(forced, T), 0] = 100.0
    logits = logits.to(dtype)
    scoring, normalize = scoring
    want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, scoring=scoring, normalize=normalize,
                              generator=torch.Generator().manual_seed(seed + 1))
    tc = ref.topk_routing(logits, K, scoring=scoring, normalize=normalize)
    experts = tc.expert_idx.long().view(T, K)
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    uniform = torch.rand(E, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    scores = ref.router_probabilities(logits)  # (T, E) float32: the ranking key p
    assert bool((scores >= 0).all()) and not bool(torch.signbit(scores).any()), "bit 31 is free for the pick flag"
    keep = select_kernel_model(scores, experts, counts, uniform, mode, tile_m)
    token_idx, expert_idx = keep.nonzero(as_tuple=True)
    assert torch.equal(token_idx.int(), want.token_idx) and torch.equal(expert_idx.int(), want.expert_idx)


@given(T=st.integers(0, 200), E=st.sampled_from([1, 3, 8, 64]), K=st.sampled_from(K_CHOICES),
       tile_m=st.sampled_from([1, 2, 16, 128]), mode=st.sampled_from(ref.ROUNDING_MODES), ties=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_float64_torch_path_equals_reference_on_cpu(T, E, K, tile_m, mode, ties, seed):
    """Float64 scores skip the kernels: the torch-op selection (runs on the CPU) is the reference's."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(-2, 3, (T, E), generator=g) if ties else torch.randn(T, E, generator=g)).double()
    want = ref.token_rounding(logits, K, tile_m=tile_m, mode=mode, generator=torch.Generator().manual_seed(seed))
    tc = ref.topk_routing(logits, K)
    experts = tc.expert_idx.long().view(T, K)
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    uniform = torch.rand(E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scores = ref.router_probabilities(logits)  # (T, E) float64: the ranking key p
    keep = fast._boundary_keep_torch(scores, experts, counts, uniform, mode, tile_m)
    token_idx, expert_idx = keep.nonzero(as_tuple=True)
    assert torch.equal(token_idx.int(), want.token_idx) and torch.equal(expert_idx.int(), want.expert_idx)


def _routing(device="cpu", **over):
    fields = dict(token_idx=torch.zeros(4, dtype=torch.int32, device=device),
                  expert_idx=torch.zeros(4, dtype=torch.int32, device=device),
                  scores=torch.ones(4, device=device), num_tokens=2, num_experts=3)
    fields.update(over)
    return ref.Routing(**fields)


@pytest.mark.parametrize(
    "routing, kwargs, exc, match",
    [
        ("not a routing", {}, TypeError, "routing must be a sonic_learn.reference.routing.Routing"),
        (_routing(), {}, ValueError, "routing.token_idx must be a CUDA tensor"),
        (_routing(expert_idx=torch.zeros(4)), {}, TypeError, "routing.expert_idx must have dtype in"),
        (_routing(expert_idx=torch.zeros(3, dtype=torch.int32)), {}, ValueError, "routing.expert_idx must have P = 4"),
        (_routing(num_experts=0), {}, ValueError, "routing.num_experts must satisfy 1 <= "),
        (_routing(num_experts=fast.MAX_EXPERTS + 1), {}, ValueError, "use sonic_learn.reference.routing"),
        (_routing(num_tokens=-1), {}, ValueError, "routing.num_tokens must satisfy 0 <="),
        (_routing(scores=torch.ones(2, 2)), {}, ValueError, r"routing.scores must be 1-D"),
    ],
)
def test_bad_build_metadata_input(routing, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fast.build_metadata(routing, **kwargs)


@pytest.mark.gpu
def test_bad_build_metadata_input_on_gpu():
    with pytest.raises(TypeError, match="routing.expert_idx must have dtype in"):
        fast.build_metadata(_routing("cuda", expert_idx=torch.zeros(4, device="cuda")))
    with pytest.raises(ValueError, match="routing.expert_idx must have P = 4 entries"):
        fast.build_metadata(_routing("cuda", expert_idx=torch.zeros(3, dtype=torch.int32, device="cuda")))
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        fast.build_metadata(_routing("cuda"), check_ids=1)


BAD_ROUTER = [
    ({"logits": torch.zeros(4, 8)}, ValueError, "logits must be a CUDA tensor"),
    ({"logits": "x"}, TypeError, "logits must be a torch.Tensor"),
    ({"logits": torch.zeros(4)}, ValueError, r"logits must be 2-D \(T tokens, E experts\)"),
    ({"logits": torch.zeros(4, 8, dtype=torch.int32)}, TypeError, "logits must have dtype in"),
    ({"k": 9}, ValueError, r"k must satisfy 1 <= k <= 8"),
    ({"k": 0}, ValueError, r"k must satisfy 1 <= k"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"scoring": "sigmoid"}, ValueError, "scoring must be one of"),
    ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ({"check_finite": None}, TypeError, "check_finite must be a bool"),
]


@pytest.mark.parametrize("router", ["topk_routing", "token_rounding"])
@pytest.mark.parametrize("kwargs, exc, match", BAD_ROUTER)
def test_bad_router_input(router, kwargs, exc, match):
    # The value checks come before the device check, so on a CPU-only machine they still show.
    args = {"logits": torch.zeros(4, 8, device="cuda" if torch.cuda.is_available() else "cpu"), "k": 2}
    args.update(kwargs)
    logits, k = args.pop("logits"), args.pop("k")
    with pytest.raises(exc, match=match):
        getattr(fast, router)(logits, k, **args)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"tile_m": 0}, ValueError, "tile_m must satisfy 1 <= tile_m"),
        ({"mode": "banker"}, ValueError, "mode must be one of"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator or None"),
        ({"generator": torch.Generator()}, ValueError, "generator must live on the device of the logits"),
    ],
)
def test_bad_token_rounding_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fast.token_rounding(torch.zeros(4, 8, device="cuda"), 2, **kwargs)


@pytest.mark.gpu
def test_too_many_experts_for_the_fast_kernels_is_rejected():
    with pytest.raises(ValueError, match=r"logits.shape\[1\] \(E\) must be <= 2048"):
        fast.token_rounding(torch.zeros(4, fast.MAX_EXPERTS + 8, device="cuda"), 2)


@pytest.mark.gpu
def test_non_finite_logits_are_rejected():
    x = torch.zeros(4, 8, device="cuda")
    x[1, 2] = float("nan")
    for router in (fast.topk_routing, fast.token_rounding):
        with pytest.raises(ValueError, match="logits must not contain NaN"):
            router(x, 2)
